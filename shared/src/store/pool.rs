//! The pool: connecting (with the timeouts a worker's lock needs), the store's errors and
//! which of them are worth another try.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use crate::config::redact_url;
use crate::domain::CommandId;

pub type Tx<'a> = Transaction<'a, Postgres>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Schema(String),
    #[error("PostgreSQL: {0}")]
    Database(#[from] sqlx::Error),
    #[error("command {id} changed under us (expected version {version})")]
    Conflict { id: CommandId, version: i64 },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// Whether trying again cannot help: PostgreSQL refused the data itself (see
    /// [`is_permanent_sqlstate`]), or a value could not be encoded or decoded. Everything else
    /// (a lost connection, a timeout, a deadlock, a serialization failure, a lock not
    /// available, a shutdown, a fenced update that lost, or a state not known here) may pass
    /// and is tried again.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                db.code().is_some_and(|code| is_permanent_sqlstate(&code))
            }
            StoreError::Database(
                sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. },
            ) => true,
            _ => false,
        }
    }

    /// The SQLSTATE PostgreSQL answered, if it answered one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

/// Whether a SQLSTATE says the statement can never succeed with this data: class 22 (a data
/// exception: an encoding, a range, a malformed value), 23 (an integrity constraint: unique,
/// foreign key, check, not null) or 54 (a program limit: a row or index entry too large).
/// The other classes (08 connection, 40 rollback, 53 resources, 55 lock not available, 57
/// cancelled or shut down, 58 system, XX internal, …) are worth another try.
pub fn is_permanent_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("22" | "23" | "54"))
}

/// How long a connection may sit idle inside a transaction before PostgreSQL aborts it: longer
/// than any handler, and than the default lock TTL (30 s).
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";

/// Opens a pool and checks the server answers, so a wrong URL fails at start-up with one line.
pub async fn connect(url: &str, pool_size: u32) -> Result<PgPool> {
    connect_with_lock_timeout(url, pool_size, None).await
}

/// [`connect`] for a worker whose Redlock TTL is `lock_timeout`: a statement that waits for a row
/// lock, or runs, for 3/4 of the TTL fails instead of going on (a wait that long means the
/// command's lock is about to lapse, and whoever holds the row will hold the lock), and a
/// transaction idle for half the TTL (its process paused, or frozen) is ended by PostgreSQL, so
/// the next holder of the lock is not kept waiting. The event is tried again under a fresh lock.
pub async fn connect_with_lock_timeout(
    url: &str,
    pool_size: u32,
    lock_timeout: Option<Duration>,
) -> Result<PgPool> {
    let connect_err = |source| StoreError::Connect {
        url: redact_url(url),
        source,
    };
    let mut options: PgConnectOptions = url.parse().map_err(connect_err)?;
    if let Some(trust) = crate::tls::trust() {
        options = options.ssl_root_cert(trust.path.as_str());
    }
    // A process stopped mid-transaction (paused, or its host frozen) must not hold its rows
    // for ever: PostgreSQL ends such a transaction, so the others go on.
    options = options.options([(
        "idle_in_transaction_session_timeout",
        IDLE_IN_TRANSACTION_TIMEOUT,
    )]);
    if let Some(ttl) = lock_timeout {
        // A worker's transaction runs under its command's lock: whatever outlives the lock's TTL
        // is ended by PostgreSQL before the TTL passes, so a paused or stalled worker holds the
        // rows for less time than it holds the lock, and the next holder does not wait on it.
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        options = options.options([
            ("lock_timeout", ms(ttl * 3 / 4)),
            ("statement_timeout", ms(ttl * 3 / 4)),
            ("idle_in_transaction_session_timeout", ms(ttl / 2)),
        ]);
    }
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(connect_err)?;
    Ok(pool)
}

/// The engine's mark: the secret cmdflow's processes mark their engine events with
/// ([`crate::bus::Bus::set_engine_mark`]).
pub async fn engine_mark(pool: &PgPool) -> Result<String> {
    Ok(sqlx::query_scalar("SELECT mark FROM engine_mark WHERE id")
        .fetch_one(pool)
        .await?)
}

pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}

#[cfg(test)]
mod error_tests {
    use super::is_permanent_sqlstate;

    #[test]
    fn data_constraint_and_limit_errors_are_permanent_and_the_rest_retried() {
        for permanent in [
            "22P05", "22021", "22003", "23505", "23514", "23503", "54000",
        ] {
            assert!(is_permanent_sqlstate(permanent), "{permanent}");
        }
        for retried in [
            "40001", "40P01", "55P03", "57014", "57P01", "08006", "53300", "XX000", "",
        ] {
            assert!(!is_permanent_sqlstate(retried), "{retried}");
        }
    }
}
