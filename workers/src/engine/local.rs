//! One event per command at a time inside this worker, before Redis is asked.
//!
//! Two deliveries for the same command in one worker would otherwise both ask Redlock. Here the
//! second waits in line, in order, and only one of them contends in Redis. The consume loop
//! takes each batch's turns before it starts the batch, in the order the deliveries came, so a
//! command's events are applied in that order. Batches take their turns in ascending id order,
//! all at once, so two batches never wait on each other in a cycle. Turns are owned (`'static`):
//! a batch's task, or the retry lane of a command, carries them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use cmdflow_shared::CommandId;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct LocalLocks {
    slots: Mutex<HashMap<CommandId, Arc<AsyncMutex<()>>>>,
}

/// Held until dropped; the slot is removed when nobody else waits for it.
pub struct LocalGuard {
    owner: Arc<LocalLocks>,
    id: CommandId,
    guard: Option<OwnedMutexGuard<()>>,
}

impl LocalGuard {
    /// The command whose turn this is.
    pub fn id(&self) -> CommandId {
        self.id
    }
}

/// A turn queued for by [`LocalLocks::take_all`], not yet come.
pub struct Queued {
    owner: Arc<LocalLocks>,
    id: CommandId,
    turn: Option<Pin<Box<dyn Future<Output = OwnedMutexGuard<()>> + Send>>>,
}

/// A command's turn, taken at once or queued for.
pub enum Turn {
    Held(LocalGuard),
    Queued(Queued),
}

impl LocalLocks {
    /// Waits for the command's turn in this worker.
    pub async fn lock(self: &Arc<Self>, id: CommandId) -> LocalGuard {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(slots.entry(id).or_default())
        };
        let guard = slot.lock_owned().await;
        LocalGuard {
            owner: Arc::clone(self),
            id,
            guard: Some(guard),
        }
    }

    /// Takes the turns of `ids` (ascending, each once) without waiting: the free ones are held
    /// now, the others queued for in line, to be awaited with [`Queued::come`].
    ///
    /// Every batch queues for all its commands in one step under the map's mutex, so any two
    /// batches stand in the same order in every line they share. A batch waits only for batches
    /// that queued before it, and those never for it: no cycle, and a command's events are
    /// still handled in the order this worker received them.
    pub fn take_all(self: &Arc<Self>, ids: &[CommandId]) -> (Vec<LocalGuard>, Vec<Queued>) {
        let mut held = Vec::new();
        let mut queued = Vec::new();
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Polled once here, with a waker that does nothing: that puts the turn in line (or takes
        // it when free). Awaited later, the same future answers to the real waker.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for &id in ids {
            let slot = Arc::clone(slots.entry(id).or_default());
            let mut turn: Pin<Box<dyn Future<Output = OwnedMutexGuard<()>> + Send>> =
                Box::pin(slot.lock_owned());
            match turn.as_mut().poll(&mut cx) {
                Poll::Ready(guard) => held.push(LocalGuard {
                    owner: Arc::clone(self),
                    id,
                    guard: Some(guard),
                }),
                Poll::Pending => queued.push(Queued {
                    owner: Arc::clone(self),
                    id,
                    turn: Some(turn),
                }),
            }
        }
        drop(slots);
        (held, queued)
    }

    /// [`LocalLocks::take_all`], as one [`Turn`] per command, by id.
    pub fn turns(
        self: &Arc<Self>,
        ids: &[CommandId],
    ) -> std::collections::BTreeMap<CommandId, Turn> {
        let (held, queued) = self.take_all(ids);
        held.into_iter()
            .map(|g| (g.id, Turn::Held(g)))
            .chain(queued.into_iter().map(|q| (q.id, Turn::Queued(q))))
            .collect()
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

impl Queued {
    /// Waits until the turn comes.
    pub async fn come(mut self) -> LocalGuard {
        let guard = match self.turn.take() {
            Some(turn) => Some(turn.await),
            None => None,
        };
        LocalGuard {
            owner: Arc::clone(&self.owner),
            id: self.id,
            guard,
        }
    }
}

impl LocalLocks {
    /// Drops what `turn` held (a guard, or a place in line), and the command's slot when
    /// nobody else holds or waits for it.
    fn leave<T>(&self, id: CommandId, turn: Option<T>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        drop(turn);
        // Every waiter holds a clone of the slot, taken under this same mutex: if only the map
        // holds it now, nobody waits.
        if slots
            .get(&id)
            .is_some_and(|slot| Arc::strong_count(slot) == 1)
        {
            slots.remove(&id);
        }
    }
}

impl Drop for LocalGuard {
    fn drop(&mut self) {
        self.owner.leave(self.id, self.guard.take());
    }
}

/// A place in line given up (the batch ended before its turn came) is left, and so is the turn
/// if it had come meanwhile.
impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(turn) = self.turn.take() {
            self.owner.leave(self.id, Some(turn));
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

    /// Two batches that share two commands, one of them held by a third party: the batch that
    /// queued first gets both before the second, and neither waits on the other in a cycle.
    #[tokio::test]
    async fn batches_queue_in_one_order_and_never_wait_in_a_cycle() {
        use futures::FutureExt;
        let locks = Arc::new(LocalLocks::default());
        let mut ids = vec![CommandId::new(), CommandId::new()];
        ids.sort();
        let holder = locks.lock(ids[0]).await;

        let (first_held, mut first_queued) = locks.take_all(&ids);
        assert_eq!(first_held.len(), 1, "the free command is held at once");
        assert_eq!(first_queued.len(), 1, "the busy one is queued for");
        let (second_held, second_queued) = locks.take_all(&ids);
        assert!(second_held.is_empty());
        assert_eq!(second_queued.len(), 2);
        let mut second = Box::pin(async move {
            let mut turns = Vec::new();
            for turn in second_queued {
                turns.push(turn.come().await);
            }
            turns
        });
        assert!((&mut second).now_or_never().is_none());

        drop(holder);
        let first_turn =
            tokio::time::timeout(Duration::from_secs(1), first_queued.remove(0).come())
                .await
                .expect("the first batch's turn comes once the holder leaves");
        assert!(
            (&mut second).now_or_never().is_none(),
            "the second batch waits for the first"
        );
        drop((first_held, first_turn));
        let turns = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("the second batch's turns come once the first leaves");
        assert_eq!(turns.len(), 2);
        drop(turns);
        assert!(locks.is_empty(), "{} slots left", locks.len());
    }

    #[tokio::test]
    async fn different_commands_do_not_wait_for_each_other() {
        let locks = Arc::new(LocalLocks::default());
        let a = locks.lock(CommandId::new()).await;
        let b = tokio::time::timeout(Duration::from_secs(1), locks.lock(CommandId::new())).await;
        assert!(b.is_ok(), "a second command waited for the first");
        drop((a, b));
        assert!(locks.is_empty());
    }
}
