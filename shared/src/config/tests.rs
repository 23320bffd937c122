//! The configuration's unit tests: defaults, refused values, text settings, unknown variables.

use super::*;

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
    assert_eq!(Config::default().retry_delay_list().unwrap().len(), 4);
}

#[test]
fn bad_values_name_their_field() {
    let config = Config {
        retry_delays: "1s,soon".to_owned(),
        ..Config::default()
    };
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("retry_delays")
    );
    let config = Config {
        namespace: "a b".to_owned(),
        ..Config::default()
    };
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("namespace")
    );
}

#[test]
fn the_log_format_follows_the_terminal_unless_it_is_set() {
    assert_eq!(
        Config::default().log_format,
        crate::telemetry::default_log_format(std::io::stderr().is_terminal())
    );
    // A value set in the file or as CMDFLOW_LOG_FORMAT (the same merge) wins either way.
    for set in ["json", "pretty"] {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&format!("log_format = \"{set}\"")))
            .extract()
            .unwrap();
        assert_eq!(config.log_format, set);
    }
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(
        redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
        "amqp://guest:***@127.0.0.1:5672/%2f"
    );
    assert_eq!(redact_url("redis://127.0.0.1/"), "redis://127.0.0.1/");
}

#[test]
fn text_settings_take_values_that_look_like_numbers_or_booleans() {
    let config: Config = Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::string(
            "namespace = 2024\njwt_audience = 12345\nmail_from = true\ndev_key = 1234567890123456789",
        ))
        .extract()
        .unwrap();
    assert_eq!(config.namespace, "2024");
    assert_eq!(config.jwt_audience.as_deref(), Some("12345"));
    assert_eq!(config.mail_from, "true");
    assert_eq!(
        config.dev_key.as_ref().map(Secret::expose),
        Some("1234567890123456789")
    );
    config.validate().unwrap();
}

#[test]
fn an_unknown_variable_is_named_with_the_closest_setting() {
    let vars = [
        ("CMDFLOW_CONCURENCY", "8"),
        ("CMDFLOW_NAMESPACE", "x"),
        ("CMDFLOW_URL", "http://gw"),
        ("CMDFLOW_TEST_ADMIN_URL", "postgres://"),
        ("HOME", "/root"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let warnings = unknown_variables(vars);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("CMDFLOW_CONCURENCY is not a cmdflow setting")
            && warnings[0].ends_with("did you mean CMDFLOW_CONCURRENCY?"),
        "{warnings:?}"
    );
}

#[test]
fn http_timeouts_and_connection_cap_of_zero_are_refused() {
    let zero_header = Config {
        http_header_timeout: Duration::ZERO,
        ..Config::default()
    };
    let zero_idle = Config {
        http_idle_timeout: Duration::ZERO,
        ..Config::default()
    };
    let zero_cap = Config {
        http_max_connections: 0,
        ..Config::default()
    };
    for (config, field) in [
        (zero_header, "http_header_timeout"),
        (zero_idle, "http_idle_timeout"),
        (zero_cap, "http_max_connections"),
    ] {
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(field), "{error}");
    }
    let config: Config = Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::string(
            "http_header_timeout = \"2s\"\nhttp_idle_timeout = \"1m\"\nhttp_max_connections = 3",
        ))
        .extract()
        .unwrap();
    assert_eq!(config.http_header_timeout, Duration::from_secs(2));
    assert_eq!(config.http_idle_timeout, Duration::from_secs(60));
    assert_eq!(config.http_max_connections, 3);
    assert!(
        unknown_variables([("CMDFLOW_HTTP_IDLE_TIMEOUT".to_owned(), "5s".to_owned())]).is_empty()
    );
}

#[test]
fn a_pool_of_no_connections_is_refused() {
    let config = Config {
        database_pool_size: 0,
        ..Config::default()
    };
    assert!(
        config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("database_pool_size")
    );
}
