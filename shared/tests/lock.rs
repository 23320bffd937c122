//! The Redlock lock against the local Redis: validity runs out for a holder that stops
//! extending (as a paused process does), and is kept by one that extends.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cmdflow_shared::CommandId;
use cmdflow_shared::lock::Locks;

fn locks(ttl: Duration) -> Locks {
    let url = std::env::var("CMDFLOW_TEST_REDIS_URLS")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let namespace = format!("lockt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    Locks::new(&[url], &namespace, ttl, Duration::from_millis(50)).unwrap()
}

#[tokio::test]
async fn a_holder_that_stops_extending_finds_its_lock_invalid_and_another_takes_it() {
    let locks = locks(Duration::from_secs(1));
    let id = CommandId::new();
    let held = locks.acquire(id).await.unwrap().expect("free lock");
    assert!(held.is_valid());
    assert!(
        locks.acquire(id).await.unwrap().is_none(),
        "busy while held"
    );
    held.stop_extending();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!held.is_valid(), "validity ran out without extensions");
    let other = locks
        .acquire(id)
        .await
        .unwrap()
        .expect("free after the TTL");
    assert!(other.is_valid());
    locks.release(other).await;
    locks.release(held).await;
}

#[tokio::test]
async fn a_holder_that_keeps_extending_stays_valid_past_its_ttl() {
    let locks = locks(Duration::from_secs(1));
    let id = CommandId::new();
    let held = locks.acquire(id).await.unwrap().expect("free lock");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(held.is_valid(), "extended every TTL/3");
    assert!(locks.acquire(id).await.unwrap().is_none());
    locks.release(held).await;
}
