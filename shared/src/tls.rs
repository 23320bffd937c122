//! TLS to RabbitMQ (`amqps://`), PostgreSQL (`sslmode=…` in the URL) and Redis (`rediss://`).
//!
//! One rustls crypto provider for the whole process (aws-lc-rs), installed once before the first
//! connection. Connections trust the system's certificate authorities, plus the PEM bundle of
//! `CMDFLOW_TLS_CA_FILE` when it is set (a private CA, as a Kubernetes cluster often has).

use std::sync::{Arc, RwLock};

/// The extra certificate authorities: where they came from, and the PEM text.
#[derive(Debug, Clone)]
pub struct Trust {
    pub path: String,
    pub pem: String,
}

static TRUST: RwLock<Option<Arc<Trust>>> = RwLock::new(None);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA bundle {path} (CMDFLOW_TLS_CA_FILE): {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA bundle {path} (CMDFLOW_TLS_CA_FILE) holds no PEM certificate")]
    Empty { path: String },
}

/// Installs aws-lc-rs as the process's rustls provider. Idempotent.
pub fn install_provider() {
    // Err means a provider is installed already: the same one, since no other is compiled in.
    drop(rustls::crypto::aws_lc_rs::default_provider().install_default());
}

/// Installs the provider and trusts the CA bundle at `ca_file` (or only the system's).
pub fn configure(ca_file: Option<&str>) -> Result<(), TlsError> {
    install_provider();
    let trust = match ca_file {
        None => None,
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })?;
            let certs = rustls_pemfile::certs(&mut pem.as_bytes())
                .filter_map(Result::ok)
                .count();
            if certs == 0 {
                return Err(TlsError::Empty {
                    path: path.to_owned(),
                });
            }
            Some(Arc::new(Trust {
                path: path.to_owned(),
                pem,
            }))
        }
    };
    *TRUST.write().unwrap_or_else(|e| e.into_inner()) = trust;
    Ok(())
}

/// The extra certificate authorities, when configured.
pub fn trust() -> Option<Arc<Trust>> {
    TRUST.read().unwrap_or_else(|e| e.into_inner()).clone()
}
