//! Reading the environment: text settings given numbers, and `CMDFLOW_*` names of no setting.

use super::Config;

/// Settings that are text take whatever the environment gives: `CMDFLOW_NAMESPACE=2024` or
/// a numeric JWT audience are read as the text they are, not refused as numbers.
pub(super) mod string_like {
    use serde::Deserializer;
    use serde::de::{self, Visitor};

    struct Text;

    impl<'de> Visitor<'de> for Text {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("text")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_char<E: de::Error>(self, v: char) -> Result<String, E> {
            Ok(v.to_string())
        }
    }

    struct Optional;

    impl<'de> Visitor<'de> for Optional {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("text, or nothing")
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
            text(d).map(Some)
        }
    }

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(Text)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(Optional)
    }
}

/// `CMDFLOW_*` variables that are not settings: the CLI's, the config file's name, the test
/// and script helpers.
const NOT_SETTINGS: &[&str] = &["CONFIG", "URL", "TOKEN", "BIN", "SERVICES_VIA"];

/// A warning for each `CMDFLOW_*` variable in `vars` that names no setting, with the closest
/// one (a typo such as `CMDFLOW_CONCURENCY` would otherwise be ignored in silence).
pub fn unknown_variables(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    let known: Vec<String> = match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(fields)) => {
            fields.keys().map(|k| k.to_ascii_uppercase()).collect()
        }
        _ => Vec::new(),
    };
    let mut warnings = Vec::new();
    for (name, _) in vars {
        let Some(rest) = name.strip_prefix("CMDFLOW_") else {
            continue;
        };
        if known.iter().any(|k| k == rest)
            || NOT_SETTINGS.contains(&rest)
            || rest.starts_with("TEST_")
        {
            continue;
        }
        let closest = known
            .iter()
            .map(|k| (strsim::levenshtein(k, rest), k))
            .min()
            .map(|(_, k)| format!("; did you mean CMDFLOW_{k}?"))
            .unwrap_or_default();
        warnings.push(format!(
            "{name} is not a cmdflow setting and is ignored{closest}"
        ));
    }
    warnings.sort();
    warnings
}
