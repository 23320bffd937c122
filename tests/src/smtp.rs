//! A minimal SMTP server for tests: it keeps every message it accepts. It refuses some
//! recipients by their domain, as real servers do: `@refused.test` for good (550),
//! `@busy.test` for now (451), and `@tarpit.test` it never answers (a client times out).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Recipients the sink refuses for good (`550`).
pub const REFUSED_DOMAIN: &str = "refused.test";
/// Recipients the sink refuses for now (`451`).
pub const BUSY_DOMAIN: &str = "busy.test";
/// Recipients the sink never answers.
pub const TARPIT_DOMAIN: &str = "tarpit.test";

/// The reply to `RCPT TO:<…>` for the recipient on `line`, after a pause for a tarpit.
async fn rcpt_reply(line: &str) -> &'static [u8] {
    let to = line.to_ascii_lowercase();
    let domain = to
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches(|c: char| c == '>' || c.is_whitespace()))
        .unwrap_or("");
    match domain {
        REFUSED_DOMAIN => b"550 5.1.1 No such mailbox here\r\n",
        BUSY_DOMAIN => b"451 4.3.2 Try again later\r\n",
        TARPIT_DOMAIN => {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            b"451 4.4.2 Too late\r\n"
        }
        _ => b"250 ok\r\n",
    }
}

pub struct SmtpSink {
    pub port: u16,
    mails: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    pub async fn start() -> std::io::Result<SmtpSink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mails: Arc<Mutex<Vec<String>>> = Arc::default();
        let kept = mails.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = kept.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    if write.write_all(b"220 sink ESMTP\r\n").await.is_err() {
                        return;
                    }
                    while let Ok(Some(line)) = lines.next_line().await {
                        let verb = line
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250 sink\r\n",
                            "DATA" => {
                                if write.write_all(b"354 go ahead\r\n").await.is_err() {
                                    return;
                                }
                                let mut mail = String::new();
                                while let Ok(Some(l)) = lines.next_line().await {
                                    if l == "." {
                                        break;
                                    }
                                    mail.push_str(&l);
                                    mail.push('\n');
                                }
                                kept.lock().unwrap_or_else(|e| e.into_inner()).push(mail);
                                b"250 queued\r\n"
                            }
                            "RCPT" => rcpt_reply(&line).await,
                            "QUIT" => {
                                drop(write.write_all(b"221 bye\r\n").await);
                                return;
                            }
                            _ => b"250 ok\r\n",
                        };
                        if write.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(SmtpSink { port, mails, task })
    }

    pub fn mails(&self) -> Vec<String> {
        self.mails.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
