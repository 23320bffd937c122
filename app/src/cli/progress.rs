//! Progress on standard error: redrawn in place (`\r`) on a terminal; elsewhere (a log file, a
//! CI job, a pipe) a plain line now and then, and the last one, so that no `\r` garbles the log.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a plain progress line is written where standard error is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    terminal: bool,
    /// When a plain line was last written, and the line last given.
    written: Option<Instant>,
    last: Option<String>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress::with_terminal(std::io::stderr().is_terminal())
    }

    pub(crate) fn with_terminal(terminal: bool) -> Progress {
        Progress {
            terminal,
            written: None,
            last: None,
        }
    }

    /// Shows `line` as the current progress.
    pub fn update(&mut self, line: String) {
        eprint!("{}", self.render(line));
    }

    /// Ends the progress: the cursor goes to a new line on a terminal; elsewhere the last line
    /// is written if it was not.
    pub fn finish(&mut self) {
        eprint!("{}", self.render_finish());
    }

    fn render(&mut self, line: String) -> String {
        let out = if self.terminal {
            format!("\r{line}")
        } else if self.written.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            self.written = Some(Instant::now());
            format!("{line}\n")
        } else {
            String::new()
        };
        self.last = Some(line).filter(|_| out.is_empty() || self.terminal);
        out
    }

    fn render_finish(&mut self) -> String {
        match (self.terminal, self.last.take()) {
            (true, Some(_)) => "\n".to_owned(),
            (false, Some(line)) => format!("{line}\n"),
            _ => String::new(),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_terminal_progress_is_plain_lines() {
        let mut p = Progress::with_terminal(false);
        let mut out = p.render("1/3".to_owned());
        out.push_str(&p.render("2/3".to_owned()));
        out.push_str(&p.render("3/3".to_owned()));
        out.push_str(&p.render_finish());
        assert!(!out.contains('\r'), "{out:?}");
        assert_eq!(out, "1/3\n3/3\n", "the first line, then the last");
        let mut p = Progress::with_terminal(false);
        let mut out = p.render("done".to_owned());
        out.push_str(&p.render_finish());
        assert_eq!(out, "done\n", "a line already written is not repeated");
    }

    #[test]
    fn on_a_terminal_progress_is_redrawn_in_place() {
        let mut p = Progress::with_terminal(true);
        let mut out = p.render("1/2".to_owned());
        out.push_str(&p.render("2/2".to_owned()));
        out.push_str(&p.render_finish());
        assert_eq!(out, "\r1/2\r2/2\n");
    }
}
