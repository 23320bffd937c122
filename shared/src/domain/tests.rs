//! The domain model's unit tests: owners, names, command ids, the state machine's moves.

use super::*;
use proptest::prelude::*;

#[test]
fn owners_parse_and_print_back() {
    let owner = Owner::parse("member:42").unwrap();
    assert_eq!(owner.kind(), "member");
    assert_eq!(owner.id(), "42");
    assert_eq!(owner.to_string(), "member:42");
    assert_eq!(
        Owner::parse("visitor:cookie-7f3a").unwrap().to_string(),
        "visitor:cookie-7f3a"
    );
}

#[test]
fn owner_kinds_are_open_lower_case_words() {
    for good in ["tenant:acme", "user:7", "b2b_partner:x-1", "vendor9:v"] {
        assert_eq!(Owner::parse(good).unwrap().to_string(), good);
    }
    assert_eq!(Owner::parse("tenant:acme").unwrap().kind(), "tenant");
    let long = format!("{}:1", "k".repeat(33));
    assert!(Owner::parse(&long).is_err(), "a kind is at most 32 bytes");
}

#[test]
fn bad_owners_are_refused_with_a_reason() {
    for bad in [
        "member",
        "Pirate:1",
        "1pirate:1",
        "pi-rate:1",
        "member:",
        "member:a b",
        "member:x'; drop table commands;--",
        ":42",
    ] {
        let err = Owner::parse(bad).unwrap_err();
        assert!(!err.to_string().is_empty(), "{bad}");
    }
    assert!(Owner::parse(&format!("lead:{}", "x".repeat(129))).is_err());
}

#[test]
fn dotted_names() {
    for good in ["quote.requested", "demo.counter", "command.abort", "a1.b_2"] {
        check_dotted_name(good, 2).unwrap();
    }
    for bad in [
        "Quote.requested",
        "quote",
        "quote..requested",
        ".quote",
        "quote.",
        "1quote.x",
        "quote.re-quested",
        "",
    ] {
        assert!(check_dotted_name(bad, 2).is_err(), "{bad}");
    }
    Kind::parse("quote").unwrap();
}

#[test]
fn command_ids_are_v7_and_parse_back() {
    let id = CommandId::new();
    assert_eq!(id.as_uuid().get_version_num(), 7);
    assert_eq!(id.to_string().parse::<CommandId>().unwrap(), id);
    assert!("../../etc/passwd".parse::<CommandId>().is_err());
}

#[test]
fn legal_moves() {
    use CommandState::*;
    assert_eq!(Pending.transition(Running), Ok(Running));
    assert_eq!(Running.transition(Waiting), Ok(Waiting));
    assert_eq!(Waiting.transition(Running), Ok(Running));
    assert_eq!(Running.transition(Completed), Ok(Completed));
    assert_eq!(Pending.transition(Aborted), Ok(Aborted));
    assert!(Running.transition(Pending).is_err());
    assert!(Completed.transition(Running).is_err());
    assert!(Failed.transition(Failed).is_err());
}

fn any_state() -> impl Strategy<Value = CommandState> {
    proptest::sample::select(CommandState::ALL.to_vec())
}

proptest! {
    #[test]
    fn nothing_leaves_a_terminal_state(from in any_state(), to in any_state()) {
        if from.is_terminal() {
            prop_assert!(from.transition(to).is_err());
        }
    }

    #[test]
    fn every_live_state_can_end(from in any_state(), to in any_state()) {
        if !from.is_terminal() && to.is_terminal() {
            prop_assert_eq!(from.transition(to), Ok(to));
        }
    }

    #[test]
    fn nothing_returns_to_pending(from in any_state()) {
        prop_assert_eq!(from.transition(CommandState::Pending).is_ok(), from == CommandState::Pending);
    }

    #[test]
    fn any_walk_of_legal_moves_ends_at_most_once(steps in proptest::collection::vec(any_state(), 0..20)) {
        let mut state = CommandState::Pending;
        let mut ended = 0;
        for step in steps {
            if let Ok(next) = state.transition(step) {
                if next.is_terminal() { ended += 1; }
                state = next;
            }
        }
        prop_assert!(ended <= 1);
    }

    #[test]
    fn owner_parse_never_panics_and_round_trips(s in "\\PC{0,80}") {
        if let Ok(owner) = Owner::parse(&s) {
            prop_assert_eq!(owner.to_string(), s);
        }
    }
}
