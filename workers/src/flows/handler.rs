//! The generic flow kind: runs any definition, one event at a time, as a pure handler.

use super::*;

/// The generic flow kind: runs any definition.
pub struct FlowHandler {
    def: Arc<FlowDef>,
}

impl FlowHandler {
    pub fn new(def: FlowDef) -> Self {
        Self { def: Arc::new(def) }
    }
}

/// The value at a dotted `path` below `root`.
fn lookup<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(root, |v, part| match v {
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => v.get(part),
        })
}

/// What an event and its command offer to paths.
struct Scope<'a> {
    command: &'a Command,
    event: Value,
    /// The data a transition has set so far (`set`, `inc`): `$.data` paths see it, so that its
    /// actions and the next state's work on the data as changed.
    changed: Map<String, Value>,
}

impl<'a> Scope<'a> {
    fn new(command: &'a Command, event: &Event) -> Self {
        Self {
            command,
            event: Value::Object(event.data.clone()),
            changed: Map::new(),
        }
    }

    /// The value at `rest` (`.field.…`) of the command's data, as changed.
    fn data(&self, rest: &str) -> Option<Value> {
        let rest = rest.trim_start_matches('.');
        if rest.is_empty() {
            let mut data = self.command.data.as_object().cloned().unwrap_or_default();
            data.extend(self.changed.clone());
            return Some(Value::Object(data));
        }
        let (first, tail) = rest.split_once('.').unwrap_or((rest, ""));
        let root = self
            .changed
            .get(first)
            .or_else(|| self.command.data.get(first))?;
        lookup(root, tail).cloned()
    }

    /// The value of a `$.…` path, or of a plain path in the event's data.
    fn get(&self, path: &str) -> Option<Value> {
        if let Some(rest) = path.strip_prefix("$.event") {
            return lookup(&self.event, rest).cloned();
        }
        if let Some(rest) = path.strip_prefix("$.data") {
            return self.data(rest);
        }
        match path {
            "$.command.id" => Some(json!(self.command.id)),
            "$.command.owner" => Some(json!(self.command.owner)),
            "$.command.kind" => Some(json!(self.command.kind)),
            _ => lookup(&self.event, path).cloned(),
        }
    }

    /// A TOML value with its `$.…` strings replaced by what they name (null when absent).
    fn resolve(&self, v: &toml::Value) -> Value {
        match v {
            toml::Value::String(s) if is_path(s) => self.get(s).unwrap_or(Value::Null),
            toml::Value::Array(items) => items.iter().map(|i| self.resolve(i)).collect(),
            toml::Value::Table(t) => Value::Object(self.resolve_table(t)),
            other => serde_json::to_value(other).unwrap_or(Value::Null),
        }
    }

    fn resolve_table(&self, t: &toml::Table) -> Map<String, Value> {
        t.iter()
            .map(|(k, v)| (k.clone(), self.resolve(v)))
            .collect()
    }

    fn holds(&self, g: &Guard) -> bool {
        let value = self.get(&g.path).filter(|v| !v.is_null());
        let number = value.as_ref().and_then(Value::as_f64);
        let want = |w: &toml::Value| serde_json::to_value(w).ok();
        let compares = [
            (g.gt, number.map(|n| g.gt.is_none_or(|x| n > x))),
            (g.gte, number.map(|n| g.gte.is_none_or(|x| n >= x))),
            (g.lt, number.map(|n| g.lt.is_none_or(|x| n < x))),
            (g.lte, number.map(|n| g.lte.is_none_or(|x| n <= x))),
        ];
        let equals = g
            .equals
            .as_ref()
            .is_none_or(|w| value.is_some() && want(w) == value);
        let differs = g.not_equals.as_ref().is_none_or(|w| want(w) != value);
        let exists = match g.exists {
            Some(e) => value.is_some() == e,
            // A bare guard asks that the value be there.
            None => {
                value.is_some()
                    || g.equals.is_some()
                    || g.not_equals.is_some()
                    || compares.iter().any(|(bound, _)| bound.is_some())
            }
        };
        let compared = compares
            .iter()
            .all(|(bound, ok)| bound.is_none() || *ok == Some(true));
        exists && equals && differs && compared
    }
}

/// Merges `patch` into the decision's data patch.
fn merge_patch(decision: Decision, patch: Map<String, Value>) -> Decision {
    if patch.is_empty() {
        return decision;
    }
    let mut merged = match &decision.data {
        Some(DataChange::Patch(current)) => current.clone(),
        _ => Map::new(),
    };
    merged.extend(patch);
    decision.with_patch(merged)
}

impl FlowHandler {
    fn wait_key(command: &Command, scope: &Scope<'_>, key: Option<&str>) -> String {
        match key {
            None => command.owner.clone(),
            Some(k) if is_path(k) => match scope.get(k) {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => String::new(),
            },
            Some(k) => k.to_owned(),
        }
    }

    fn when(
        scope: &Scope<'_>,
        decision: Decision,
        name: &str,
        delay: Option<&str>,
        at: Option<&str>,
        cron: Option<&str>,
        tz: Option<&str>,
    ) -> Result<Decision, HandlerError> {
        match (delay, at, cron) {
            (Some(d), _, _) => {
                Ok(decision.after(name, parse_delay(d).map_err(HandlerError::InvalidData)?))
            }
            (_, Some(at), _) => {
                let text = if is_path(at) {
                    match scope.get(at) {
                        Some(Value::String(s)) => s,
                        _ => {
                            return Err(HandlerError::InvalidData(format!(
                                "timer {name}: {at} is not a time"
                            )));
                        }
                    }
                } else {
                    at.to_owned()
                };
                let at = chrono::DateTime::parse_from_rfc3339(&text).map_err(|e| {
                    HandlerError::InvalidData(format!("timer {name}: `{text}` is not a time: {e}"))
                })?;
                Ok(decision.at(name, at.with_timezone(&chrono::Utc)))
            }
            (_, _, Some(expr)) => Ok(decision.cron(name, expr, tz.unwrap_or("UTC"))),
            _ => Ok(decision),
        }
    }

    /// Applies `actions` to `decision`. A template already sent at this stage (in `sent`, the
    /// `stage:template` keys of `data.sent`) is not sent again; one sent now is added.
    fn act(
        &self,
        scope: &Scope<'_>,
        stage: &str,
        actions: &[Action],
        sent: &mut Vec<Value>,
        mut decision: Decision,
    ) -> Result<Decision, HandlerError> {
        let command = scope.command;
        for a in actions {
            decision = match a {
                Action::Send { template, .. }
                    if sent.contains(&json!(format!("{stage}:{template}"))) =>
                {
                    decision
                }
                Action::Send { template, email } => {
                    sent.push(json!(format!("{stage}:{template}")));
                    let mut vars = Map::new();
                    vars.insert("stage".into(), json!(stage));
                    vars.insert("funnel".into(), json!(self.def.title));
                    vars.insert("flow".into(), json!(self.def.title));
                    let address = command.data.get("email").and_then(Value::as_str);
                    match (email, address) {
                        (true, Some(address)) => decision.message_to(
                            &command.owner,
                            Some(address),
                            template,
                            Channel::Email,
                            vars,
                        ),
                        _ => decision.message(template, Channel::InApp, vars),
                    }
                }
                Action::Timer {
                    name,
                    after,
                    at,
                    cron,
                    tz,
                } => Self::when(
                    scope,
                    decision,
                    name,
                    after.as_deref(),
                    at.as_deref(),
                    cron.as_deref(),
                    tz.as_deref(),
                )?,
                Action::CancelTimer { name } => decision.cancel_timer(name),
                Action::Wait {
                    event_type,
                    key,
                    timeout,
                } => {
                    let timeout = timeout.as_deref().and_then(|t| parse_delay(t).ok());
                    let key = Self::wait_key(command, scope, key.as_deref());
                    decision.wait_for(event_type, &key, timeout)
                }
                Action::Spawn { kind, data } => {
                    decision.spawn_detached(ChildSpec::new(kind, self.child_data(scope, data)))
                }
                Action::Group {
                    name,
                    policy,
                    deadline,
                    children,
                } => {
                    let policy = policy
                        .as_deref()
                        .map(FanIn::parse)
                        .transpose()
                        .map_err(HandlerError::InvalidData)?
                        .unwrap_or(FanIn::All);
                    let specs = children
                        .iter()
                        .map(|c| ChildSpec::new(&c.kind, self.child_data(scope, &c.data)))
                        .collect();
                    let decision = decision.spawn_group(name, policy, specs);
                    match deadline.as_deref().map(parse_delay) {
                        Some(Ok(d)) => decision.with_group_deadline(name, d),
                        _ => decision,
                    }
                }
                Action::AbortChildren { group } => decision.abort_children(match group {
                    Some(g) => AbortChildren::Group(g.clone()),
                    None => AbortChildren::All,
                }),
                Action::Emit { event_type, data } => {
                    let data = data
                        .as_ref()
                        .map(|d| scope.resolve_table(d))
                        .unwrap_or_default();
                    decision.emit(event_type, data)
                }
                Action::Complete { result } => {
                    let result = result
                        .as_ref()
                        .map(|r| Value::Object(scope.resolve_table(r)))
                        .unwrap_or_else(|| json!({ "stage": stage }));
                    decision
                        .with_outcome(Outcome::Complete(result))
                        .with_ui(Value::Null)
                }
                Action::Fail { reason } => decision
                    .with_outcome(Outcome::Fail(reason.clone()))
                    .with_ui(Value::Null),
            };
        }
        Ok(decision)
    }

    /// A child's data: the person's name and e-mail (for a funnel), then the action's data.
    fn child_data(&self, scope: &Scope<'_>, data: &Option<toml::Table>) -> Map<String, Value> {
        let mut child = Map::new();
        if self.def.is_funnel() {
            for key in ["name", "email"] {
                if let Some(v) = scope.command.data.get(key) {
                    child.insert(key.into(), v.clone());
                }
            }
        }
        if let Some(data) = data {
            child.extend(scope.resolve_table(data));
        }
        child
    }

    /// [`FlowHandler::act`], keeping in `data.sent` the `stage:template` keys of the messages
    /// sent, so that none is sent twice.
    fn act_once(
        &self,
        scope: &Scope<'_>,
        stage: &str,
        actions: &[Action],
        decision: Decision,
    ) -> Result<Decision, HandlerError> {
        let mut sent = scope
            .command
            .data
            .get("sent")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let before = sent.len();
        let decision = self.act(scope, stage, actions, &mut sent, decision)?;
        if sent.len() == before {
            return Ok(decision);
        }
        Ok(merge_patch(
            decision,
            Map::from_iter([("sent".to_owned(), Value::Array(sent))]),
        ))
    }

    /// Moves the command into `stage`: its hint, its waits, its timers, its actions.
    fn enter(
        &self,
        scope: &Scope<'_>,
        from: Option<&str>,
        stage: &StageDef,
        now: Option<&Value>,
        decision: Decision,
    ) -> Result<Decision, HandlerError> {
        let command = scope.command;
        let mut patch = Map::new();
        patch.insert("stage".into(), json!(stage.name));
        patch.insert(
            "stage_entered_at".into(),
            now.cloned().unwrap_or_else(|| json!(command.updated_at)),
        );
        let mut history = command
            .data
            .get("stages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        history.push(json!(stage.name));
        patch.insert("stages".into(), Value::Array(history));
        let mut decision = merge_patch(decision, patch).stop_waiting();
        if let Some(prev) = from.and_then(|f| self.def.stage(f)) {
            for i in 0..prev.after.len() {
                decision = decision.cancel_timer(&format!("after:{}:{i}", prev.name));
            }
        }
        decision = self.act_once(scope, &stage.name, &stage.on_enter, decision)?;
        if decision.outcome.is_some() {
            return Ok(decision);
        }
        if self.def.finals.contains(&stage.name) {
            return Ok(decision
                .with_outcome(Outcome::Complete(json!({ "stage": stage.name })))
                .with_ui(Value::Null));
        }
        // A stage without a hint shows the person nothing: no raw stage label.
        decision = decision
            .with_state(CommandState::Running)
            .with_ui(match &stage.ui {
                Some(ui) => json!({ "code": ui.code, "text": ui.text, "stage": stage.name }),
                None => Value::Null,
            });
        for (i, after) in stage.after.iter().enumerate() {
            decision = Self::when(
                scope,
                decision,
                &format!("after:{}:{i}", stage.name),
                after.delay.as_deref(),
                after.at.as_deref(),
                after.cron.as_deref(),
                after.tz.as_deref(),
            )?;
        }
        if self.def.is_funnel() {
            let key = command.owner.clone();
            let mut types: Vec<&str> = stage.transitions.iter().map(|t| t.on.as_str()).collect();
            types.sort_unstable();
            types.dedup();
            for ty in types {
                if !types::is_engine_event(ty) && !is_reserved(ty) {
                    decision = decision.wait_for(ty, &key, None);
                }
            }
        }
        Ok(decision)
    }

    /// A transition's data changes: `set` values, then `inc` additions (a number, or a path
    /// to one: a path to anything else is invalid data).
    fn changes(scope: &Scope<'_>, t: &Transition) -> Result<Map<String, Value>, HandlerError> {
        let mut patch = t
            .set
            .as_ref()
            .map(|s| scope.resolve_table(s))
            .unwrap_or_default();
        for (k, by) in t.inc.iter().flatten() {
            let by = match by {
                toml::Value::String(path) => match scope.get(path) {
                    Some(n @ Value::Number(_)) => n,
                    other => {
                        return Err(HandlerError::InvalidData(format!(
                            "inc {k}: {path} is {}, not a number",
                            other.map_or_else(|| "absent".to_owned(), |v| v.to_string())
                        )));
                    }
                },
                other => serde_json::to_value(other).unwrap_or(json!(0)),
            };
            let current = patch
                .get(k)
                .or_else(|| scope.command.data.get(k))
                .cloned()
                .unwrap_or(json!(0));
            let sum = match (current.as_i64(), by.as_i64()) {
                (Some(a), Some(b)) => json!(a.saturating_add(b)),
                _ => json!(current.as_f64().unwrap_or(0.0) + by.as_f64().unwrap_or(0.0)),
            };
            patch.insert(k.clone(), sum);
        }
        Ok(patch)
    }
}

impl Handler for FlowHandler {
    fn decide(&self, command: &Command, event: &Event) -> Result<Decision, HandlerError> {
        // When the event was accepted (the time it is about), else when its sender says it
        // happened.
        let now = event.accepted_at().or(event.time).map(|t| json!(t));
        let scope = Scope::new(command, event);
        let current = command.data.get("stage").and_then(Value::as_str);
        let Some(current) = current else {
            // The first event: the start (a broadcast of `start_on`, or an explicit start).
            let initial = self
                .def
                .stage(&self.def.initial)
                .ok_or_else(|| HandlerError::Refused("no initial stage".into()))?;
            return self.enter(&scope, None, initial, now.as_ref(), Decision::nothing());
        };
        let stage = self.def.stage(current).ok_or_else(|| {
            HandlerError::InvalidData(format!("unknown stage `{current}` in data.stage"))
        })?;
        if event.ty == TIMER_FIRED
            && let Some(name) = event.data.get("name").and_then(Value::as_str)
            && let Some(i) = name
                .strip_prefix(&format!("after:{}:", stage.name))
                .and_then(|i| i.parse::<usize>().ok())
            && let Some(after) = stage.after.get(i)
        {
            let decision =
                self.act_once(&scope, &stage.name, &after.actions, Decision::nothing())?;
            return match after.to.as_deref().and_then(|to| self.def.stage(to)) {
                Some(next) if decision.outcome.is_none() => {
                    self.enter(&scope, Some(&stage.name), next, now.as_ref(), decision)
                }
                _ => Ok(decision),
            };
        }
        let mut matched_type = false;
        for t in &stage.transitions {
            if t.on != event.ty {
                continue;
            }
            matched_type = true;
            if !t.guard.as_ref().is_none_or(|g| scope.holds(g)) {
                continue;
            }
            let changed = Self::changes(&scope, t)?;
            let scope = Scope {
                changed: changed.clone(),
                ..scope
            };
            let decision = merge_patch(Decision::nothing(), changed);
            let decision = self.act_once(&scope, &stage.name, &t.actions, decision)?;
            let next = match &t.to {
                Some(to) => Some(
                    self.def
                        .stage(to)
                        .ok_or_else(|| HandlerError::Refused(format!("unknown stage `{to}`")))?,
                ),
                None => None,
            };
            return match next {
                Some(next) if decision.outcome.is_none() => {
                    self.enter(&scope, Some(&stage.name), next, now.as_ref(), decision)
                }
                _ => Ok(decision),
            };
        }
        if matched_type && self.def.is_funnel() && !is_reserved(&event.ty) {
            // The guard did not hold: keep waiting for the next one.
            return Ok(Decision::nothing().wait_for(&event.ty, &command.owner, None));
        }
        if matched_type
            || event.ty == COMMAND_START
            || self.def.start_on.as_deref() == Some(event.ty.as_str())
            || event.ty == TIMER_FIRED
            || types::is_engine_event(&event.ty)
        {
            return Ok(Decision::nothing());
        }
        Err(HandlerError::unexpected(&self.def.kind(), event))
    }
}
