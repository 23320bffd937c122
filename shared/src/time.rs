//! Time: the injected clock, and timer specifications (after a duration, at an instant, or on a
//! cron schedule in an IANA time zone) with their validation and next occurrences.
//!
//! Cron patterns have 5 fields (minute granularity) or 6 (with seconds first), evaluated by
//! `croner` in the timer's own zone. Across DST changes: a fixed time that falls in the
//! spring-forward gap runs at the first valid time after the gap that day; a fixed time in the
//! fall-back overlap runs once, at its first occurrence; wildcard and step patterns skip the
//! gap and run in both passes of the overlap.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;

use crate::contract::clip_to;

/// The source of "now", injected so timer logic is tested without waiting.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Mutex::new(at))
    }
    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += chrono::Duration::from_std(by).unwrap_or_default();
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The longest timer name.
pub const MAX_TIMER_NAME: usize = 128;
/// The longest delay: anything longer is a mistake, not a plan.
pub const MAX_DELAY: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("invalid cron expression `{expr}`: {reason}")]
    Cron { expr: String, reason: String },
    #[error("unknown time zone `{0}` (use an IANA name such as Europe/Berlin)")]
    Zone(String),
    #[error("invalid duration: {0}")]
    Duration(String),
    #[error("invalid timer name: {0}")]
    Name(String),
    #[error("the cron expression `{0}` never occurs in the next 28 years")]
    NoOccurrence(String),
}

/// When a timer fires.
#[derive(Debug, Clone, PartialEq)]
pub enum TimerWhen {
    After(Duration),
    At(DateTime<Utc>),
    Cron { expr: String, tz: String },
}

/// A named timer a command sets for itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerSpec {
    pub name: String,
    pub when: TimerWhen,
}

impl TimerSpec {
    /// Checks the name and the schedule, and returns when the timer is first due from `now`.
    /// An instant in the past is due at once.
    pub fn first_due(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>, TimeError> {
        check_name(&self.name)?;
        match &self.when {
            TimerWhen::After(d) => {
                check_delay(*d)?;
                Ok(now
                    + chrono::Duration::from_std(*d)
                        .map_err(|e| TimeError::Duration(e.to_string()))?)
            }
            TimerWhen::At(at) => Ok(*at),
            TimerWhen::Cron { expr, tz } => next_cron(expr, tz, now),
        }
    }

    pub fn cron(&self) -> Option<(&str, &str)> {
        match &self.when {
            TimerWhen::Cron { expr, tz } => Some((expr, tz)),
            _ => None,
        }
    }
}

pub fn check_name(name: &str) -> Result<(), TimeError> {
    if name.is_empty() {
        return Err(TimeError::Name("must not be empty".into()));
    }
    if name.chars().count() > MAX_TIMER_NAME {
        return Err(TimeError::Name(format!(
            "at most {MAX_TIMER_NAME} characters, got {}",
            name.chars().count()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(TimeError::Name(
            "must not contain control characters".into(),
        ));
    }
    Ok(())
}

pub fn check_delay(d: Duration) -> Result<(), TimeError> {
    if d > MAX_DELAY {
        return Err(TimeError::Duration(format!(
            "{} is longer than the 10 years a timer may wait",
            humantime::format_duration(d)
        )));
    }
    Ok(())
}

/// A delay given in milliseconds by a person or a program: negative or absurd values are refused.
pub fn delay_from_millis(ms: i64) -> Result<Duration, TimeError> {
    if ms < 0 {
        return Err(TimeError::Duration(format!("{ms} ms is negative")));
    }
    let d = Duration::from_millis(ms as u64);
    check_delay(d)?;
    Ok(d)
}

/// The longest cron pattern accepted: a schedule is a few fields, not a document.
pub const MAX_CRON_LEN: usize = 1024;
/// How much of a refused pattern an error repeats.
const SHOWN: usize = 80;

/// Parses a cron pattern. Besides croner's own checks, a field with an empty list item
/// (`1,,2`, `,`) is refused: croner reads it as a field that matches nothing, whose next
/// occurrence is then searched for centuries.
pub fn parse_cron(expr: &str) -> Result<Cron, TimeError> {
    let refuse = |reason: String| TimeError::Cron {
        expr: clip_to(expr, SHOWN),
        reason: clip_to(&reason, 2 * SHOWN),
    };
    if expr.len() > MAX_CRON_LEN {
        return Err(refuse(format!(
            "{} bytes is longer than the {MAX_CRON_LEN} a pattern may have",
            expr.len()
        )));
    }
    if let Some((i, field)) = expr
        .split_whitespace()
        .enumerate()
        .find(|(_, field)| field.split(',').any(str::is_empty))
    {
        return Err(refuse(format!(
            "field {} `{}` has an empty list item",
            i + 1,
            clip_to(field, SHOWN)
        )));
    }
    let fields = expr.split_whitespace().count();
    if !expr.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
        return Err(refuse(format!(
            "{fields} fields; a pattern has 5 (minute hour day month weekday) or 6 (seconds first)"
        )));
    }
    Cron::from_str(expr).map_err(|e| refuse(e.to_string()))
}

/// How far ahead a pattern's next occurrence is looked for: 28 years, the cycle after which
/// dates fall on the same weekdays again (within a century), so any pattern that can occur at
/// all does within it.
pub const CRON_HORIZON_DAYS: i64 = 28 * 366 + 1;

/// Whether some day in the [`CRON_HORIZON_DAYS`] from `from` matches the pattern's month and day
/// fields. Day by day over the calendar, it costs well under a millisecond even for a pattern
/// that never occurs (`0 0 30 2 *`), where the full search would walk to the year 5000.
fn occurs_within_horizon(cron: &Cron, from: chrono::NaiveDate) -> bool {
    use chrono::Datelike;
    from.iter_days().take(CRON_HORIZON_DAYS as usize).any(|d| {
        cron.pattern.month_match(d.month()).unwrap_or(false)
            && cron
                .pattern
                .day_match(
                    d.year(),
                    d.month(),
                    d.day(),
                    croner::Weekday::from_days_from_sunday(d.weekday().num_days_from_sunday()),
                )
                .unwrap_or(false)
    })
}

pub fn parse_zone(tz: &str) -> Result<Tz, TimeError> {
    tz.parse::<Tz>()
        .map_err(|_| TimeError::Zone(clip_to(tz, SHOWN)))
}

/// The first occurrence of `expr` in zone `tz` strictly after `after`.
pub fn next_cron(expr: &str, tz: &str, after: DateTime<Utc>) -> Result<DateTime<Utc>, TimeError> {
    let cron = parse_cron(expr)?;
    let zone = parse_zone(tz)?;
    let local = after.with_timezone(&zone);
    if !occurs_within_horizon(&cron, local.date_naive()) {
        return Err(TimeError::NoOccurrence(clip_to(expr, SHOWN)));
    }
    cron.find_next_occurrence(&local, false)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| TimeError::NoOccurrence(clip_to(expr, SHOWN)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_pattern_that_never_occurs_is_refused_within_the_horizon() {
        let after = utc("2026-12-05T12:00:00Z");
        for expr in ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 0 31 2 *"] {
            let cron = parse_cron(expr).unwrap();
            assert!(!occurs_within_horizon(&cron, after.date_naive()), "{expr}");
            let e = next_cron(expr, "UTC", after).unwrap_err();
            assert!(
                e.to_string().contains("never occurs in the next 28 years"),
                "{e}"
            );
        }
        // Rare but real: the 29th of February.
        let cron = parse_cron("0 0 29 2 *").unwrap();
        assert!(occurs_within_horizon(&cron, after.date_naive()));
        assert_eq!(
            next_cron("0 0 29 2 *", "UTC", after).unwrap(),
            utc("2028-02-29T00:00:00Z")
        );
    }

    #[test]
    fn a_pattern_has_five_or_six_fields() {
        for expr in ["0 0 * * * * 2027", "* * * *", "0 0 1 1 * * * *"] {
            let e = parse_cron(expr).unwrap_err();
            assert!(e.to_string().contains("fields"), "{expr}: {e}");
        }
        for expr in ["0 * * * 1-5", "30 0 * * * *", "@hourly"] {
            assert!(parse_cron(expr).is_ok(), "{expr}");
        }
    }

    #[test]
    fn every_weekday_hour_skips_the_weekend() {
        // Friday 2026-11-27 23:30 in Berlin → next is Monday 00:00 Berlin.
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let friday_late = berlin
            .with_ymd_and_hms(2026, 11, 27, 23, 30, 0)
            .unwrap()
            .with_timezone(&Utc);
        let next = next_cron("0 * * * 1-5", "Europe/Berlin", friday_late).unwrap();
        assert_eq!(
            next,
            berlin
                .with_ymd_and_hms(2026, 11, 30, 0, 0, 0)
                .unwrap()
                .with_timezone(&Utc)
        );
    }

    #[test]
    fn hourly_across_the_spring_forward_gap_in_berlin() {
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST. After 01:00 local (00:00 UTC) the next hourly
        // slot is 03:00 CEST = 01:00 UTC: the nonexistent 02:00 is skipped.
        let next = next_cron("0 * * * *", "Europe/Berlin", utc("2026-03-29T00:00:00Z")).unwrap();
        assert_eq!(next, utc("2026-03-29T01:00:00Z"));
        // A fixed 02:30 runs at the first valid time after the gap that day.
        let fixed = next_cron("30 2 * * *", "Europe/Berlin", utc("2026-03-28T23:00:00Z")).unwrap();
        assert_eq!(
            fixed
                .with_timezone(&"Europe/Berlin".parse::<Tz>().unwrap())
                .date_naive()
                .to_string(),
            "2026-03-29"
        );
        assert!(
            fixed >= utc("2026-03-29T01:00:00Z") && fixed < utc("2026-03-29T02:00:00Z"),
            "{fixed}"
        );
    }

    #[test]
    fn a_fixed_time_in_the_fall_back_overlap_runs_once() {
        // 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        let first = next_cron("30 2 * * *", "Europe/Berlin", utc("2026-10-24T22:00:00Z")).unwrap();
        assert_eq!(first, utc("2026-10-25T00:30:00Z"), "02:30 CEST");
        let second = next_cron("30 2 * * *", "Europe/Berlin", first).unwrap();
        assert_eq!(
            second,
            utc("2026-10-26T01:30:00Z"),
            "the next day, not 02:30 CET again"
        );
    }

    #[test]
    fn six_fields_take_seconds() {
        let next = next_cron("*/10 * * * * *", "UTC", utc("2026-01-01T00:00:01Z")).unwrap();
        assert_eq!(next, utc("2026-01-01T00:00:10Z"));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert!(matches!(
            parse_cron("61 * * * *"),
            Err(TimeError::Cron { .. })
        ));
        assert!(matches!(
            parse_cron("every day"),
            Err(TimeError::Cron { .. })
        ));
        assert!(matches!(
            parse_zone("Mars/Olympus"),
            Err(TimeError::Zone(_))
        ));
        assert!(delay_from_millis(-1).is_err());
        assert!(delay_from_millis(i64::MAX).is_err());
        assert!(check_name(&"x".repeat(129)).is_err());
        assert!(check_name("").is_err());
        let past = TimerSpec {
            name: "t".into(),
            when: TimerWhen::At(utc("2000-01-01T00:00:00Z")),
        };
        assert_eq!(
            past.first_due(Utc::now()).unwrap(),
            utc("2000-01-01T00:00:00Z"),
            "a past instant is due at once"
        );
    }

    proptest! {
        #[test]
        fn cron_parsing_never_panics(expr in "[0-9*/,\\- LW#?]{0,40}") {
            if let Err(e) = parse_cron(&expr) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        #[test]
        fn next_occurrence_is_always_after(expr in proptest::sample::select(vec!["0 * * * 1-5", "*/5 * * * *", "30 2 * * *", "0 0 1 * *"]),
                                           secs in 1_700_000_000i64..1_900_000_000i64,
                                           tz in proptest::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])) {
            let after = Utc.timestamp_opt(secs, 0).unwrap();
            let next = next_cron(expr, tz, after).unwrap();
            prop_assert!(next > after);
        }
    }
}
