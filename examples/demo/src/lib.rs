//! cmdflow's example kinds. None of them runs unless a binary installs them: the `cmdflow`
//! binary does for `cmdflow up` (and `CMDFLOW_EXAMPLES=true`), and so do the tests and the load
//! generator. A production binary built on the `cmdflow` crate has only the kinds it registers.
//!
//! - [`demo`]: `demo.noop`, `demo.counter`, `demo.fanout`, for tests, demos and benchmarks;
//! - [`demo_time`]: `demo.timer` and `demo.wait`;
//! - [`business`]: `quote`, `query` and `membership`, behind the UI's examples;
//! - the sales funnels in `funnels/` (`lead_to_visitor`, `visitor_to_member`, …), which spawn
//!   `membership`, and the message templates in `templates/` they and the business kinds send.

pub mod business;
pub mod demo;
pub mod demo_time;

use cmdflow_workers::{Registry, RegistryError};

/// The message templates, by name (the file's stem).
pub const TEMPLATES: &[(&str, &str)] = &[
    (
        "quote_submitted",
        include_str!("../templates/quote_submitted.txt"),
    ),
    (
        "membership_pending",
        include_str!("../templates/membership_pending.txt"),
    ),
    (
        "membership_approved",
        include_str!("../templates/membership_approved.txt"),
    ),
    (
        "membership_rejected",
        include_str!("../templates/membership_rejected.txt"),
    ),
    (
        "membership_reminder",
        include_str!("../templates/membership_reminder.txt"),
    ),
    (
        "funnel_welcome",
        include_str!("../templates/funnel_welcome.txt"),
    ),
    (
        "funnel_nudge",
        include_str!("../templates/funnel_nudge.txt"),
    ),
    ("funnel_done", include_str!("../templates/funnel_done.txt")),
    (
        "visitor_nudge",
        include_str!("../templates/visitor_nudge.txt"),
    ),
    (
        "application_received",
        include_str!("../templates/application_received.txt"),
    ),
    (
        "application_reminder",
        include_str!("../templates/application_reminder.txt"),
    ),
    (
        "application_approved",
        include_str!("../templates/application_approved.txt"),
    ),
    (
        "application_declined",
        include_str!("../templates/application_declined.txt"),
    ),
    (
        "lead_welcome",
        include_str!("../templates/lead_welcome.txt"),
    ),
    (
        "visitor_welcome",
        include_str!("../templates/visitor_welcome.txt"),
    ),
    (
        "client_offer",
        include_str!("../templates/client_offer.txt"),
    ),
    (
        "client_welcome",
        include_str!("../templates/client_welcome.txt"),
    ),
];

/// The sales funnels: `(file, TOML)`.
pub const FUNNELS: &[(&str, &str)] = &[
    (
        "funnels/lead_to_visitor.toml",
        include_str!("../funnels/lead_to_visitor.toml"),
    ),
    (
        "funnels/visitor_to_member.toml",
        include_str!("../funnels/visitor_to_member.toml"),
    ),
    (
        "funnels/member_to_client.toml",
        include_str!("../funnels/member_to_client.toml"),
    ),
    (
        "funnels/lead_to_supplier.toml",
        include_str!("../funnels/lead_to_supplier.toml"),
    ),
    (
        "funnels/lead_to_shipper.toml",
        include_str!("../funnels/lead_to_shipper.toml"),
    ),
];

/// Installs every example: the kinds, the templates, then the funnels (which spawn the
/// kinds and send the templates).
pub fn install(registry: &mut Registry) -> Result<(), RegistryError> {
    install_kinds(registry)?;
    let funnels: Vec<(String, String)> = FUNNELS
        .iter()
        .map(|(file, text)| ((*file).to_owned(), (*text).to_owned()))
        .collect();
    registry.flows(&funnels)?;
    Ok(())
}

/// Installs the kinds and templates, without the funnels (a binary that brings funnels of its
/// own, from `CMDFLOW_FUNNELS_DIR`).
pub fn install_kinds(registry: &mut Registry) -> Result<(), RegistryError> {
    business::register(registry)?;
    demo::register(registry);
    demo_time::register(registry)?;
    for (name, source) in TEMPLATES {
        registry.template(name, source)?;
    }
    Ok(())
}

/// A registry with every example installed.
pub fn registry() -> Result<Registry, RegistryError> {
    let mut registry = Registry::new();
    install(&mut registry)?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_funnels_load() {
        let registry = registry().unwrap();
        let names: Vec<&str> = registry
            .flow_defs()
            .iter()
            .filter_map(|d| d.name.as_deref())
            .collect();
        assert_eq!(
            names,
            [
                "lead_to_visitor",
                "visitor_to_member",
                "member_to_client",
                "lead_to_supplier",
                "lead_to_shipper",
            ]
        );
        assert!(registry.contains("funnel.visitor_to_member"));
        assert_eq!(
            registry.kinds_started_by("visitor.arrived"),
            ["funnel.visitor_to_member"]
        );
        // One event starts at most one funnel of the client track.
        assert_eq!(
            registry.kinds_started_by("lead.created"),
            ["funnel.lead_to_visitor"]
        );
        assert_eq!(
            registry.track_kinds("client"),
            [
                "funnel.lead_to_visitor",
                "funnel.visitor_to_member",
                "funnel.member_to_client"
            ]
        );
        // Each funnel of the path hands over to the next on the event that starts it.
        let def = |kind: &str| registry.funnel(kind).unwrap();
        assert!(def("funnel.lead_to_visitor").ends_on("lead", "visitor.arrived"));
        assert!(def("funnel.visitor_to_member").ends_on("applicant", "member.approved"));
        assert!(!def("funnel.visitor_to_member").ends_on("visitor", "member.approved"));
    }

    #[test]
    fn every_funnel_message_renders_with_only_the_persons_name() {
        let registry = registry().unwrap();
        for def in registry.flow_defs() {
            for stage in &def.stages {
                let sends = stage
                    .on_enter
                    .iter()
                    .chain(stage.after.iter().flat_map(|a| a.actions.iter()));
                for action in sends {
                    if let cmdflow_workers::flows::Action::Send { template, .. } = action {
                        let vars = serde_json::json!({
                            "name": "Ada", "stage": stage.name, "funnel": def.title,
                            "now": "2026-11-26T10:00:00Z", "stage_entered_at": "2026-11-26T10:00:00Z",
                        });
                        let (subject, body) = registry.templates().render(template, &vars).unwrap();
                        assert!(!subject.trim().is_empty(), "{template}: no subject");
                        assert!(body.contains("Hello Ada"), "{template}: {body}");
                        // No raw stage label reads as a sentence to the person.
                        assert!(
                            !body.contains(&format!("the {} step", stage.name)),
                            "{template}: {body}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_template_renders_with_its_data() {
        let registry = registry().unwrap();
        let (subject, body) = registry
            .templates()
            .render(
                "quote_submitted",
                &serde_json::json!({"name": "Ada", "now": "2026-11-26T10:00:00Z", "total": 120}),
            )
            .unwrap();
        assert_eq!(subject, "Your quote is on its way, Ada");
        assert!(
            body.contains("26 November 2026") && body.contains("120"),
            "{body}"
        );
        for (name, _) in TEMPLATES {
            assert!(registry.templates().contains(name), "{name}");
        }
    }

    #[test]
    fn the_catalogue_lists_every_kind_with_its_schema() {
        let catalogue = registry().unwrap().catalogue();
        let query = catalogue.iter().find(|k| k.name == "query").unwrap();
        assert_eq!(query.schema["required"], serde_json::json!(["q"]));
        let counter = catalogue.iter().find(|k| k.name == "demo.counter").unwrap();
        assert_eq!(counter.starts_on, ["demo.requested"]);
        assert!(
            catalogue
                .iter()
                .any(|k| k.name == "funnel.member_to_client")
        );
    }
}
