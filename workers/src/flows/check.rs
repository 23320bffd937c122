//! Checking a flow file: every field against the format, the templates and the kinds, so
//! that a file that cannot run stops start-up with its place and reason.

use super::*;

impl FlowDef {
    pub(super) fn validate(
        &self,
        templates: &Templates,
        kinds: &BTreeSet<String>,
    ) -> Result<(), (String, String)> {
        let err = |field: String, reason: String| Err((field, reason));
        if self.version != 1 {
            return err(
                "version".into(),
                format!("{} is not a supported version (1)", self.version),
            );
        }
        match (&self.name, &self.kind) {
            (Some(name), None) => {
                check_dotted_name(name, 1).map_err(|e| ("name".into(), e.to_string()))?;
                if self.start_on.is_none() {
                    return err(
                        "start_on".into(),
                        "a funnel needs the broadcast type that starts it".into(),
                    );
                }
            }
            (None, Some(kind)) => {
                check_dotted_name(kind, 1).map_err(|e| ("kind".into(), e.to_string()))?;
                if kind.starts_with("funnel.") {
                    return err(
                        "kind".into(),
                        "`funnel.` kinds are the funnels': give a funnel a `name` instead".into(),
                    );
                }
                if self.track.is_some() {
                    return err("track".into(), "only a funnel (`name`) has a track".into());
                }
            }
            _ => {
                return err(
                    "kind".into(),
                    "give exactly one of `kind` (a flow) or `name` (a funnel)".into(),
                );
            }
        }
        if let Some(track) = &self.track {
            check_dotted_name(track, 1).map_err(|e| ("track".into(), e.to_string()))?;
        }
        if let Some(start_on) = &self.start_on {
            check_dotted_name(start_on, 2).map_err(|e| ("start_on".into(), e.to_string()))?;
        }
        let mut seen = BTreeSet::new();
        for (i, stage) in self.stages.iter().enumerate() {
            if !seen.insert(stage.name.as_str()) {
                return err(
                    format!("stages[{i}].name"),
                    format!("stage `{}` is defined twice", stage.name),
                );
            }
        }
        if !seen.contains(self.initial.as_str()) {
            return err(
                "initial".into(),
                format!("unknown stage `{}`", self.initial),
            );
        }
        for (i, f) in self.finals.iter().enumerate() {
            if !seen.contains(f.as_str()) {
                return err(format!("final[{i}]"), format!("unknown stage `{f}`"));
            }
        }
        let known = |to: &Option<String>| to.as_ref().is_none_or(|t| seen.contains(t.as_str()));
        for (i, stage) in self.stages.iter().enumerate() {
            let at = |what: &str| format!("stages[{i}] ({}).{what}", stage.name);
            let check_actions = |actions: &[Action], field: &str| {
                actions.iter().enumerate().try_for_each(|(j, a)| {
                    check_action(a, templates, kinds).map_err(|r| (at(&format!("{field}[{j}]")), r))
                })
            };
            check_actions(&stage.on_enter, "on_enter")?;
            for (j, after) in stage.after.iter().enumerate() {
                check_when(
                    after.delay.as_deref(),
                    after.at.as_deref(),
                    after.cron.as_deref(),
                    after.tz.as_deref(),
                )
                .map_err(|r| {
                    let which = match (&after.delay, &after.at, &after.cron) {
                        (Some(_), None, None) => ".delay",
                        (None, Some(_), None) => ".at",
                        (None, None, Some(_)) => ".cron",
                        _ => "",
                    };
                    (at(&format!("after[{j}]{which}")), r)
                })?;
                check_actions(&after.actions, &format!("after[{j}].actions"))?;
                if !known(&after.to) {
                    return err(
                        at(&format!("after[{j}].to")),
                        format!("unknown stage `{}`", after.to.clone().unwrap_or_default()),
                    );
                }
            }
            for (j, t) in stage.transitions.iter().enumerate() {
                if !known(&t.to) {
                    return err(
                        at(&format!("transitions[{j}].to")),
                        format!("unknown stage `{}`", t.to.clone().unwrap_or_default()),
                    );
                }
                check_dotted_name(&t.on, 2)
                    .map_err(|e| (at(&format!("transitions[{j}].on")), e.to_string()))?;
                if let Some(g) = &t.guard {
                    check_guard(g).map_err(|r| (at(&format!("transitions[{j}].guard")), r))?;
                }
                for (field, table) in [("set", &t.set), ("inc", &t.inc)] {
                    let Some(table) = table else { continue };
                    let place = at(&format!("transitions[{j}].{field}"));
                    if let Some(k) = table.keys().find(|k| KEPT.contains(&k.as_str())) {
                        return err(place, format!("`{k}` is kept by the flow itself"));
                    }
                    check_values(table).map_err(|r| (place.clone(), r))?;
                    if field == "inc"
                        && let Some((k, _)) = table.iter().find(|(_, v)| match v {
                            toml::Value::Integer(_) | toml::Value::Float(_) => false,
                            toml::Value::String(s) => !is_path(s),
                            _ => true,
                        })
                    {
                        return err(
                            place,
                            format!(
                                "`{k}` must be a number to add, or a $.event/$.data path to one"
                            ),
                        );
                    }
                }
                check_actions(&t.actions, &format!("transitions[{j}].actions"))?;
            }
            let leaves = !stage.transitions.is_empty()
                || stage.after.iter().any(|a| a.to.is_some())
                || stage
                    .on_enter
                    .iter()
                    .any(|a| matches!(a, Action::Complete { .. } | Action::Fail { .. }));
            if !leaves && !self.finals.contains(&stage.name) {
                return err(
                    at("transitions"),
                    "a stage that is not final needs a way out".into(),
                );
            }
        }
        // Every stage must be reachable from the initial one.
        let mut reached = BTreeSet::from([self.initial.as_str()]);
        let mut queue = VecDeque::from([self.initial.as_str()]);
        while let Some(name) = queue.pop_front() {
            let Some(stage) = self.stage(name) else {
                continue;
            };
            let next = stage
                .transitions
                .iter()
                .filter_map(|t| t.to.as_deref())
                .chain(stage.after.iter().filter_map(|a| a.to.as_deref()));
            for to in next {
                if reached.insert(to) {
                    queue.push_back(to);
                }
            }
        }
        for (i, stage) in self.stages.iter().enumerate() {
            if !reached.contains(stage.name.as_str()) {
                return err(
                    format!("stages[{i}] ({})", stage.name),
                    format!("unreachable from the initial stage `{}`", self.initial),
                );
            }
        }
        Ok(())
    }
}

pub(super) fn parse_delay(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 30m or 3d"))?;
    cmdflow_shared::time::check_delay(d).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err(format!("`{s}` is zero"));
    }
    Ok(d)
}

pub(super) fn is_path(s: &str) -> bool {
    s.starts_with("$.")
}

pub(super) fn check_path(s: &str) -> Result<(), String> {
    let rest = ["$.event", "$.data", "$.command"]
        .iter()
        .find_map(|root| s.strip_prefix(root));
    match rest {
        Some("") if !s.starts_with("$.command") => Ok(()),
        Some(rest) if s.starts_with("$.command") => match rest {
            ".id" | ".owner" | ".kind" => Ok(()),
            _ => Err(format!(
                "`{s}` names no field of the command: use $.command.id, $.command.owner or $.command.kind"
            )),
        },
        Some(rest) if rest.starts_with('.') && rest.len() > 1 => Ok(()),
        _ => Err(format!(
            "`{s}` is not a path: use $.event.<field>, $.data.<field> or $.command.<id|owner|kind>"
        )),
    }
}

/// The timer, as checked: delay, time (or path to one), or cron.
pub(super) fn check_when(
    delay: Option<&str>,
    at: Option<&str>,
    cron: Option<&str>,
    tz: Option<&str>,
) -> Result<(), String> {
    match (delay, at, cron) {
        (Some(d), None, None) if tz.is_none() => parse_delay(d).map(|_| ()),
        (None, Some(at), None) if tz.is_none() => {
            if is_path(at) {
                check_path(at)
            } else {
                chrono::DateTime::parse_from_rfc3339(at)
                    .map(|_| ())
                    .map_err(|e| format!("`{at}` is not an RFC 3339 time ({e})"))
            }
        }
        (None, None, Some(expr)) => {
            cmdflow_shared::time::parse_cron(expr).map_err(|e| e.to_string())?;
            cmdflow_shared::time::parse_zone(tz.unwrap_or("UTC")).map_err(|e| e.to_string())?;
            Ok(())
        }
        (_, _, None) if tz.is_some() => Err("`tz` goes with `cron` only".into()),
        _ => Err("give exactly one of a delay (`after`), `at` or `cron`".into()),
    }
}

pub(super) fn check_values(table: &toml::Table) -> Result<(), String> {
    pub(super) fn walk(v: &toml::Value) -> Result<(), String> {
        match v {
            toml::Value::String(s) if is_path(s) => check_path(s),
            toml::Value::Array(items) => items.iter().try_for_each(walk),
            toml::Value::Table(t) => t.values().try_for_each(walk),
            _ => Ok(()),
        }
    }
    table.values().try_for_each(walk)
}

pub(super) fn check_guard(g: &Guard) -> Result<(), String> {
    if g.path.is_empty() {
        return Err("path is empty".into());
    }
    if is_path(&g.path) {
        check_path(&g.path)?;
    }
    Ok(())
}

/// Whether an event type is the engine's to publish.
pub(super) fn is_reserved(ty: &str) -> bool {
    ["command.", "timer.", "children.", "wait."]
        .iter()
        .any(|p| ty.starts_with(p))
}

pub(super) fn check_action(
    a: &Action,
    templates: &Templates,
    kinds: &BTreeSet<String>,
) -> Result<(), String> {
    let known_kind = |kind: &str| {
        if kinds.contains(kind) {
            Ok(())
        } else {
            Err(format!("cannot spawn unknown kind `{kind}`"))
        }
    };
    match a {
        Action::Send { template, .. } if !templates.contains(template) => Err(format!(
            "missing template `{template}`: register it, or put {template}.txt in CMDFLOW_TEMPLATES_DIR"
        )),
        Action::Send { .. } => Ok(()),
        Action::Timer {
            name,
            after,
            at,
            cron,
            tz,
        } => {
            cmdflow_shared::time::check_name(name).map_err(|e| e.to_string())?;
            check_when(
                after.as_deref(),
                at.as_deref(),
                cron.as_deref(),
                tz.as_deref(),
            )
        }
        Action::CancelTimer { name } => {
            cmdflow_shared::time::check_name(name).map_err(|e| e.to_string())
        }
        Action::Wait {
            event_type,
            key,
            timeout,
        } => {
            check_dotted_name(event_type, 2).map_err(|e| format!("type: {e}"))?;
            if let Some(key) = key.as_deref().filter(|k| is_path(k)) {
                check_path(key).map_err(|e| format!("key: {e}"))?;
            }
            timeout.as_deref().map(parse_delay).transpose().map(|_| ())
        }
        Action::Spawn { kind, data } => {
            known_kind(kind)?;
            data.as_ref().map(check_values).transpose().map(|_| ())
        }
        Action::Group {
            name,
            policy,
            deadline,
            children,
        } => {
            check_dotted_name(name, 1).map_err(|e| format!("name: {e}"))?;
            if let Some(p) = policy {
                FanIn::parse(p).map_err(|e| format!("policy: {e}"))?;
            }
            if let Some(d) = deadline {
                parse_delay(d).map_err(|e| format!("deadline: {e}"))?;
            }
            if children.is_empty() {
                return Err("children: a group needs at least one child".into());
            }
            for (i, c) in children.iter().enumerate() {
                known_kind(&c.kind).map_err(|e| format!("children[{i}]: {e}"))?;
                if let Some(data) = &c.data {
                    check_values(data).map_err(|e| format!("children[{i}].data: {e}"))?;
                }
            }
            Ok(())
        }
        Action::AbortChildren { .. } => Ok(()),
        Action::Emit { event_type, data } => {
            check_dotted_name(event_type, 2).map_err(|e| format!("type: {e}"))?;
            if is_reserved(event_type) {
                return Err(format!(
                    "type: `{event_type}` is cmdflow's own: command.*, timer.*, children.* and wait.* are the engine's"
                ));
            }
            data.as_ref().map(check_values).transpose().map(|_| ())
        }
        Action::Complete { result } => result.as_ref().map(check_values).transpose().map(|_| ()),
        Action::Fail { reason } if reason.trim().is_empty() => Err("reason is empty".into()),
        Action::Fail { .. } => Ok(()),
    }
}
