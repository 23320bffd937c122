//! The `cmdflow` binary's tests, run as the real binary: start-up errors and the offline
//! subcommands (`cli`), the client subcommands against a real gateway and worker
//! (`cli_client`), and their exit codes (`cli_exit`). One test binary, linked once.

mod cli;
mod cli_client;
mod cli_exit;
