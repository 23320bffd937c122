//! The per-command mutex: Redlock over the independent Redis masters of `CMDFLOW_REDIS_URLS`
//! (majority quorum, TTL, extension while a handler runs, compare-and-delete release), through
//! the `rslock` crate. Key: `{namespace}:lock:{command_id}`.
//!
//! Redlock is the mutex, not the fence: a lock can be lost to a pause or a Redis failure, so every
//! write is still a guarded update in PostgreSQL (see `store::write_step`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rslock::{LockError as RedlockError, LockManager};
use tokio::task::JoinHandle;

use crate::config::redact_url;
use crate::domain::CommandId;

/// How often a busy lock is tried again while a worker waits for it.
const RETRY_STEP: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("invalid Redis URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot reach a majority of the Redis masters: {0}")]
    NoQuorum(String),
    #[error("Redlock: {0}")]
    Redlock(String),
}

/// Takes and releases per-command locks.
#[derive(Clone)]
pub struct Locks {
    manager: LockManager,
    /// The same masters, tried once (no retries): [`Locks::try_acquire`].
    once: LockManager,
    clients: Vec<(String, redis::Client)>,
    prefix: String,
    ttl: Duration,
    wait: Duration,
}

/// A lock held on one command. Release it explicitly: dropping it leaves the key until its TTL.
pub struct Held {
    lock: rslock::Lock,
    key: String,
    extender: JoinHandle<()>,
    /// Until when the lock is ours for sure: Redlock's validity (TTL less clock drift and the
    /// time taken to acquire), pushed on by each extension, and pulled back to the attempt by
    /// a failed one.
    valid_until: Arc<std::sync::Mutex<Instant>>,
}

impl Held {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the lock is still ours: no extension failed and its validity has not run out (a
    /// process paused past its TTL finds it has). Checked before commit, so a worker that lost
    /// its lock rolls back rather than writes; the guarded update in PostgreSQL stays the fence.
    pub fn is_valid(&self) -> bool {
        Instant::now() < *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops extending the lock, as a paused or stuck process would: it then runs out at its
    /// validity.
    pub fn stop_extending(&self) {
        self.extender.abort();
    }
}

impl Locks {
    pub fn new(
        urls: &[String],
        namespace: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Self, LockError> {
        let clients = urls
            .iter()
            .map(|url| {
                let trusted = crate::tls::trust().filter(|_| url.starts_with("rediss://"));
                match trusted {
                    Some(trust) => redis::Client::build_with_tls(
                        url.as_str(),
                        redis::TlsCertificates {
                            client_tls: None,
                            root_cert: Some(trust.pem.as_bytes().to_vec()),
                        },
                    ),
                    None => redis::Client::open(url.as_str()),
                }
                .map(|c| (redact_url(url), c))
                .map_err(|e| LockError::Url {
                    url: redact_url(url),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut manager =
            LockManager::from_clients(clients.iter().map(|(_, c)| c.clone()).collect());
        // rslock waits a random 0..delay between tries; many short tries keep the wait brief.
        let tries = (wait.as_millis() / (RETRY_STEP.as_millis() / 2).max(1)).clamp(1, 1000) as u32;
        manager.set_retry(tries, RETRY_STEP);
        let mut once = manager.clone();
        once.set_retry(1, RETRY_STEP);
        Ok(Self {
            manager,
            once,
            clients,
            prefix: format!("{namespace}:lock:"),
            ttl,
            wait,
        })
    }

    pub fn key(&self, id: CommandId) -> String {
        format!("{}{}", self.prefix, id)
    }

    /// Pings every master. Ok when a majority answers; the error names the ones that did not.
    pub async fn check_quorum(&self) -> Result<usize, LockError> {
        let results =
            futures::future::join_all(self.clients.iter().map(|(url, client)| async move {
                let ping = async {
                    let mut conn = client.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<String>(&mut conn).await
                };
                match tokio::time::timeout(Duration::from_secs(2), ping).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("{url}: {e}")),
                    Err(_) => Err(format!("{url}: no answer within 2s")),
                }
            }))
            .await;
        let up = results.iter().filter(|r| r.is_ok()).count();
        if up > self.clients.len() / 2 {
            Ok(up)
        } else {
            let down: Vec<String> = results.into_iter().filter_map(Result::err).collect();
            Err(LockError::NoQuorum(format!(
                "cannot connect to Redis at {}",
                down.join("; ")
            )))
        }
    }

    /// Tries to take the lock of `id` for up to the configured wait. `Ok(None)` means busy, or no
    /// majority of masters could be reached: either way, not now.
    pub async fn acquire(&self, id: CommandId) -> Result<Option<Held>, LockError> {
        self.take(&self.manager, id, self.wait).await
    }

    /// One try at the lock of `id`, without waiting: for a batch, which must not hold some
    /// locks while it waits for another (two batches could then wait on each other).
    pub async fn try_acquire(&self, id: CommandId) -> Result<Option<Held>, LockError> {
        self.take(&self.once, id, Duration::ZERO).await
    }

    async fn take(
        &self,
        manager: &LockManager,
        id: CommandId,
        wait: Duration,
    ) -> Result<Option<Held>, LockError> {
        let key = self.key(id);
        let attempt = manager.lock(key.as_bytes(), self.ttl);
        let lock = match tokio::time::timeout(wait + self.ttl / 10, attempt).await {
            Ok(Ok(lock)) => lock,
            Ok(Err(RedlockError::Unavailable | RedlockError::TtlExceeded)) | Err(_) => {
                return Ok(None);
            }
            Ok(Err(e)) => return Err(LockError::Redlock(e.to_string())),
        };
        let valid_until = Arc::new(std::sync::Mutex::new(
            Instant::now() + Duration::from_millis(lock.validity_time as u64),
        ));
        let extender = {
            let manager = self.manager.clone();
            let ttl = self.ttl;
            let valid_until = valid_until.clone();
            let probe = rslock::Lock {
                resource: lock.resource.clone(),
                val: lock.val.clone(),
                validity_time: lock.validity_time,
                lock_manager: manager.clone(),
            };
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let started = Instant::now();
                    let extended = manager.extend(&probe, ttl).await;
                    let mut until = valid_until.lock().unwrap_or_else(|e| e.into_inner());
                    if let Ok(lock) = &extended {
                        *until = started + Duration::from_millis(lock.validity_time as u64);
                    } else {
                        // Someone else may hold it from now on.
                        *until = started;
                        tracing::warn!(lock.key = %String::from_utf8_lossy(&probe.resource), "Could not extend a lock; the guarded update still fences the row.");
                        return;
                    }
                }
            })
        };
        Ok(Some(Held {
            lock,
            key,
            extender,
            valid_until,
        }))
    }

    /// Stops extending and deletes the key on every master where it still holds our value.
    pub async fn release(&self, held: Held) {
        held.extender.abort();
        self.manager.unlock(&held.lock).await;
    }
}
