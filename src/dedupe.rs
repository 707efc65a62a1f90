//! What Sentinel already holds: pure, no I/O, the clock passed in.
//!
//! The cache maps a Mandiant id to the STIX id it was uploaded under, the content fingerprint
//! and the `valid_until` Sentinel accepted. Invariant: only objects Sentinel accepted are
//! recorded, so losing or distrusting the cache costs re-uploads, never lost indicators.
//! The stored form is a compact binary file (a million entries in about 30 MB).

use std::collections::HashMap;

use thiserror::Error;

/// One accepted upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The STIX UUID (without `indicator--`) as 16 bytes.
    pub stix_uuid: [u8; 16],
    pub fingerprint: u64,
    /// `valid_until` accepted by Sentinel, Unix seconds.
    pub valid_until: i64,
}

/// Why an indicator is (or is not) uploaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    New,
    Changed,
    /// Unchanged, but its lifetime would lapse in Sentinel before Mandiant's latest view.
    Extend,
    Unchanged,
}

impl Decision {
    pub fn uploads(self) -> bool {
        self != Decision::Unchanged
    }
}

/// A re-upload only to extend `valid_until` is worth it when it gains more than a day.
pub const EXTEND_THRESHOLD_SECS: i64 = 86_400;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupeCache {
    entries: HashMap<String, Entry>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the dedupe cache has an unknown format (version byte {0})")]
    UnknownFormat(u8),
    #[error("the dedupe cache is truncated or corrupt")]
    Corrupt,
}

const MAGIC: &[u8; 4] = b"MSDC";
const FORMAT_VERSION: u8 = 1;

/// Mandiant ids are `<type>--<uuid>`; the known types pack into one byte.
const KINDS: [&str; 7] = ["ipv4", "fqdn", "url", "md5", "sha1", "sha256", "ipv6"];
const RAW_KEY: u8 = 0xff;

pub fn uuid_bytes(uuid: &str) -> Option<[u8; 16]> {
    if !crate::config::is_guid(uuid) {
        return None;
    }
    let hex: Vec<u8> = uuid.bytes().filter(|b| *b != b'-').collect();
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    // Only lowercase text round-trips through bytes.
    (uuid_text(&out) == uuid).then_some(out)
}

pub use crate::stix::uuid_text;

impl DedupeCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, mandiant_id: &str) -> Option<&Entry> {
        self.entries.get(mandiant_id)
    }

    pub fn decide(&self, mandiant_id: &str, fingerprint: u64, valid_until: i64) -> Decision {
        match self.entries.get(mandiant_id) {
            None => Decision::New,
            Some(e) if e.fingerprint != fingerprint => Decision::Changed,
            Some(e) if valid_until - e.valid_until > EXTEND_THRESHOLD_SECS => Decision::Extend,
            Some(_) => Decision::Unchanged,
        }
    }

    pub fn record(&mut self, mandiant_id: &str, entry: Entry) {
        self.entries.insert(mandiant_id.to_string(), entry);
    }

    /// Drops entries whose `valid_until` has passed: Sentinel no longer matches them, so a
    /// returning indicator must be uploaded again anyway. Returns how many were dropped.
    pub fn prune(&mut self, now_unix: i64) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.valid_until > now_unix);
        before - self.entries.len()
    }

    /// Layout: `MSDC`, version, entry count (u64 LE), then per entry a key tag (a known
    /// type's index followed by its 16 UUID bytes, or 0xff, a u16 length and the raw id),
    /// a flag byte (1 when the STIX UUID is the one derived from the Mandiant id, else 0
    /// and its 16 bytes follow), the fingerprint (u64 LE) and `valid_until` (i64 LE).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + self.entries.len() * 34);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        let mut keys: Vec<&String> = self.entries.keys().collect();
        // Sorted so the same cache always encodes to the same bytes (stable versions).
        keys.sort_unstable();
        for key in keys {
            let e = &self.entries[key];
            match packed_key(key) {
                Some((kind, uuid)) => {
                    out.push(kind);
                    out.extend_from_slice(&uuid);
                }
                None => {
                    let bytes = key.as_bytes();
                    let len = bytes.len().min(u16::MAX as usize);
                    out.push(RAW_KEY);
                    out.extend_from_slice(&(len as u16).to_le_bytes());
                    out.extend_from_slice(&bytes[..len]);
                }
            }
            if derived_uuid(key) == e.stix_uuid {
                out.push(1);
            } else {
                out.push(0);
                out.extend_from_slice(&e.stix_uuid);
            }
            out.extend_from_slice(&e.fingerprint.to_le_bytes());
            out.extend_from_slice(&e.valid_until.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Cursor { b: bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(DecodeError::Corrupt);
        }
        let version = r.take(1)?[0];
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnknownFormat(version));
        }
        let count = r.u64()? as usize;
        // Each entry takes at least 34 bytes: a count larger than that is corrupt.
        if count > bytes.len() / 34 + 1 {
            return Err(DecodeError::Corrupt);
        }
        let mut entries = HashMap::with_capacity(count);
        for _ in 0..count {
            let tag = r.take(1)?[0];
            let key = if tag == RAW_KEY {
                let len = u16::from_le_bytes(r.take(2)?.try_into().unwrap()) as usize;
                String::from_utf8(r.take(len)?.to_vec()).map_err(|_| DecodeError::Corrupt)?
            } else {
                let kind = KINDS.get(tag as usize).ok_or(DecodeError::Corrupt)?;
                let uuid: [u8; 16] = r.take(16)?.try_into().unwrap();
                format!("{kind}--{}", uuid_text(&uuid))
            };
            let stix_uuid = match r.take(1)?[0] {
                1 => derived_uuid(&key),
                0 => r.take(16)?.try_into().unwrap(),
                _ => return Err(DecodeError::Corrupt),
            };
            let fingerprint = r.u64()?;
            let valid_until = r.u64()? as i64;
            entries.insert(
                key,
                Entry {
                    stix_uuid,
                    fingerprint,
                    valid_until,
                },
            );
        }
        if r.at != bytes.len() {
            return Err(DecodeError::Corrupt);
        }
        Ok(DedupeCache { entries })
    }
}

fn packed_key(key: &str) -> Option<(u8, [u8; 16])> {
    let (kind, uuid) = key.split_once("--")?;
    let idx = KINDS.iter().position(|k| *k == kind)?;
    Some((idx as u8, uuid_bytes(uuid)?))
}

/// The STIX UUID `stix::indicator_id` gives a Mandiant id, as bytes.
pub fn derived_uuid(mandiant_id: &str) -> [u8; 16] {
    let id = crate::stix::indicator_id(mandiant_id);
    uuid_bytes(id.strip_prefix("indicator--").expect("indicator id")).expect("derived uuid")
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Corrupt)?;
        let s = self.b.get(self.at..end).ok_or(DecodeError::Corrupt)?;
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn entry(id: &str, fp: u64, until: i64) -> Entry {
        Entry {
            stix_uuid: derived_uuid(id),
            fingerprint: fp,
            valid_until: until,
        }
    }

    #[test]
    fn decisions() {
        let mut c = DedupeCache::new();
        let id = "ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf8";
        assert_eq!(c.decide(id, 1, 10 * DAY), Decision::New);
        c.record(id, entry(id, 1, 10 * DAY));
        assert_eq!(c.decide(id, 1, 10 * DAY), Decision::Unchanged);
        assert_eq!(
            c.decide(id, 1, 11 * DAY),
            Decision::Unchanged,
            "exactly a day more"
        );
        assert_eq!(c.decide(id, 1, 11 * DAY + 1), Decision::Extend);
        assert_eq!(c.decide(id, 2, 10 * DAY), Decision::Changed);
        assert!(!Decision::Unchanged.uploads() && Decision::Extend.uploads());
    }

    #[test]
    fn prune_drops_only_lapsed_entries() {
        let mut c = DedupeCache::new();
        c.record("a", entry("a", 1, 100));
        c.record("b", entry("b", 1, 200));
        assert_eq!(c.prune(150), 1);
        assert!(c.get("a").is_none() && c.get("b").is_some());
    }

    #[test]
    fn encode_decode_round_trips_packed_raw_and_foreign_ids() {
        let mut c = DedupeCache::new();
        c.record(
            "ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf8",
            entry(
                "ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf8",
                7,
                1_800_000_000,
            ),
        );
        c.record("weird id ünicode", entry("weird id ünicode", u64::MAX, -5));
        // Reconciliation may adopt an id Sentinel already had: kept as 16 bytes.
        c.record(
            "md5--e54a4f18-5d4d-56cd-8a41-a96938e9779f",
            Entry {
                stix_uuid: [9; 16],
                fingerprint: 3,
                valid_until: 42,
            },
        );
        let bytes = c.encode();
        assert_eq!(DedupeCache::decode(&bytes).unwrap(), c);
        assert_eq!(
            bytes,
            DedupeCache::decode(&bytes).unwrap().encode(),
            "stable bytes"
        );
    }

    #[test]
    fn packed_entries_are_compact() {
        let mut c = DedupeCache::new();
        for i in 0..1000u32 {
            let id = format!("ipv4--{i:08x}-0000-5000-8000-000000000000");
            c.record(&id, entry(&id, i as u64, i as i64));
        }
        let per_entry = c.encode().len() / c.len();
        assert!(per_entry <= 34, "{per_entry} bytes per entry");
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let mut c = DedupeCache::new();
        c.record("fqdn--1", entry("fqdn--1", 1, 1));
        let bytes = c.encode();
        for cut in 0..bytes.len() {
            assert!(DedupeCache::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut v2 = bytes.clone();
        v2[4] = 9;
        assert_eq!(DedupeCache::decode(&v2), Err(DecodeError::UnknownFormat(9)));
        let mut trailing = bytes;
        trailing.push(0);
        assert_eq!(DedupeCache::decode(&trailing), Err(DecodeError::Corrupt));
    }
}
