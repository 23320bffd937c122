//! What a decision is checked and completed with before it is applied: the engine's own
//! events, the limits, rendered messages, a remote decider's answer, a new command's row.

use super::*;

impl Engine {
    /// An event cmdflow emits on behalf of `command`, chained to the event that caused it.
    pub(super) fn engine_event(
        &self,
        command: &Command,
        cause: &Event,
        ty: &str,
        data: Map<String, Value>,
        to: Option<CommandId>,
    ) -> Event {
        let mut e = Event::new(&format!("cmdflow/{}", command.kind), ty, data);
        e.commandid = to;
        e.extensions.insert(
            cmdflow_shared::contract::FROM_COMMAND.to_owned(),
            json!(command.id),
        );
        e.subject = Some(command.owner.clone());
        e.causationid = Some(cause.id.clone());
        e.correlationid = cause
            .correlationid
            .clone()
            .or_else(|| Some(command.root_id.to_string()));
        // The trace goes on: a child of this handling's span when traces are on, else a new
        // span in the cause's trace.
        let traceparent = cmdflow_shared::telemetry::current_traceparent().or_else(|| {
            cause
                .extensions
                .get(cmdflow_shared::trace::TRACEPARENT)
                .and_then(Value::as_str)
                .map(|parent| cmdflow_shared::trace::child_of(Some(parent)))
        });
        if let Some(traceparent) = traceparent {
            e.extensions.insert(
                cmdflow_shared::trace::TRACEPARENT.to_owned(),
                json!(traceparent),
            );
        }
        e
    }

    /// Refuses decisions that would let a tree run away. The reason fails the command.
    pub(super) fn check_limits(
        &self,
        command: &Command,
        decision: &Decision,
    ) -> Result<(), String> {
        let now = self.clock.now();
        for op in &decision.timers {
            match op {
                TimerOp::Set(spec) => {
                    if spec.name.starts_with("wait:") || spec.name.starts_with("group:") {
                        return Err(format!(
                            "timer {}: names starting with wait: or group: are the engine's",
                            spec.name
                        ));
                    }
                    spec.first_due(now)
                        .map_err(|e| format!("timer {}: {e}", spec.name))?;
                }
                TimerOp::Cancel(name) => {
                    cmdflow_shared::time::check_name(name)
                        .map_err(|e| format!("cancel timer: {e}"))?;
                }
            }
        }
        for wait in &decision.waits {
            cmdflow_shared::domain::check_dotted_name(&wait.event_type, 2)
                .map_err(|e| format!("wait: event type: {e}"))?;
            if wait.key.is_empty() || wait.key.chars().count() > 512 {
                return Err("wait: the correlation key must be 1 to 512 characters".to_owned());
            }
            if let Some(t) = wait.timeout {
                check_delay(t).map_err(|e| format!("wait timeout: {e}"))?;
            }
        }
        for group in &decision.spawn_groups {
            if let Some(d) = group.deadline {
                check_delay(d).map_err(|e| format!("group {} deadline: {e}", group.name))?;
            }
        }
        let n = decision.spawn_count();
        if n == 0 {
            return Ok(());
        }
        let max = self.settings.max_children;
        if n > max {
            return Err(format!(
                "limit: a decision may spawn at most {max} children; this one spawned {n}"
            ));
        }
        if command.depth + 1 > self.settings.max_depth {
            return Err(format!(
                "limit: the tree may be at most {} levels deep; {} at depth {} cannot spawn children",
                self.settings.max_depth, command.kind, command.depth
            ));
        }
        for group in &decision.spawn_groups {
            if group.name.is_empty() || group.name.len() > 64 {
                return Err("a group name must be 1 to 64 bytes".to_owned());
            }
            if let FanIn::Quorum(q) = group.policy
                && q as usize > group.children.len()
            {
                return Err(format!(
                    "group {}: quorum:{q} needs at least {q} children; it has {}",
                    group.name,
                    group.children.len()
                ));
            }
        }
        let specs = decision
            .spawn_detached
            .iter()
            .chain(decision.spawn_groups.iter().flat_map(|g| g.children.iter()));
        for spec in specs {
            if !self.registry.contains(&spec.kind) {
                return Err(format!("cannot spawn unknown command kind `{}`", spec.kind));
            }
            self.registry
                .check_start(&spec.kind, &spec.data)
                .map_err(|v| format!("cannot spawn {}: {v}", spec.kind))?;
            if let Some(owner) = &spec.owner {
                Owner::parse(owner).map_err(|e| format!("child owner: {e}"))?;
            }
        }
        Ok(())
    }

    /// Renders the decision's messages with the person's own data.
    pub(super) fn render_messages(
        &self,
        command: &Command,
        event: &Event,
        decision: &Decision,
    ) -> Vec<store::people::NewMessage> {
        use store::people::Delivery;
        let now = self.clock.now();
        decision
            .messages
            .iter()
            .map(|spec| {
                let channel = match spec.channel {
                    Channel::InApp => "in_app",
                    Channel::Email => "email",
                };
                let to = spec.to.clone().unwrap_or_else(|| command.owner.clone());
                let failed = |reason: String| store::people::NewMessage {
                    owner: to.clone(),
                    template: spec.template.clone(),
                    channel,
                    subject: String::new(),
                    body: String::new(),
                    email_to: spec.email.clone(),
                    delivery: Delivery::Failed,
                    failed_reason: Some(reason),
                };
                let mut context = command.data.as_object().cloned().unwrap_or_default();
                for (k, v) in &spec.vars {
                    context.insert(k.clone(), v.clone());
                }
                if !context.contains_key("name") {
                    context.insert("name".into(), json!(to.split_once(':').map_or(to.as_str(), |(_, id)| id)));
                }
                context.insert("owner".into(), json!(to));
                context.insert("now".into(), json!(now));
                context.insert("command".into(), json!({"id": command.id, "kind": command.kind, "created_at": command.created_at}));
                context.insert("event".into(), json!({"type": event.ty, "data": event.data, "time": event.time}));
                let (subject, body) = match self.registry.templates().render(&spec.template, &Value::Object(context)) {
                    Ok(rendered) => rendered,
                    Err(reason) => return failed(reason),
                };
                let delivery = match (spec.channel, &spec.email) {
                    (Channel::InApp, _) => Delivery::InApp,
                    (Channel::Email, None) => return failed(format!("template {}: an e-mail needs an address", spec.template)),
                    (Channel::Email, Some(address)) => match cmdflow_shared::domain::check_email(address) {
                        Err(reason) => return failed(format!("template {}: to: {reason}", spec.template)),
                        Ok(()) if self.settings.smtp_enabled => Delivery::Pending,
                        Ok(()) => Delivery::Kept,
                    },
                };
                store::people::NewMessage {
                    owner: to.clone(),
                    template: spec.template.clone(),
                    channel,
                    subject,
                    body,
                    email_to: spec.email.clone(),
                    delivery,
                    failed_reason: None,
                }
            })
            .collect()
    }

    /// Asks a remote decider, counting the call by kind and outcome and timing it.
    pub(super) async fn ask_remote(
        &self,
        remote: &crate::remote::RemoteDecider,
        command: &cmdflow_shared::Command,
        event: &Event,
    ) -> Result<Decision, RemoteError> {
        let started = std::time::Instant::now();
        let answer = remote.decide(command, event).await;
        let outcome = match &answer {
            Ok(_) => "decided",
            Err(RemoteError::Unavailable { .. }) => "unavailable",
            Err(RemoteError::Refused { .. }) => "refused",
            Err(RemoteError::Invalid { .. }) => "invalid",
        };
        let kind = command.kind.clone();
        metrics::counter!(cmdflow_shared::metrics::DECIDER_CALLS, "kind" => kind.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(cmdflow_shared::metrics::DECIDER_SECONDS, "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        answer
    }

    pub(in crate::engine) fn new_command(
        &self,
        id: CommandId,
        event: &Event,
    ) -> Result<NewCommand, ApplyError> {
        let start: StartData = serde_json::from_value(Value::Object(event.data.clone()))
            .map_err(|e| ApplyError::Permanent(format!("invalid command.start data: {e}")))?;
        let kind = Kind::parse(&start.kind)
            .map_err(|e| ApplyError::Permanent(format!("invalid command.start data: kind: {e}")))?;
        if !self.registry.contains(kind.as_str()) {
            return Err(ApplyError::Permanent(format!(
                "unknown command kind `{kind}`"
            )));
        }
        let owner = Owner::parse(&start.owner).map_err(|e| {
            ApplyError::Permanent(format!("invalid command.start data: owner: {e}"))
        })?;
        let data = match start.data {
            None | Some(Value::Null) => json!({}),
            Some(Value::Object(map)) => Value::Object(map),
            Some(_) => {
                return Err(ApplyError::Permanent(
                    "invalid command.start data: data must be a JSON object".into(),
                ));
            }
        };
        // The kind's schema, as the gateway checks it: a start sent past the gateway is refused
        // with the same field.
        self.registry
            .check_start_value(kind.as_str(), &data)
            .map_err(|v| ApplyError::Permanent(format!("invalid start data of {kind}: {v}")))?;
        if let Some(map) = data.as_object() {
            cmdflow_shared::domain::check_email_in(map, "data").map_err(|(field, reason)| {
                ApplyError::Permanent(format!("invalid start data of {kind}: {field}: {reason}"))
            })?;
        }
        Ok(NewCommand {
            id,
            kind: kind.to_string(),
            owner: owner.to_string(),
            parent_id: start.parent_id,
            root_id: id,
            depth: 0,
            data,
            group_name: None,
            parent_close: cmdflow_shared::decision::ParentClose::Abort,
            // A root counts from when its start was accepted.
            created_at: event.accepted_at(),
            kind_version: self.registry.version_of(kind.as_str()).map(str::to_owned),
        })
    }
}
