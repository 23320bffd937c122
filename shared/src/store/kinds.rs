//! The kind catalogue: every kind a worker can run, with the JSON Schema of its start data, the
//! broadcast types that start it and its version. Workers publish it at start-up; the gateway,
//! which links no handler code, reads it to check `POST /v1/commands` and to list the kinds.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;

use super::Result;

/// How a kind is defined.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[sqlx(type_name = "kind_source", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum KindSource {
    /// A handler compiled into a binary (a Rust workflow).
    Rust,
    /// A funnel definition (a data file).
    Funnel,
    /// A decider in another service, called over HTTP.
    Remote,
    /// A flow definition (a data file) that is not a funnel.
    Flow,
}

/// One entry of the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct KindInfo {
    /// The kind's name, such as `purchase.approval`.
    pub name: String,
    /// JSON Schema of the start data.
    #[schema(value_type = Object)]
    pub schema: Value,
    /// Broadcast event types that start a command of this kind.
    pub starts_on: Vec<String>,
    /// The kind's own version.
    pub version: String,
    /// The build of the binary that published it last.
    pub build: String,
    pub source: KindSource,
    /// What the kind is for, in a sentence.
    pub description: Option<String>,
    pub published_at: DateTime<Utc>,
}

/// Publishes (inserts or replaces) `kinds`, in one statement. Kinds another binary published
/// stay: several deployments may each run their own kinds against one database.
pub async fn publish(pool: &PgPool, kinds: &[KindInfo]) -> Result<()> {
    let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(
        "INSERT INTO kinds (name, schema, starts_on, version, build, source, description) ",
    );
    qb.push_values(kinds, |mut row, k| {
        row.push_bind(&k.name)
            .push_bind(&k.schema)
            .push_bind(&k.starts_on)
            .push_bind(&k.version)
            .push_bind(&k.build)
            .push_bind(k.source)
            .push_bind(&k.description);
    });
    qb.push(
        " ON CONFLICT (name) DO UPDATE SET schema = excluded.schema, starts_on = excluded.starts_on,
          version = excluded.version, build = excluded.build, source = excluded.source,
          description = excluded.description, published_at = now()",
    );
    if !kinds.is_empty() {
        qb.build().execute(pool).await?;
    }
    Ok(())
}

/// The whole catalogue, by name.
pub async fn list(pool: &PgPool) -> Result<Vec<KindInfo>> {
    Ok(sqlx::query_as::<_, KindInfo>(
        "SELECT name, schema, starts_on, version, build, source, description, published_at
           FROM kinds ORDER BY name",
    )
    .fetch_all(pool)
    .await?)
}
