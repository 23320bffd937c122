//! Personal answers: message templates rendered with minijinja. The e-mails among them are sent
//! by the mailer (`mailer.rs`).
//!
//! A template file's first line is the subject; the rest is the body. Rendering is strict: an
//! undefined value is an error that names the template, so a half-rendered message never goes
//! out. Without SMTP configured, e-mails are kept and shown in the app.

use chrono::{DateTime, Utc};
use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// A template that cannot be used: its name (or file) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {name}: {reason}")]
pub struct TemplateError {
    pub name: String,
    pub reason: String,
}

/// Compiled templates, strict about undefined values.
#[derive(Clone)]
pub struct Templates {
    env: Environment<'static>,
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

impl Templates {
    /// No templates yet.
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_filter("date", date_filter);
        Self { env }
    }

    /// Adds (or replaces) the template `name`. Its first line is the subject.
    pub fn add(&mut self, name: &str, source: &str) -> Result<(), TemplateError> {
        let error = |reason: String| TemplateError {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(error(
                "a template's name is lower-case letters, digits and _".to_owned(),
            ));
        }
        if source.lines().next().is_none_or(|l| l.trim().is_empty()) {
            return Err(error("the first line (the subject) is empty".to_owned()));
        }
        self.env
            .add_template_owned(name.to_owned(), source.to_owned())
            .map_err(|e| error(e.to_string()))
    }

    /// Adds every `*.txt` file in `dir`, named after the file (`welcome.txt` → `welcome`).
    /// Returns how many it added.
    pub fn add_dir(&mut self, dir: &std::path::Path) -> Result<usize, TemplateError> {
        let error = |reason: String| TemplateError {
            name: dir.display().to_string(),
            reason,
        };
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| error(e.to_string()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        for path in &files {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let source = std::fs::read_to_string(path)
                .map_err(|e| error(format!("{}: {e}", path.display())))?;
            self.add(name, &source).map_err(|e| TemplateError {
                name: path.display().to_string(),
                reason: e.reason,
            })?;
        }
        Ok(files.len())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.env.get_template(name).is_ok()
    }

    /// Renders `name` with `context`: `(subject, body)`, or an error that names the template.
    pub fn render(&self, name: &str, context: &Value) -> Result<(String, String), String> {
        let template = self
            .env
            .get_template(name)
            .map_err(|_| format!("template {name}: no such template"))?;
        let text = template
            .render(minijinja::value::Serde(context))
            .map_err(|e| format!("template {name}: {e}"))?;
        let (subject, body) = text.split_once('\n').unwrap_or((text.as_str(), ""));
        let subject = subject.trim();
        if subject.is_empty() {
            return Err(format!(
                "template {name}: the first line (the subject) is empty"
            ));
        }
        Ok((subject.to_owned(), body.trim_start_matches('\n').to_owned()))
    }
}

/// `{{ when | date }}`: an RFC 3339 time as `26 November 2026`.
fn date_filter(value: String) -> String {
    DateTime::parse_from_rfc3339(&value)
        .map(|t| t.with_timezone(&Utc).format("%-d %B %Y").to_string())
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn templates() -> Templates {
        let mut t = Templates::new();
        t.add(
            "greeting",
            "Hello, {{ name }}\n\nSince {{ now | date }} you have {{ total }} points.\n",
        )
        .unwrap();
        t
    }

    #[test]
    fn a_template_renders_its_subject_and_body() {
        let (subject, body) = templates()
            .render(
                "greeting",
                &json!({"name": "Ada", "now": "2026-11-26T10:00:00Z", "total": 120}),
            )
            .unwrap();
        assert_eq!(subject, "Hello, Ada");
        assert!(
            body.contains("26 November 2026") && body.contains("120"),
            "{body}"
        );
    }

    #[test]
    fn a_missing_value_fails_loudly_with_the_template_name() {
        let err = templates()
            .render("greeting", &json!({"now": "2026-11-26T10:00:00Z"}))
            .unwrap_err();
        assert!(err.starts_with("template greeting:"), "{err}");
        let err = templates().render("nope", &json!({})).unwrap_err();
        assert!(err.contains("no such template"));
    }

    #[test]
    fn bad_templates_are_refused_with_their_name() {
        let mut t = Templates::new();
        assert!(
            t.add("x", "{% if %}\n")
                .unwrap_err()
                .to_string()
                .starts_with("template x:")
        );
        assert!(t.add("Bad Name", "subject\n").is_err());
        assert!(
            t.add("empty", "\nbody")
                .unwrap_err()
                .reason
                .contains("subject")
        );
    }

    #[test]
    fn a_directory_of_templates_loads_by_file_name() {
        let dir = std::env::temp_dir().join(format!("cmdflow-templates-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("welcome.txt"), "Welcome, {{ name }}\nbody\n").unwrap();
        std::fs::write(dir.join("notes.md"), "not a template").unwrap();
        let mut t = Templates::new();
        assert_eq!(t.add_dir(&dir).unwrap(), 1);
        assert!(t.contains("welcome") && !t.contains("notes"));
        std::fs::write(dir.join("broken.txt"), "{{ name\n").unwrap();
        let err = Templates::new().add_dir(&dir).unwrap_err();
        assert!(err.name.ends_with("broken.txt"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
