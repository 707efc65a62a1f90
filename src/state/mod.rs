//! Where the checkpoint and the dedupe cache live between cycles.
//!
//! `StateStore` is the product's one trait, because there are two real stores: a local folder
//! (the default) and Blob Storage. Every write is conditional on the version read, and a lock
//! keeps two cycles from running at once. Invariant: a write that would overwrite state newer
//! than what the writer read is refused with `StateError::Conflict`.

pub mod blob;
pub mod file;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// An opaque version of a stored object (a content hash locally, an ETag in Blob Storage).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version(pub String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub bytes: Vec<u8>,
    pub version: Version,
}

/// The condition a write must meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// The object must not exist yet.
    Absent,
    /// The object must still be at this version.
    Matches(Version),
}

impl Precondition {
    pub fn from_read(read: Option<&Versioned>) -> Self {
        match read {
            None => Precondition::Absent,
            Some(v) => Precondition::Matches(v.version.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state object {name} changed since it was read (another cycle wrote it); nothing was overwritten"
    )]
    Conflict { name: String },
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("state object {name} is unreadable: {reason}")]
    Corrupt { name: String, reason: String },
}

/// Held while a cycle runs; dropping or releasing it lets the next cycle in.
#[async_trait]
pub trait Lock: Send + Sync {
    /// Keeps a lease-based lock alive during long cycles.
    async fn renew(&self) -> Result<(), StateError>;
    async fn release(self: Box<Self>) -> Result<(), StateError>;
}

#[async_trait]
pub trait StateStore: Send + Sync {
    /// A short description for logs and `check`.
    fn describe(&self) -> String;
    async fn read(&self, name: &str) -> Result<Option<Versioned>, StateError>;
    async fn write(
        &self,
        name: &str,
        bytes: &[u8],
        condition: Precondition,
    ) -> Result<Version, StateError>;
    /// `None` when another cycle holds the lock.
    async fn try_lock(&self) -> Result<Option<Box<dyn Lock>>, StateError>;
}

pub const CHECKPOINT: &str = "checkpoint.json";
pub const DEDUPE_CACHE: &str = "dedupe-cache.bin";
pub const REFUSED: &str = "refused.json";

/// Objects Sentinel refused (an `errors[]` entry), kept to be sent again by later cycles: the
/// checkpoint moves past their window, so nothing else would bring them back until Mandiant
/// updates them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RefusedQueue {
    pub format: u32,
    pub objects: Vec<Refused>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    pub mandiant_id: String,
    /// The STIX object as it was sent.
    pub object: serde_json::Value,
    /// What the dedupe cache records once it is accepted.
    pub stix_uuid: Option<[u8; 16]>,
    pub fingerprint: u64,
    pub valid_until: i64,
    /// An expiry (the cache forgets the indicator once accepted).
    pub expire: bool,
    /// Cycles in which Sentinel refused it.
    pub attempts: u32,
    pub message: String,
}

impl RefusedQueue {
    pub const FORMAT: u32 = 1;

    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let q: RefusedQueue = serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
            name: REFUSED.into(),
            reason: e.to_string(),
        })?;
        if q.format != Self::FORMAT {
            return Err(StateError::Corrupt {
                name: REFUSED.into(),
                reason: format!("unknown format {}", q.format),
            });
        }
        Ok(q)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the refused queue serialises")
    }
}

/// Where the next cycle starts. Never holds a Mandiant `next` cursor: those expire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format: u32,
    /// The start of the next Mandiant time window (Unix seconds).
    pub window_start: i64,
    /// When the last cycle finished its work (Unix seconds), if one ever did.
    pub last_finished: Option<i64>,
    /// A cycle stopped before reaching the present; the next timer tick continues at once.
    pub backfill_in_progress: bool,
}

impl Checkpoint {
    pub const FORMAT: u32 = 1;

    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let c: Checkpoint = serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
            name: CHECKPOINT.into(),
            reason: e.to_string(),
        })?;
        if c.format != Self::FORMAT {
            return Err(StateError::Corrupt {
                name: CHECKPOINT.into(),
                reason: format!("unknown format {}", c.format),
            });
        }
        Ok(c)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a checkpoint serialises")
    }

    /// A cycle is due when none has finished, a backfill is in progress, or `schedule_hours`
    /// have passed since the last one finished.
    pub fn is_due(checkpoint: Option<&Checkpoint>, schedule_hours: u32, now_unix: i64) -> bool {
        match checkpoint {
            None => true,
            Some(c) if c.backfill_in_progress => true,
            Some(c) => match c.last_finished {
                None => true,
                Some(t) => now_unix - t >= i64::from(schedule_hours) * 3600,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(last: Option<i64>, backfill: bool) -> Checkpoint {
        Checkpoint {
            format: 1,
            window_start: 0,
            last_finished: last,
            backfill_in_progress: backfill,
        }
    }

    #[test]
    fn due_rules() {
        let h = 3600;
        assert!(Checkpoint::is_due(None, 4, 0));
        assert!(Checkpoint::is_due(Some(&cp(None, false)), 4, 0));
        assert!(Checkpoint::is_due(Some(&cp(Some(0), true)), 4, 60));
        assert!(!Checkpoint::is_due(Some(&cp(Some(0), false)), 4, 4 * h - 1));
        assert!(Checkpoint::is_due(Some(&cp(Some(0), false)), 4, 4 * h));
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_unknown_formats() {
        let c = cp(Some(5), true);
        assert_eq!(Checkpoint::decode(&c.encode()).unwrap(), c);
        let mut other = c.clone();
        other.format = 2;
        assert!(Checkpoint::decode(&other.encode()).is_err());
        assert!(Checkpoint::decode(b"{").is_err());
    }

    #[test]
    fn the_refused_queue_round_trips_and_rejects_unknown_formats() {
        let q = RefusedQueue {
            format: RefusedQueue::FORMAT,
            objects: vec![Refused {
                mandiant_id: "ipv4--1".into(),
                object: serde_json::json!({"type": "indicator", "pattern": "[ipv4-addr:value = '1.2.3.4']"}),
                stix_uuid: Some([7; 16]),
                fingerprint: u64::MAX,
                valid_until: 1_800_000_000,
                expire: false,
                attempts: 2,
                message: "Error for Property=pattern".into(),
            }],
        };
        assert_eq!(RefusedQueue::decode(&q.encode()).unwrap(), q);
        let mut other = q.clone();
        other.format = 2;
        assert!(RefusedQueue::decode(&other.encode()).is_err());
        assert!(RefusedQueue::decode(b"[]").is_err());
    }
}
