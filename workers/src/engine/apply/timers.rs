//! Time in a decision: timers set or cancelled, and waits for an event with their timeout.

use super::*;
use cmdflow_shared::store::time::TimerKind;

impl Engine {
    /// Sets and cancels the decision's timers, and registers its waits. A wait whose event
    /// arrived shortly before (within the early-event window) is matched at once.
    pub(super) async fn apply_time(
        &self,
        tx: &mut Tx<'_>,
        command: &Command,
        decision: &Decision,
        out: &mut Vec<Event>,
    ) -> Result<(), ApplyError> {
        let now = self.clock.now();
        for op in &decision.timers {
            match op {
                TimerOp::Set(spec) => self.set_timer(tx, command.id, spec, now).await?,
                TimerOp::Cancel(name) => {
                    time::cancel_timer(tx, command.id, name).await?;
                }
            }
        }
        if decision.stop_waiting {
            time::clear_waits(tx, command.id).await?;
        }
        for wait in &decision.waits {
            self.register_wait(tx, command, wait, now, out).await?;
        }
        Ok(())
    }

    pub(super) async fn set_timer(
        &self,
        tx: &mut Tx<'_>,
        command: CommandId,
        spec: &TimerSpec,
        now: chrono::DateTime<Utc>,
    ) -> Result<(), ApplyError> {
        let due_at = spec
            .first_due(now)
            .map_err(|e| ApplyError::Permanent(format!("timer {}: {e}", spec.name)))?;
        let kind = match &spec.when {
            cmdflow_shared::time::TimerWhen::After(_) => TimerKind::After,
            cmdflow_shared::time::TimerWhen::At(_) => TimerKind::At,
            cmdflow_shared::time::TimerWhen::Cron { .. } => TimerKind::Cron,
        };
        let (cron, tz) = spec.cron().unzip();
        time::upsert_timer(
            tx,
            &NewTimer {
                command,
                name: &spec.name,
                kind,
                due_at,
                cron,
                tz,
                payload: None,
            },
        )
        .await?;
        Ok(())
    }

    pub(super) async fn register_wait(
        &self,
        tx: &mut Tx<'_>,
        command: &Command,
        wait: &WaitSpec,
        now: chrono::DateTime<Utc>,
        out: &mut Vec<Event>,
    ) -> Result<(), ApplyError> {
        time::lock_key(tx, &wait.event_type, &wait.key).await?;
        let window = self.settings.early_event_window;
        // An event about any identity of the person, accepted since the command started.
        let keys = self.linked_keys(tx, &wait.key).await?;
        if let Some(body) = time::early_match(
            tx,
            command.id,
            command.created_at,
            &wait.event_type,
            &keys,
            window,
        )
        .await?
        {
            // The event came first: deliver it now, and register nothing.
            if let Ok(mut early) = serde_json::from_value::<Event>(body) {
                early.commandid = Some(command.id);
                out.push(early);
                return Ok(());
            }
        }
        let timeout_at = wait
            .timeout
            .and_then(|t| chrono::Duration::from_std(t).ok())
            .map(|t| now + t);
        time::insert_wait(tx, command.id, &wait.event_type, &wait.key, timeout_at).await?;
        if let Some(due_at) = timeout_at {
            time::upsert_timer(
                tx,
                &NewTimer {
                    command: command.id,
                    name: &wait_timer_name(&wait.event_type, &wait.key),
                    kind: TimerKind::WaitTimeout,
                    due_at,
                    cron: None,
                    tz: None,
                    payload: Some(json!({ "type": wait.event_type, "key": wait.key })),
                },
            )
            .await?;
        }
        Ok(())
    }
}
