//! Broadcast events: the kinds a type starts (one funnel per person and track), the waits a
//! person's event wakes across their linked identities, the early-event window, identity links
//! and what they catch up, and the unmatched list.

use cmdflow_shared::contract::types::OWNER_LINKED;
use cmdflow_shared::domain::Owner;
use cmdflow_shared::store::time;
use cmdflow_shared::store::{self, NewCommand, Tx, Writer};
use cmdflow_shared::{CommandId, Event};
use serde_json::Value;

use super::apply::wait_timer_name;
use super::{Applied, ApplyError, Engine};

/// The advisory lock a broadcast takes on its correlation key, and an `owner.linked` on every
/// identity it joins: an event about a person is matched either wholly before a link of theirs
/// or wholly after it, never half-way (its keys read before the link, the link's catch-up run
/// before the event is kept).
const IDENTITY_LOCK: &str = "identity";

impl Engine {
    /// Handles a broadcast event: starts the kinds registered for its type (one new command per
    /// kind, at most once per event, owned by the event's `subject`), wakes every command waiting
    /// for its (type, correlation id), keeps it for the early-event window, and records it as
    /// unmatched when it did neither.
    pub async fn apply_broadcast(
        &self,
        w: &mut Writer<'_, '_>,
        event: &Event,
        kinds: &[String],
        carry: &mut super::apply::Carry,
    ) -> Result<Applied, ApplyError> {
        let mut applied = Applied::Duplicate;
        let mut matched = !kinds.is_empty();
        if !kinds.is_empty() {
            let owner = event
                .subject
                .as_deref()
                .ok_or_else(|| {
                    ApplyError::Permanent(format!(
                        "{} starts a command, so it needs `subject` set to the owner (such as visitor:cookie-7f3a)",
                        event.ty
                    ))
                })
                .and_then(|s| {
                    Owner::parse(s).map_err(|e| ApplyError::Permanent(format!("subject: {e}")))
                })?;
            for kind in kinds {
                let id = CommandId::new();
                if !store::record_event_start(w.tx(), &event.source, &event.id, kind, id).await? {
                    continue;
                }
                if self
                    .in_track_already(w.tx(), &owner, kind, &event.ty)
                    .await?
                {
                    // One open funnel per person and track: this person is on it already.
                    matched = true;
                    continue;
                }
                let new = NewCommand {
                    id,
                    kind: kind.clone(),
                    owner: owner.to_string(),
                    parent_id: None,
                    root_id: id,
                    depth: 0,
                    data: Value::Object(event.data.clone()),
                    group_name: None,
                    parent_close: cmdflow_shared::decision::ParentClose::Abort,
                    created_at: event.accepted_at(),
                    kind_version: self.registry.version_of(kind).map(str::to_owned),
                };
                store::insert_command(w.tx(), &new).await?;
                // Just created: the event is new to it.
                let locked = w
                    .lock_and_mark(id, &event.source, &event.id)
                    .await?
                    .ok_or(ApplyError::NotFound(id))?;
                // A root: it has no group to report to.
                self.decide_and_apply(w, locked.command, event, false, carry)
                    .await?;
                applied = Applied::Applied;
            }
        }
        if event.ty == OWNER_LINKED {
            let field = |name: &str| {
                event
                    .data
                    .get(name)
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApplyError::Permanent(format!(
                            "owner.linked needs data.{name}, an owner such as member:42"
                        ))
                    })
                    .and_then(|s| {
                        Owner::parse(s).map_err(|e| {
                            ApplyError::Permanent(format!("owner.linked data.{name}: {e}"))
                        })
                    })
            };
            let (from, to) = (field("from")?, field("to")?);
            // Through the gateway, the caller; straight from an allowed source, that source.
            let by = match event.extensions.get(cmdflow_shared::contract::LINKED_BY) {
                Some(Value::String(by)) => format!("{by} (from {})", event.source),
                _ => format!("source:{}", event.source),
            };
            // A broadcast about any of these identities is decided either wholly before the link
            // or wholly after it (see `IDENTITY_LOCK`).
            let tx = w.tx();
            let mut both = store::people::owners_of(&mut **tx, &from.to_string()).await?;
            both.extend(store::people::owners_of(&mut **tx, &to.to_string()).await?);
            both.sort();
            both.dedup();
            for key in &both {
                time::lock_key(tx, IDENTITY_LOCK, key).await?;
            }
            store::people::link(tx, &from.to_string(), &to.to_string(), &by, &event.id).await?;
            // What the person did as one identity, before the link reached a worker, now
            // reaches the waits on the others. The joined person's identities are `both`: the
            // link moved all of `from`'s to `to`'s person.
            let window = self.settings.early_event_window;
            for (waiter, ty, key, body) in time::take_across_link(w.tx(), &both, window).await? {
                time::cancel_timer(w.tx(), waiter, &wait_timer_name(&ty, &key)).await?;
                if let Ok(mut woken) = serde_json::from_value::<Event>(body) {
                    woken.commandid = Some(waiter);
                    w.outbox(waiter, std::slice::from_ref(&woken)).await?;
                }
            }
            matched = true;
            applied = Applied::Applied;
        }
        let body = serde_json::to_value(event).unwrap_or(Value::Null);
        if let Some(key) = &event.correlationid {
            // A person's event wakes the waits on every identity linked to them, as linked when
            // it is decided: a link being applied for it waits, or is waited for.
            let tx = w.tx();
            time::lock_key(tx, IDENTITY_LOCK, key).await?;
            let keys = self.linked_keys(tx, key).await?;
            for k in &keys {
                time::lock_key(tx, &event.ty, k).await?;
            }
            if time::record_recent(w.tx(), event, key, &body).await? {
                for k in &keys {
                    for waiter in time::take_waiters(w.tx(), &event.ty, k).await? {
                        time::cancel_timer(w.tx(), waiter, &wait_timer_name(&event.ty, k)).await?;
                        let mut copy = event.clone();
                        copy.commandid = Some(waiter);
                        w.outbox(waiter, std::slice::from_ref(&copy)).await?;
                        matched = true;
                        applied = Applied::Applied;
                    }
                }
            } else {
                // Seen before: its waiters were woken then.
                matched = true;
            }
        }
        if !matched {
            time::record_unmatched(
                w.tx(),
                &event.source,
                &event.id,
                &event.ty,
                event.correlationid.as_deref(),
                &body,
            )
            .await?;
            tracing::info!(event.type = %event.ty, "A broadcast event matched nothing; kept as unmatched.");
            applied = Applied::Unmatched;
        }
        Ok(applied)
    }

    /// Every identity linked to `key` when it names an owner (`lead:alice`), sorted; else
    /// `key` alone.
    pub(super) async fn linked_keys(
        &self,
        tx: &mut Tx<'_>,
        key: &str,
    ) -> Result<Vec<String>, ApplyError> {
        if Owner::parse(key).is_err() {
            return Ok(vec![key.to_owned()]);
        }
        Ok(store::people::owners_of(&mut **tx, key).await?)
    }

    /// Whether `owner` (by any linked identity) is already on the track of the funnel `kind`:
    /// in an open funnel of it that this event (`ty`) does not move to a final stage. Takes the
    /// person's track lock, so two starts for one person are decided one after the other. A
    /// kind that is not a funnel is on no track.
    async fn in_track_already(
        &self,
        tx: &mut Tx<'_>,
        owner: &Owner,
        kind: &str,
        ty: &str,
    ) -> Result<bool, ApplyError> {
        let Some(def) = self.registry.funnel(kind) else {
            return Ok(false);
        };
        let owners = store::people::owners_of(&mut **tx, &owner.to_string()).await?;
        let Some(track) = def.track() else {
            return Ok(false);
        };
        time::lock_key(tx, &format!("funnel.track.{track}"), &owners[0]).await?;
        let open = store::people::open_in(tx, &owners, &self.registry.track_kinds(track)).await?;
        Ok(open.iter().any(|(kind, stage)| {
            let ending = match (self.registry.funnel(kind), stage) {
                (Some(def), Some(stage)) => def.ends_on(stage, ty),
                _ => false,
            };
            !ending
        }))
    }
}
