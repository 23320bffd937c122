//! Children and fan-in: spawning (with the limits), counting each child's report into its
//! group once, and the group's verdict, deadline and close.

use super::*;

/// A child to start in its parent's transaction (see [`Engine::spawn`]): its row as created,
/// its start, and the decision its handler made on it.
pub(super) struct Eager {
    pub(super) command: Command,
    /// Its group's reports are `settled`: it counts itself into the group when it ends.
    counts_itself: bool,
    start: Event,
    decision: Decision,
}

impl Engine {
    /// Creates the decision's children as rows in this transaction, opens their groups, and
    /// queues their start events in `out`. Returns the children to start in this transaction.
    ///
    /// A child starts here, with no message, no lock and no dedupe row, its step joining the
    /// parent's commit, when the transaction may start more (`CMDFLOW_EAGER_STARTS` in all),
    /// its kind is decided in this process (a remote decider is asked over the network, never
    /// under the parent's transaction), and its start would be applied on the broker's path:
    /// it passes the start's checks, and its handler decides a legal step within the limits.
    /// Nobody can have sent such a child anything yet (its id is new in this transaction), so
    /// its start is its first event wherever it is applied, and the order promise holds. Any
    /// other child's start goes through the broker, where whatever is wrong with it is handled
    /// as for any event. The history names every start; the step publishes only the others
    /// (see [`Engine::apply_decided`]).
    pub(super) async fn spawn(
        &self,
        w: &mut Writer<'_, '_>,
        parent: &Command,
        cause: &Event,
        decision: &Decision,
        out: &mut Vec<Event>,
        carry: &mut Carry,
    ) -> Result<Vec<Eager>, ApplyError> {
        if decision.spawn_count() == 0 {
            return Ok(Vec::new());
        }
        // Each child's row, start, and whether it counts itself into its group.
        let mut children = Vec::with_capacity(decision.spawn_count());
        let created_at = cause.accepted_at();
        let partitions = self.bus.topology().partitions();
        let mut child = |spec: &ChildSpec, group: Option<&str>, counts_itself: bool| {
            // In the parent's partition: see `bus::id_in_partition_of`.
            let id = cmdflow_shared::bus::id_in_partition_of(parent.id, partitions);
            let owner = spec.owner.clone().unwrap_or_else(|| parent.owner.clone());
            let row = NewCommand {
                id,
                kind: spec.kind.clone(),
                owner: owner.clone(),
                parent_id: Some(parent.id),
                root_id: parent.root_id,
                depth: parent.depth + 1,
                data: Value::Object(spec.data.clone()),
                group_name: group.map(str::to_owned),
                // A fire-and-forget child has no concern for its parent: the parent's end never
                // aborts it (an abort of the parent does).
                parent_close: match group {
                    None => cmdflow_shared::decision::ParentClose::Abandon,
                    Some(_) => spec.parent_close,
                },
                created_at,
                kind_version: self.registry.version_of(&spec.kind).map(str::to_owned),
            };
            let start = obj(json!({
                "kind": spec.kind, "owner": owner, "data": spec.data, "parent_id": parent.id,
            }));
            let start = self.engine_event(parent, cause, COMMAND_START, start, Some(id));
            children.push((row, start, counts_itself));
        };
        for spec in &decision.spawn_detached {
            child(spec, None, false);
        }
        for group in &decision.spawn_groups {
            for spec in &group.children {
                child(spec, Some(&group.name), group.reports == Reports::Settled);
            }
        }
        let now = w.now();
        let (mut rows, mut created, mut eager) = (Vec::new(), Vec::new(), Vec::new());
        for (row, start, counts_itself) in children {
            let command = row.row(now);
            let decided = match carry.starts_left {
                0 => None,
                _ => self.decide_eagerly(&command, &start),
            };
            match decided {
                Some(decision) => {
                    carry.starts_left -= 1;
                    created.push(row);
                    eager.push(Eager {
                        command,
                        counts_itself,
                        start: start.clone(),
                        decision,
                    });
                }
                None => rows.push(row),
            }
            out.push(start);
        }
        store::insert_children(w.tx(), &rows).await?;
        for group in &decision.spawn_groups {
            let quorum = match group.policy {
                FanIn::Quorum(q) => Some(q as i32),
                _ => None,
            };
            let deadline_at = group
                .deadline
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| Utc::now() + d);
            let new = store::NewGroup {
                parent: parent.id,
                name: &group.name,
                policy: group.policy.name(),
                quorum,
                reports: group.reports,
                add_total: group.children.len() as i32,
                deadline_at,
            };
            let row = w.upsert_group(&new).await?.ok_or_else(|| {
                ApplyError::Permanent(format!(
                    "group {} of {} has already settled; spawn into a new group",
                    group.name, parent.id
                ))
            })?;
            if let Some(due_at) = deadline_at {
                time::upsert_timer(
                    w.tx(),
                    &NewTimer {
                        command: parent.id,
                        name: &format!("group:{}", group.name),
                        kind: time::TimerKind::GroupDeadline,
                        due_at,
                        cron: None,
                        tz: None,
                        payload: Some(json!({ "group": group.name })),
                    },
                )
                .await?;
            }
            // An empty group settles at once, so a parent never waits on nothing.
            if row.total == 0 {
                let mut row = row;
                self.settle_if_decided(w, parent, cause, &mut row, out)
                    .await?;
                w.save_group(row).await?;
            }
        }
        // After the groups, whose upsert would write them at once.
        w.create_children(&created).await?;
        Ok(eager)
    }

    /// The decision of a child's handler on its start, when the start can be applied in its
    /// parent's transaction (see [`Engine::spawn`]).
    fn decide_eagerly(&self, child: &Command, start: &Event) -> Option<Decision> {
        if self.registry.remote_decider(&child.kind).is_some() || self.has_parked(child.id) {
            return None;
        }
        self.new_command(child.id, start).ok()?;
        let handler = self
            .registry
            .handler_for(&child.kind, child.kind_version.as_deref())?;
        let decision = handler.decide(child, start).ok()?;
        self.check_limits(child, &decision).ok()?;
        plan(child, start, &decision).ok()?;
        Some(decision)
    }

    /// Applies a child's start in its parent's transaction, as the broker's path would have.
    pub(super) async fn start_eagerly(
        &self,
        w: &mut Writer<'_, '_>,
        eager: Eager,
        carry: &mut Carry,
    ) -> Result<(), ApplyError> {
        let Eager {
            command,
            counts_itself,
            start,
            decision,
        } = eager;
        let span = super::super::event_span(&start);
        span.record("command.id", tracing::field::display(command.id));
        metrics::counter!(cmdflow_shared::metrics::EAGER_STARTS_TOTAL).increment(1);
        let decided = Decided {
            decision,
            out: Vec::new(),
            notes: Vec::new(),
        };
        self.apply_decided(w, command, &start, decided, counts_itself, carry)
            .instrument(span)
            .await?;
        Ok(())
    }

    /// Counts the transaction's reports into their groups, in (parent, group, child) order, and
    /// settles each group its policy decides: its open members are aborted and the parent gets
    /// one `children.settled`.
    pub async fn count_reports(
        &self,
        w: &mut Writer<'_, '_>,
        mut reports: Vec<Report>,
    ) -> Result<(), ApplyError> {
        reports.sort_by(|a, b| (a.parent, &a.group, a.child).cmp(&(b.parent, &b.group, b.child)));
        for r in reports {
            let child = r.child.to_string();
            let mut group = match w
                .count_report(r.parent, &r.group, &child, r.state, &r.outcome)
                .await?
            {
                store::Counted::Counted(group) => group,
                store::Counted::AlreadyReported | store::Counted::NoGroup => continue,
            };
            if group.state != GroupState::Open {
                tracing::debug!(group = %group.name, state = %group.state, "Counted into a group that had already ended.");
                w.counted(*group, false).await?;
                continue;
            }
            let verdict = verdict_of(&group);
            if verdict == Verdict::Open {
                w.counted(*group, false).await?;
                continue;
            }
            let Some(parent) = w.command(r.parent).await? else {
                tracing::warn!(parent = %r.parent, group = %group.name, "A group decided by a child's report has no live parent; left as it is.");
                w.counted(*group, false).await?;
                continue;
            };
            let reason = format!("group {} settled ({})", group.name, verdict.as_str());
            let mut out = Vec::new();
            self.close_group(
                w, &parent, &r.cause, &mut group, verdict, &reason, false, &mut out,
            )
            .await?;
            w.counted(*group, true).await?;
            w.outbox(r.child, &out).await?;
        }
        Ok(())
    }

    /// Folds a child's ACK into its group: counts it once, and settles the group when its policy
    /// says so.
    pub(super) async fn fold_ack(
        &self,
        w: &mut Writer<'_, '_>,
        parent: &Command,
        event: &Event,
        out: &mut Vec<Event>,
        notes: &mut Vec<String>,
    ) -> Result<(), ApplyError> {
        let ack: AckData = match serde_json::from_value(Value::Object(event.data.clone())) {
            Ok(ack) => ack,
            Err(e) => {
                notes.push(format!("not a child's report ({e}); no group counted it"));
                return Ok(());
            }
        };
        let state = match event.ty.as_str() {
            COMMAND_COMPLETED => "completed",
            COMMAND_FAILED => "failed",
            COMMAND_ABORTED => "aborted",
            _ => return Ok(()),
        };
        let mut outcome = ended(state, ack.result, ack.reason);
        outcome.insert("state".into(), json!(state));
        outcome.insert("kind".into(), json!(ack.kind));
        let child = ack.child_id.to_string();
        let outcome = Value::Object(outcome);
        let counted = w
            .count_report(parent.id, &ack.group, &child, state, &outcome)
            .await?;
        let mut group = match counted {
            store::Counted::Counted(group) => group,
            store::Counted::AlreadyReported => {
                notes.push(format!("child {child} has already reported; counted once"));
                return Ok(());
            }
            store::Counted::NoGroup => {
                notes.push(format!("no group {} on this command", ack.group));
                return Ok(());
            }
        };
        if group.state != GroupState::Open {
            notes.push(format!("group {} had already {}", group.name, group.state));
            w.counted(*group, false).await?;
            return Ok(());
        }
        self.settle_if_decided(w, parent, event, &mut group, out)
            .await?;
        // Settled by this report, if its verdict is in: saved with it.
        let settled = group.state != GroupState::Open;
        w.counted(*group, settled).await?;
        Ok(())
    }

    /// When the group's policy decides it, freezes it, aborts its open members, and tells the
    /// parent with one `children.settled` event.
    pub(super) async fn settle_if_decided(
        &self,
        w: &mut Writer<'_, '_>,
        parent: &Command,
        cause: &Event,
        group: &mut GroupRow,
        out: &mut Vec<Event>,
    ) -> Result<(), ApplyError> {
        let verdict = verdict_of(group);
        if verdict == Verdict::Open {
            return Ok(());
        }
        let reason = format!("group {} settled ({})", group.name, verdict.as_str());
        self.close_group(w, parent, cause, group, verdict, &reason, false, out)
            .await
    }

    /// Freezes a group at its verdict, cancels its deadline, aborts its open members, and tells
    /// the parent with one `children.settled` event.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn close_group(
        &self,
        w: &mut Writer<'_, '_>,
        parent: &Command,
        cause: &Event,
        group: &mut GroupRow,
        verdict: Verdict,
        reason: &str,
        deadline: bool,
        out: &mut Vec<Event>,
    ) -> Result<(), ApplyError> {
        group.state = verdict.into();
        time::cancel_timer(w.tx(), parent.id, &format!("group:{}", group.name)).await?;
        for id in w.open_children(parent.id, Some(&group.name), false).await? {
            let data = obj(json!({ "reason": reason }));
            out.push(self.engine_event(parent, cause, COMMAND_ABORT, data, Some(id)));
        }
        let data = obj(json!({
            "group": group.name,
            "policy": group.policy,
            "quorum": group.quorum,
            "outcome": verdict.as_str(),
            "deadline": deadline,
            "total": group.total,
            "completed": group.completed,
            "failed": group.failed,
            "aborted": group.aborted,
            "outcomes": group.outcomes,
        }));
        out.push(self.engine_event(parent, cause, CHILDREN_SETTLED, data, Some(parent.id)));
        Ok(())
    }

    /// A group's deadline passed: if it is still open, it fails and its open children are aborted.
    pub(super) async fn group_deadline(
        &self,
        w: &mut Writer<'_, '_>,
        parent: &Command,
        event: &Event,
        out: &mut Vec<Event>,
        notes: &mut Vec<String>,
    ) -> Result<(), ApplyError> {
        let Some(name) = event.data.get("group").and_then(Value::as_str) else {
            notes.push("a deadline without a group".to_owned());
            return Ok(());
        };
        let Some(mut group) = w.lock_group(parent.id, name).await? else {
            notes.push(format!("no group {name} on this command"));
            return Ok(());
        };
        if group.state != GroupState::Open {
            notes.push(format!("group {name} had already {}", group.state));
            return Ok(());
        }
        let reason = format!("group {name} missed its deadline");
        self.close_group(
            w,
            parent,
            event,
            &mut group,
            Verdict::Failed,
            &reason,
            true,
            out,
        )
        .await?;
        w.save_group(group).await?;
        Ok(())
    }
}
