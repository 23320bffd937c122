//! Every version of every flow a worker has run (the `flow_versions` table). A worker records
//! the versions it starts with and reads back the earlier ones, so that a command finishes on
//! the definition it started with after its file changed; the gateway lists them for the
//! console.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::Result;

/// One version of one flow.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct FlowVersion {
    /// The kind the flow runs as.
    pub kind: String,
    /// Its version: the author's `revision`, or the start of the file's hash.
    pub version: String,
    /// The SHA-256 of the file's text, in hex.
    pub hash: String,
    /// The file it was read from.
    pub file: String,
    /// The file's text.
    pub definition: String,
    /// The flow as a Mermaid state diagram.
    pub mermaid: String,
    /// The flow drawn as an SVG image.
    pub svg: String,
    pub registered_at: DateTime<Utc>,
    /// When a worker last started with it as the kind's current version.
    pub current_at: DateTime<Utc>,
}

/// A version of a flow as a worker loaded it, to record.
#[derive(Debug, Clone, Copy)]
pub struct NewFlowVersion<'a> {
    pub kind: &'a str,
    pub version: &'a str,
    pub hash: &'a str,
    pub file: &'a str,
    pub definition: &'a str,
    pub mermaid: &'a str,
    pub svg: &'a str,
}

/// Records a version a worker starts with as its kind's current one. `Err` text: when the
/// same version of the kind was recorded with another text (an edited file that kept its
/// `revision`), the file that holds the other text.
pub async fn record(
    pool: &PgPool,
    new: NewFlowVersion<'_>,
) -> Result<std::result::Result<(), String>> {
    let row: (String, String) = sqlx::query_as(
        "INSERT INTO flow_versions (kind, version, hash, file, definition, mermaid, svg)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (kind, version) DO UPDATE
            SET current_at = CASE WHEN flow_versions.hash = excluded.hash
                                  THEN now() ELSE flow_versions.current_at END
         RETURNING hash, file",
    )
    .bind(new.kind)
    .bind(new.version)
    .bind(new.hash)
    .bind(new.file)
    .bind(new.definition)
    .bind(new.mermaid)
    .bind(new.svg)
    .fetch_one(pool)
    .await?;
    Ok(if row.0 == new.hash {
        Ok(())
    } else {
        Err(row.1)
    })
}

/// Every version of `kind`, the newest first.
pub async fn versions_of(pool: &PgPool, kind: &str) -> Result<Vec<FlowVersion>> {
    Ok(sqlx::query_as(
        "SELECT * FROM flow_versions WHERE kind = $1 ORDER BY current_at DESC, version",
    )
    .bind(kind)
    .fetch_all(pool)
    .await?)
}

/// Every version of every flow, by kind, the newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<FlowVersion>> {
    Ok(
        sqlx::query_as("SELECT * FROM flow_versions ORDER BY kind, current_at DESC, version")
            .fetch_all(pool)
            .await?,
    )
}

/// How many open commands (and events waiting for a definition) each version of `kind` has.
pub async fn in_flight(pool: &PgPool, kind: &str) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT coalesce(kind_version, '') AS version, count(*) FROM commands
          WHERE kind = $1 AND state IN ('pending', 'running', 'waiting')
          GROUP BY 1 ORDER BY 1",
    )
    .bind(kind)
    .fetch_all(pool)
    .await?)
}
