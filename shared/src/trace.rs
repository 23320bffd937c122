//! W3C trace context: one trace spans gateway → worker → child commands. The `traceparent` travels
//! as the CloudEvents distributed-tracing extension attribute and as an AMQP header.

use uuid::Uuid;

pub const TRACEPARENT: &str = "traceparent";

/// `(trace id, parent id)` of a valid `traceparent` (`00-{32 hex}-{16 hex}-{2 hex}`).
pub fn parse(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let valid = parts.next().is_none()
        && hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some((trace, parent))
}

fn span_id() -> String {
    let bytes = Uuid::new_v4().into_bytes();
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A new trace.
pub fn new_trace() -> String {
    format!("00-{}-{}-01", Uuid::new_v4().simple(), span_id())
}

/// A new span in the trace of `parent`, or a new trace when `parent` is not a valid traceparent.
pub fn child_of(parent: Option<&str>) -> String {
    match parent.and_then(parse) {
        Some((trace, _)) => format!("00-{trace}-{}-01", span_id()),
        None => new_trace(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_keep_the_trace_id() {
        let root = new_trace();
        let (trace, parent) = parse(&root).unwrap();
        let child = child_of(Some(&root));
        let (child_trace, child_parent) = parse(&child).unwrap();
        assert_eq!(trace, child_trace);
        assert_ne!(parent, child_parent);
        assert!(parse("00-00000000000000000000000000000000-0000000000000001-01").is_none());
        assert!(parse("00-abc-def-01").is_none());
        assert!(
            parse(&child_of(Some("garbage"))).is_some(),
            "a bad parent starts a new trace"
        );
    }
}
