//! Real `cmdflow` processes and private service instances for the fault suite.
