//! Fan-in: when a group of children has settled, by its policy. Pure, and property-tested to
//! never leave a group open once every child has reported.

use cmdflow_shared::decision::FanIn;
use cmdflow_shared::store::GroupState;

/// Counts of a group's children that have reported back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub total: u32,
    pub completed: u32,
    pub failed: u32,
    pub aborted: u32,
}

impl Tally {
    pub fn reported(&self) -> u32 {
        self.completed + self.failed + self.aborted
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Open,
    Succeeded,
    Failed,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// The group's state once frozen at a verdict (`Open` stays open).
impl From<Verdict> for GroupState {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Open => GroupState::Open,
            Verdict::Succeeded => GroupState::Succeeded,
            Verdict::Failed => GroupState::Failed,
        }
    }
}

/// The group's verdict after the reports in `t`.
pub fn evaluate(policy: FanIn, t: Tally) -> Verdict {
    let all_in = t.reported() >= t.total;
    match policy {
        FanIn::All => {
            if t.failed + t.aborted > 0 {
                Verdict::Failed
            } else if t.completed >= t.total {
                Verdict::Succeeded
            } else {
                Verdict::Open
            }
        }
        FanIn::Any => {
            if t.completed >= 1 {
                Verdict::Succeeded
            } else if all_in {
                Verdict::Failed
            } else {
                Verdict::Open
            }
        }
        FanIn::Quorum(n) => {
            if t.completed >= n {
                Verdict::Succeeded
            } else if t.total.saturating_sub(t.failed + t.aborted) < n {
                Verdict::Failed
            } else {
                Verdict::Open
            }
        }
        FanIn::AllSettled => {
            if all_in {
                Verdict::Succeeded
            } else {
                Verdict::Open
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(total: u32, completed: u32, failed: u32, aborted: u32) -> Tally {
        Tally {
            total,
            completed,
            failed,
            aborted,
        }
    }

    #[test]
    fn all_fails_fast_and_succeeds_when_every_child_completes() {
        assert_eq!(evaluate(FanIn::All, t(3, 2, 0, 0)), Verdict::Open);
        assert_eq!(evaluate(FanIn::All, t(3, 3, 0, 0)), Verdict::Succeeded);
        assert_eq!(evaluate(FanIn::All, t(3, 0, 1, 0)), Verdict::Failed);
        assert_eq!(evaluate(FanIn::All, t(0, 0, 0, 0)), Verdict::Succeeded);
    }

    #[test]
    fn any_wins_on_the_first_completion() {
        assert_eq!(evaluate(FanIn::Any, t(3, 1, 0, 0)), Verdict::Succeeded);
        assert_eq!(evaluate(FanIn::Any, t(3, 0, 2, 0)), Verdict::Open);
        assert_eq!(evaluate(FanIn::Any, t(3, 0, 2, 1)), Verdict::Failed);
    }

    #[test]
    fn quorum_fails_as_soon_as_it_cannot_be_reached() {
        assert_eq!(
            evaluate(FanIn::Quorum(2), t(3, 2, 0, 0)),
            Verdict::Succeeded
        );
        assert_eq!(evaluate(FanIn::Quorum(2), t(3, 1, 1, 0)), Verdict::Open);
        assert_eq!(evaluate(FanIn::Quorum(2), t(3, 0, 2, 0)), Verdict::Failed);
        assert_eq!(evaluate(FanIn::Quorum(4), t(3, 0, 0, 0)), Verdict::Failed);
    }

    #[test]
    fn all_settled_waits_for_everyone() {
        assert_eq!(evaluate(FanIn::AllSettled, t(3, 1, 1, 0)), Verdict::Open);
        assert_eq!(
            evaluate(FanIn::AllSettled, t(3, 1, 1, 1)),
            Verdict::Succeeded
        );
    }

    fn policy() -> impl Strategy<Value = FanIn> {
        prop_oneof![
            Just(FanIn::All),
            Just(FanIn::Any),
            Just(FanIn::AllSettled),
            (1u32..12).prop_map(FanIn::Quorum),
        ]
    }

    proptest! {
        /// Never hangs: once every child has reported, the group is decided.
        #[test]
        fn a_group_whose_children_all_reported_is_never_open(
            policy in policy(),
            outcomes in proptest::collection::vec(0u8..3, 0..12),
        ) {
            let total = outcomes.len() as u32;
            let tally = Tally {
                total,
                completed: outcomes.iter().filter(|o| **o == 0).count() as u32,
                failed: outcomes.iter().filter(|o| **o == 1).count() as u32,
                aborted: outcomes.iter().filter(|o| **o == 2).count() as u32,
            };
            prop_assert_ne!(evaluate(policy, tally), Verdict::Open);
        }

    }
}
