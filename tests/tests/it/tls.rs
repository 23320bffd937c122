//! TLS to the services, chosen by configuration: `amqps://` and `rediss://` URLs, and `sslmode`
//! in the PostgreSQL URL, with certificates checked against `CMDFLOW_TLS_CA_FILE`.
//!
//! RabbitMQ and Redis are reached through TLS-terminating proxies on loopback (certificates from
//! a CA made here), so the local plain services need no TLS listener. PostgreSQL's own TLS is
//! used, with its certificate (Debian's snakeoil) added to the trusted bundle.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cmdflow_shared::CommandState;
use cmdflow_shared::bus::Bus;
use cmdflow_shared::lock::Locks;
use cmdflow_tests::{TestEnv, event, eventually, send, start_command};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// PostgreSQL's certificate on Debian; the server in the URL must present it.
const PG_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// A CA and a certificate for `localhost` / 127.0.0.1 that it signed.
struct Pki {
    ca_pem: String,
    server: Arc<ServerConfig>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cmdflow test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let server = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

/// Accepts TLS on a loopback port and forwards the plain bytes to `target`; counts handshakes.
struct TlsProxy {
    port: u16,
    handshakes: Arc<AtomicUsize>,
}

impl TlsProxy {
    async fn start(server: Arc<ServerConfig>, target: &'static str) -> TlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        let acceptor = TlsAcceptor::from(server);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    // A client that refuses our certificate ends here.
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut plain) = TcpStream::connect(target).await else {
                        return;
                    };
                    drop(tokio::io::copy_bidirectional(&mut tls, &mut plain).await);
                });
            }
        });
        TlsProxy { port, handshakes }
    }
}

#[tokio::test]
async fn the_fleet_runs_over_tls_to_all_three_services_and_refuses_an_untrusted_certificate() {
    let pki = pki();
    let amqp = TlsProxy::start(pki.server.clone(), "127.0.0.1:5672").await;
    let redis = TlsProxy::start(pki.server.clone(), "127.0.0.1:6379").await;
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", amqp.port);
    let rediss = format!("rediss://localhost:{}/", redis.port);

    // Without our CA, neither service's certificate is trusted: start-up stops with the URL.
    cmdflow_shared::tls::configure(None).unwrap();
    let err = Bus::connect(&amqps, "tlsneg", "cmdflow-test")
        .await
        .err()
        .expect("an untrusted broker certificate is refused");
    assert!(
        err.to_string().contains("amqps://guest:***@localhost"),
        "{err}"
    );
    let locks = Locks::new(
        std::slice::from_ref(&rediss),
        "tlsneg",
        Duration::from_secs(5),
        Duration::from_millis(50),
    )
    .unwrap();
    assert!(
        locks.check_quorum().await.is_err(),
        "an untrusted Redis certificate is refused"
    );
    assert_eq!(amqp.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(redis.handshakes.load(Ordering::SeqCst), 0);

    // With the CA bundle (ours and PostgreSQL's), everything connects and works.
    let dir = std::env::temp_dir().join(format!("cmdflow-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = dir.join("ca.pem");
    let pg_cert = std::fs::read_to_string(PG_CERT).unwrap();
    std::fs::write(&bundle, format!("{}\n{pg_cert}", pki.ca_pem)).unwrap();
    cmdflow_shared::tls::configure(Some(bundle.to_str().unwrap())).unwrap();

    let mut env = TestEnv::with(|c| {
        c.amqp_url = amqps.clone();
        c.redis_urls = rediss.clone();
        c.database_url = format!("{}?sslmode=verify-ca", c.database_url);
    })
    .await;
    let on_tls: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(on_tls, "the PostgreSQL connection is encrypted");
    let gw = env.start_gateway().await;
    env.start_worker().await;
    let id = start_command(&gw.url, "demo.counter", "member:1", json!({})).await;
    env.wait_state(&id, CommandState::Running).await;
    for _ in 0..3 {
        send(&gw.url, &event("demo.increment", Some(&id), json!({}))).await;
    }
    eventually(Duration::from_secs(30), "three increments", || async {
        let c = env.command(&id).await?;
        (c.data["count"] == 3).then_some(())
    })
    .await;
    send(&gw.url, &event("demo.finish", Some(&id), json!({}))).await;
    let done = env.wait_state(&id, CommandState::Completed).await;
    assert_eq!(done.data["count"], 3);
    assert!(
        amqp.handshakes.load(Ordering::SeqCst) >= 2,
        "gateway and worker"
    );
    eventually(
        Duration::from_secs(5),
        "a Redlock lock over TLS",
        || async { (redis.handshakes.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    env.cleanup().await;
    cmdflow_shared::tls::configure(None).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
