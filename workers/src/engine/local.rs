//! One event per command at a time inside this worker, before Redis is asked.
//!
//! Two deliveries for the same command in one worker would otherwise both ask Redlock, and the
//! loser would wait out retries or go round the busy delay. Here the second waits in line, in
//! order, and only one of them contends in Redis with the other workers. Batches take several
//! of these in ascending id order, so two batches never wait on each other in a cycle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cmdflow_shared::CommandId;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct LocalLocks {
    slots: Mutex<HashMap<CommandId, Arc<AsyncMutex<()>>>>,
}

/// Held until dropped; the slot is removed when nobody else waits for it.
pub struct LocalGuard<'a> {
    owner: &'a LocalLocks,
    id: CommandId,
    guard: Option<OwnedMutexGuard<()>>,
}

impl LocalLocks {
    /// Waits for the command's turn in this worker.
    pub async fn lock(&self, id: CommandId) -> LocalGuard<'_> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(slots.entry(id).or_default())
        };
        let guard = slot.lock_owned().await;
        LocalGuard {
            owner: self,
            id,
            guard: Some(guard),
        }
    }

    /// Commands with a slot: held or waited for.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        let mut slots = self.owner.slots.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Every waiter holds a clone of the slot, taken under this same mutex: if only the map
        // holds it now, nobody waits.
        if slots
            .get(&self.id)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            slots.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_at_a_time_per_command_and_no_slot_left_behind() {
        let locks = Arc::new(LocalLocks::default());
        let id = CommandId::new();
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (locks, inside, most) = (locks.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    let _turn = locks.lock(id).await;
                    let now = inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(locks.is_empty(), "{} slots left", locks.len());
    }

    #[tokio::test]
    async fn different_commands_do_not_wait_for_each_other() {
        let locks = LocalLocks::default();
        let a = locks.lock(CommandId::new()).await;
        let b = tokio::time::timeout(Duration::from_secs(1), locks.lock(CommandId::new())).await;
        assert!(b.is_ok(), "a second command waited for the first");
        drop((a, b));
        assert!(locks.is_empty());
    }
}
