//! Slow, idle and too many clients at a real gateway, over raw TCP connections: what the serve
//! loop does before any authentication runs (issue #20, item 8).
//!
//! - A client that trickles its request head one header line a second is disconnected once the
//!   header timeout has passed, and not before.
//! - A keep-alive connection left idle after a request is closed after the idle timeout.
//! - A request in flight for more than twice the idle timeout (its body sent in two parts, 5 s
//!   apart) is answered, not cut; a keep-alive connection in use stays open past both timeouts,
//!   and a pause between requests longer than the header timeout (but shorter than the idle
//!   timeout) does not close it.
//! - Past the connection cap, a new connection is refused at once (a 503, then closed), and one
//!   is served again as soon as an open one closes.
//! - Stopping still drains: idle connections are closed, no new one is accepted, and a request
//!   in flight is answered.
//!
//! The timeouts are configured short (2 to 4 s); the checks bound when a close happens loosely
//! (never before most of the timeout, always within a few seconds after), they measure no
//! performance.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cmdflow_tests::{TEST_KEY, TestEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `host:port` of a gateway URL.
fn authority(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// Waits up to `within` for the server to close `stream` (a read of 0 bytes, or an error),
/// discarding whatever it sends first. Returns whether it closed, and what it sent.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> (bool, String) {
    let deadline = tokio::time::Instant::now() + within;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (false, String::from_utf8_lossy(&received).into_owned()),
            Ok(Ok(0) | Err(_)) => return (true, String::from_utf8_lossy(&received).into_owned()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one response (head and `content-length` body) from `stream`; returns its status and
/// body.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return (status, body.to_owned());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("a response within 10s")
            .expect("read the response");
        assert!(n > 0, "the connection closed mid-response: {text:?}");
        received.extend_from_slice(&buf[..n]);
    }
}

/// Sends `GET /healthz` on a keep-alive connection and reads its answer.
async fn healthz(stream: &mut TcpStream) -> u16 {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    read_response(stream).await.0
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_at_the_header_timeout() {
    let mut env = TestEnv::new().await;
    let gw = env
        .start_gateway_with(|c| c.http_header_timeout = Duration::from_secs(2))
        .await;
    let mut stream = TcpStream::connect(authority(&gw.url)).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n")
        .await
        .unwrap();
    let mut closed_after = None;
    for line in 0..10 {
        // Nothing comes back while the head is incomplete; a second later, one more line.
        let (closed, sent) = closed_within(&mut stream, Duration::from_secs(1)).await;
        if closed {
            assert!(
                !sent.contains(" 200 "),
                "a trickled request was served: {sent}"
            );
            closed_after = Some(started.elapsed());
            break;
        }
        if stream
            .write_all(format!("x-trickle-{line}: {line}\r\n").as_bytes())
            .await
            .is_err()
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the trickling client is disconnected within 10s");
    assert!(
        closed_after >= Duration::from_millis(1500),
        "closed before the header timeout: after {closed_after:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let mut env = TestEnv::new().await;
    // The header timeout stays at its 10s: the close comes from the idle timer.
    let gw = env
        .start_gateway_with(|c| c.http_idle_timeout = Duration::from_secs(2))
        .await;
    let mut stream = TcpStream::connect(authority(&gw.url)).await.unwrap();
    assert_eq!(healthz(&mut stream).await, 200);
    let answered = Instant::now();
    let (closed, sent) = closed_within(&mut stream, Duration::from_secs(8)).await;
    assert!(closed, "the idle connection is still open after 8s");
    assert!(
        sent.is_empty(),
        "nothing is sent on an idle close: {sent:?}"
    );
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(1500),
        "closed before the idle timeout: after {idle:?}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_slow_request_in_flight_is_not_cut_by_the_idle_timeout() {
    let mut env = TestEnv::new().await;
    let gw = env
        .start_gateway_with(|c| {
            c.http_idle_timeout = Duration::from_secs(2);
            c.http_header_timeout = Duration::from_secs(2);
        })
        .await;
    let body = serde_json::to_vec(&cmdflow_tests::event(
        "demo.slow_upload",
        None,
        serde_json::json!({"note": "sent in two parts"}),
    ))
    .unwrap();
    let (first, second) = body.split_at(body.len() / 2);
    let mut stream = TcpStream::connect(authority(&gw.url)).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {TEST_KEY}\r\n\
         content-type: application/cloudevents+json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    // More than twice both timeouts, with the request in flight: the connection stays open (an
    // idle timer running would have closed it, gracefully at first, then by force).
    let (closed, sent) = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(!closed, "the request in flight was cut: {sent:?}");
    stream.write_all(second).await.unwrap();
    let (status, answer) = read_response(&mut stream).await;
    assert_eq!(status, 202, "{answer}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_keep_alive_connection_in_use_stays_open_past_both_timeouts() {
    let mut env = TestEnv::new().await;
    let gw = env
        .start_gateway_with(|c| {
            c.http_header_timeout = Duration::from_secs(2);
            c.http_idle_timeout = Duration::from_secs(4);
        })
        .await;
    let mut stream = TcpStream::connect(authority(&gw.url)).await.unwrap();
    // A request a second for 5s: longer than both timeouts in all.
    for _ in 0..6 {
        assert_eq!(healthz(&mut stream).await, 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A pause longer than the header timeout, shorter than the idle timeout: the header timer
    // does not run between requests.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(healthz(&mut stream).await, 200);
    env.cleanup().await;
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_until_one_closes() {
    let mut env = TestEnv::new().await;
    let gw = env
        .start_gateway_with(|c| {
            c.http_max_connections = 3;
            // Long enough that the held connections are not closed during the test.
            c.http_header_timeout = Duration::from_secs(60);
            c.http_idle_timeout = Duration::from_secs(60);
        })
        .await;
    let addr = authority(&gw.url);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        assert_eq!(healthz(&mut stream).await, 200);
        held.push(stream);
    }

    // A fourth: accepted by the kernel, then refused by the gateway at once, never served.
    let mut fourth = TcpStream::connect(&addr).await.unwrap();
    // The request may meet a socket the gateway already closed.
    drop(
        fourth
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
            .await,
    );
    let (closed, sent) = closed_within(&mut fourth, Duration::from_secs(5)).await;
    assert!(
        closed,
        "the connection past the cap is still open: {sent:?}"
    );
    assert!(
        sent.is_empty() || sent.starts_with("HTTP/1.1 503 "),
        "the connection past the cap was served: {sent:?}"
    );
    // The held ones are still served.
    assert_eq!(healthz(&mut held[0]).await, 200);

    // One closes: a new connection is served again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let served = async {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
                .await
                .ok()?;
            let mut received = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), async {
                let mut buf = [0u8; 1024];
                while !received.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await
            .ok()?;
            Some(String::from_utf8_lossy(&received).into_owned())
        }
        .await
        .unwrap_or_default();
        if served.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection served 5s after one of the capped ones closed: {served:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn stopping_closes_idle_connections_and_answers_the_request_in_flight() {
    let mut env = TestEnv::new().await;
    let gw = env.start_gateway().await;
    let addr = authority(&gw.url);
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert_eq!(healthz(&mut idle).await, 200);
    let body = serde_json::to_vec(&cmdflow_tests::event(
        "demo.during_shutdown",
        None,
        serde_json::json!({}),
    ))
    .unwrap();
    let (first, second) = body.split_at(body.len() / 2);
    let mut in_flight = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {TEST_KEY}\r\n\
         content-type: application/cloudevents+json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(first).await.unwrap();
    // The request has reached its handler before the stop.
    tokio::time::sleep(Duration::from_millis(500)).await;

    gw.shutdown.cancel();
    let (closed, sent) = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(
        closed,
        "an idle connection is still open 5s after the stop: {sent:?}"
    );
    cmdflow_tests::eventually(Duration::from_secs(5), "the listener to close", || {
        let addr = addr.clone();
        async move { TcpStream::connect(&addr).await.err() }
    })
    .await;

    in_flight.write_all(second).await.unwrap();
    let (status, answer) = read_response(&mut in_flight).await;
    assert_eq!(status, 202, "{answer}");
    let (closed, sent) = closed_within(&mut in_flight, Duration::from_secs(5)).await;
    assert!(closed, "the drained connection stays open: {sent:?}");
    env.cleanup().await;
}
