//! The kinds the gateway knows: the catalogue that workers publish into PostgreSQL, cached here
//! with each kind's compiled start-data schema. The gateway links no handler code: a kind a
//! worker has just registered is found at the next read of the catalogue.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cmdflow_shared::schema::StartCheck;
use cmdflow_shared::store::{self, StoreError, kinds::KindInfo};
use sqlx::PgPool;
use tokio::sync::Mutex;

/// How long a read of the catalogue is used before it is read again.
const FRESH_FOR: Duration = Duration::from_secs(5);
/// The soonest a lookup of an unknown kind reads the catalogue again.
const MISS_EVERY: Duration = Duration::from_millis(500);

/// A known kind, with its compiled schema.
pub struct KnownKind {
    pub info: KindInfo,
    /// `None` when the stored schema does not compile (then starts are refused, naming why).
    pub check: Result<StartCheck, String>,
}

struct Snapshot {
    kinds: BTreeMap<String, Arc<KnownKind>>,
    read_at: Instant,
}

/// The cached catalogue.
pub struct Catalogue {
    pool: PgPool,
    snapshot: Mutex<Option<Snapshot>>,
}

/// The answer to a lookup.
pub enum Lookup {
    Known(Arc<KnownKind>),
    /// Not in the catalogue: the names it has, for the error.
    Unknown(Vec<String>),
}

impl Catalogue {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            snapshot: Mutex::new(None),
        }
    }

    /// Finds `kind`, reading the catalogue again when the cached one is old, or lacks it and
    /// was read more than a moment ago (a worker with a new kind may have started since).
    pub async fn lookup(&self, kind: &str) -> Result<Lookup, StoreError> {
        let mut snapshot = self.snapshot.lock().await;
        let stale = snapshot.as_ref().is_none_or(|s| {
            let age = s.read_at.elapsed();
            age > FRESH_FOR || (!s.kinds.contains_key(kind) && age > MISS_EVERY)
        });
        if stale {
            *snapshot = Some(self.read().await?);
        }
        let kinds = snapshot.as_ref().map(|s| &s.kinds);
        Ok(match kinds.and_then(|k| k.get(kind)) {
            Some(known) => Lookup::Known(Arc::clone(known)),
            None => Lookup::Unknown(
                kinds
                    .map(|k| k.keys().cloned().collect())
                    .unwrap_or_default(),
            ),
        })
    }

    /// The whole catalogue, read now.
    pub async fn list(&self) -> Result<Vec<KindInfo>, StoreError> {
        let read = self.read().await?;
        let list = read.kinds.values().map(|k| k.info.clone()).collect();
        *self.snapshot.lock().await = Some(read);
        Ok(list)
    }

    async fn read(&self) -> Result<Snapshot, StoreError> {
        let kinds = store::kinds::list(&self.pool)
            .await?
            .into_iter()
            .map(|info| {
                let check = StartCheck::compile(&info.schema).map_err(|e| e.to_string());
                (info.name.clone(), Arc::new(KnownKind { info, check }))
            })
            .collect();
        Ok(Snapshot {
            kinds,
            read_at: Instant::now(),
        })
    }
}
