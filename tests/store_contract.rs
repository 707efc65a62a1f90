//! One contract for both state stores: the local folder and Blob Storage (against Azurite,
//! started here). Each store is opened twice on the same state, standing in for two
//! processes or two Function instances.

mod support;

use std::sync::Arc;

use mati_sentinel::state::blob::BlobStore;
use mati_sentinel::state::file::FileStore;
use mati_sentinel::state::{Precondition, StateError, StateStore};

/// Runs the whole contract on two handles to the same state.
async fn contract(a: Arc<dyn StateStore>, b: Arc<dyn StateStore>) {
    // Missing objects read as absent.
    assert!(a.read("checkpoint.json").await.unwrap().is_none());

    // Create-if-absent happens once.
    let v1 = a
        .write("checkpoint.json", b"one", Precondition::Absent)
        .await
        .unwrap();
    assert!(matches!(
        b.write("checkpoint.json", b"other", Precondition::Absent)
            .await,
        Err(StateError::Conflict { .. })
    ));

    // A write with the version read succeeds; a write with a stale version is refused and
    // the newer state survives.
    let read = b.read("checkpoint.json").await.unwrap().unwrap();
    assert_eq!(read.bytes, b"one");
    assert_eq!(read.version, v1);
    let v2 = b
        .write(
            "checkpoint.json",
            b"two",
            Precondition::Matches(read.version.clone()),
        )
        .await
        .unwrap();
    assert_ne!(v1, v2);
    assert!(matches!(
        a.write("checkpoint.json", b"stale", Precondition::Matches(v1))
            .await,
        Err(StateError::Conflict { .. })
    ));
    assert_eq!(
        a.read("checkpoint.json").await.unwrap().unwrap().bytes,
        b"two"
    );

    // Two writers racing from the same read: exactly one wins.
    let base = a.read("checkpoint.json").await.unwrap().unwrap().version;
    let (ra, rb) = tokio::join!(
        a.write(
            "checkpoint.json",
            b"from-a",
            Precondition::Matches(base.clone())
        ),
        b.write(
            "checkpoint.json",
            b"from-b",
            Precondition::Matches(base.clone())
        ),
    );
    assert_eq!(ra.is_ok() as u8 + rb.is_ok() as u8, 1, "{ra:?} {rb:?}");
    let winner: &[u8] = if ra.is_ok() { b"from-a" } else { b"from-b" };
    assert_eq!(
        b.read("checkpoint.json").await.unwrap().unwrap().bytes,
        winner
    );

    // A large cache round-trips intact.
    let big: Vec<u8> = (0..8_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let v = a
        .write("dedupe-cache.bin", &big, Precondition::Absent)
        .await
        .unwrap();
    let back = b.read("dedupe-cache.bin").await.unwrap().unwrap();
    assert_eq!(back.version, v);
    assert!(back.bytes == big, "large object changed in transit");

    // The lock is exclusive across handles and free again after release.
    let held = a.try_lock().await.unwrap().expect("the first lock");
    assert!(b.try_lock().await.unwrap().is_none());
    held.renew().await.unwrap();
    assert!(b.try_lock().await.unwrap().is_none());
    held.release().await.unwrap();
    let again = b.try_lock().await.unwrap().expect("free after release");
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_folder_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract(
        Arc::new(FileStore::new(dir.path())),
        Arc::new(FileStore::new(dir.path())),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_blob_store_keeps_the_contract() {
    let azurite = support::Azurite::start(0);
    let a = BlobStore::development_storage_at(
        &azurite.endpoint,
        "contract",
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    let b = BlobStore::development_storage_at(
        &azurite.endpoint,
        "contract",
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    contract(Arc::new(a), Arc::new(b)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_store_without_a_reachable_service_says_so() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = BlobStore::development_storage_at(
        &format!("http://127.0.0.1:{port}"),
        "x",
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    let err = store.read("checkpoint.json").await.unwrap_err();
    assert!(matches!(err, StateError::Unavailable(_)), "{err}");
    assert!(
        !err.to_string().contains("sig="),
        "no SAS in messages: {err}"
    );
}

/// A cycle longer than the lease keeps the lock: the lease is renewed in the background.
/// A lock that is never released (a crash) lapses on its own.
#[tokio::test(flavor = "multi_thread")]
async fn the_blob_lease_is_renewed_while_held_and_lapses_after_a_crash() {
    use std::time::Duration;
    let azurite = support::Azurite::start(0);
    let store = |renew: u64| {
        BlobStore::development_storage_at(
            &azurite.endpoint,
            "lease",
            std::time::Duration::from_secs(30),
        )
        .unwrap()
        .with_lease_timing(15, Duration::from_secs(renew))
    };
    let (a, b) = (store(5), store(5));
    let held = a.try_lock().await.unwrap().expect("the first lock");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        b.try_lock().await.unwrap().is_none(),
        "still held 20 s into a 15 s lease"
    );
    held.release().await.unwrap();

    // A holder that stops renewing (the process died) loses the lock after the lease.
    let crashed = store(3600).try_lock().await.unwrap().expect("lock");
    std::mem::forget(crashed);
    assert!(b.try_lock().await.unwrap().is_none());
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert!(b.try_lock().await.unwrap().is_some(), "the lease lapsed");
}
