//! The dead-letter statements' unit tests: a listed body's prefix as text.

use super::*;

#[test]
fn a_prefix_is_text_without_the_character_its_cut_split() {
    // "é" is two bytes: a prefix of the first KiB that ends after its first byte.
    let mut cut = vec![b'a'; BODY_PREFIX_BYTES as usize - 1];
    cut.push(0xC3);
    assert_eq!(BodyPrefix(cut).text(), "a".repeat(1023));
    // The same byte in a short (whole) body is invalid UTF-8, shown as such.
    assert_eq!(BodyPrefix(b"ab\xC3".to_vec()).text(), "ab\u{FFFD}");
    // A whole character at the end stays; invalid bytes inside are replaced.
    let mut whole = vec![0xFF];
    whole.extend(std::iter::repeat_n(b'a', BODY_PREFIX_BYTES as usize - 3));
    whole.extend("é".as_bytes());
    let text = BodyPrefix(whole).text();
    assert!(
        text.starts_with('\u{FFFD}') && text.ends_with("aé"),
        "{text}"
    );
    assert_eq!(BodyPrefix(Vec::new()).text(), "");
    assert!(COLUMNS.contains(&format!("substring(body FROM 1 FOR {BODY_PREFIX_BYTES})")));
}
