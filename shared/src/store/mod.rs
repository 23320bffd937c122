//! PostgreSQL: every statement cmdflow runs, by what it is about.
//!
//! Writes under a lock are still fenced: [`write_step`] only succeeds at the version the
//! transaction read, so a worker that lost its lock to a pause cannot overwrite a newer state.
//!
//! - [`pool`]: connecting, the store's errors and which are worth another try;
//! - [`schema`]: migrations, and the databases a binary may run against;
//! - [`commands`]: command rows, created, read, and locked with their events' dedupe rows;
//! - [`groups`]: fan-in groups and the reports that count each child once;
//! - [`steps`]: fenced steps, kept back by a batch and flushed together;
//! - [`writer`]: the apply code's way to its transaction, which flushes kept-back steps before
//!   a read that could miss them;
//! - [`history`](mod@history): a command's history;
//! - [`outbox`]: events decided in a step, published after its commit, swept when unconfirmed;
//! - the rest by area: [`dead`] letters, [`time`] (timers and waits), [`people`] (the owner
//!   feed), [`partitions`], [`kinds`], [`flows`], [`archive`], [`console`].

/// Reads and writes an enum as the `text` of a column with a CHECK of its names (the schema's
/// way for every state but the command's): `$ty` has `as_str(self) -> &'static str` and
/// `parse(&str) -> Option<Self>`, or they are written from the words given after the name. A value outside the enum reads as an error naming it. Kept as
/// text, not a PostgreSQL enum type, so the release before can still read and write the column
/// (`scripts/rollback-test.sh`).
macro_rules! text_enum {
    // With its words: also writes `ALL`, `as_str`, `parse` and `Display` from them.
    ($ty:ident, $what:literal, { $($variant:ident => $word:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: [$ty; [$($word),+].len()] = [$(Self::$variant),+];

            /// The column's word.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $word),+
                }
            }

            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.into_iter().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        text_enum!($ty, $what);
    };
    ($ty:ty, $what:literal) => {
        impl sqlx::Type<sqlx::Postgres> for $ty {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, sqlx::Postgres> for $ty {
            fn decode(
                value: sqlx::postgres::PgValueRef<'r>,
            ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
                let s = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                <$ty>::parse(s)
                    .ok_or_else(|| format!(concat!("unknown ", $what, " `{}`"), s).into())
            }
        }

        impl sqlx::Encode<'_, sqlx::Postgres> for $ty {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode(self.as_str(), buf)
            }
        }
    };
}
pub mod commands;
pub mod groups;
pub mod history;
pub mod outbox;
pub mod pool;
pub mod schema;
pub mod steps;
pub mod writer;

pub use commands::*;
pub use groups::*;
pub use history::*;
pub use outbox::*;
pub use pool::*;
pub use schema::*;
pub(crate) use steps::*;
pub use writer::*;

pub mod archive;
pub mod console;
pub mod dead;
pub mod flows;
pub mod kinds;
pub mod partitions;
pub mod people;
pub mod time;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{ParentClose, Reports};

    /// Each of `values` reads back from its column's word, the API (JSON) shows that same word,
    /// and `unknown` reads as none of them.
    fn reads_back_as_written<T>(
        values: &[T],
        as_str: fn(T) -> &'static str,
        parse: fn(&str) -> Option<T>,
        unknown: &str,
    ) where
        T: Copy + PartialEq + std::fmt::Debug + serde::Serialize,
    {
        for &value in values {
            assert_eq!(parse(as_str(value)), Some(value));
            let json = serde_json::to_value(value).unwrap_or_default();
            assert_eq!(json, as_str(value), "the API shows the column's word");
        }
        assert_eq!(parse(unknown), None, "{unknown}");
    }

    #[test]
    fn every_text_enum_reads_back_as_it_was_written() {
        reads_back_as_written(
            &GroupState::ALL,
            GroupState::as_str,
            GroupState::parse,
            "settled",
        );
        reads_back_as_written(
            &[Reports::Each, Reports::Settled],
            Reports::as_str,
            Reports::parse,
            "batched",
        );
        reads_back_as_written(
            &time::TimerKind::ALL,
            time::TimerKind::as_str,
            time::TimerKind::parse,
            "deadline",
        );
        reads_back_as_written(
            &[ParentClose::Abort, ParentClose::Abandon],
            ParentClose::as_str,
            ParentClose::parse,
            "orphan",
        );
        reads_back_as_written(
            &people::Delivery::ALL,
            people::Delivery::as_str,
            people::Delivery::parse,
            "read",
        );
        reads_back_as_written(
            &dead::DeadState::ALL,
            dead::DeadState::as_str,
            dead::DeadState::parse,
            "pending",
        );
    }
}
