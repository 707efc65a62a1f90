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
    /// The STIX UUID (without `indicator--`) as 16 bytes when it is not the one derived from
    /// the Mandiant id (an object adopted from the workspace); `None`, the usual case, means
    /// derived, and costs nothing to store or load.
    pub stix_uuid: Option<[u8; 16]>,
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
    /// In Sentinel, but no longer passing the policy: re-sent with `valid_until` now, so
    /// Sentinel stops matching it (not `revoked`, which STIX makes final: it may qualify again).
    Expire,
}

/// A re-upload only to extend `valid_until` is worth it when it gains more than a day.
pub const EXTEND_THRESHOLD_SECS: i64 = 86_400;

/// A Mandiant id as a map key: `<type>--<uuid>` ids (all of them, in practice) pack into 17
/// bytes without a heap allocation; anything else is kept as text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Packed(u8, [u8; 16]),
    Raw(Box<str>),
}

impl Key {
    fn of(mandiant_id: &str) -> Key {
        match packed_key(mandiant_id) {
            Some((kind, uuid)) => Key::Packed(kind, uuid),
            None => Key::Raw(mandiant_id.into()),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupeCache {
    entries: HashMap<Key, Entry>,
    /// Objects found in the workspace by a reconciliation, by pattern. Never saved: an
    /// object's Mandiant id is learnt only when Mandiant sends it, and it is then recorded.
    seeded: HashMap<Box<str>, Seeded>,
}

/// An indicator object the workspace already holds, read back by a reconciliation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seeded {
    pub stix_uuid: [u8; 16],
    /// `None` when it is not one of ours (another tool's object, or the vendor's): it is
    /// then always re-sent once, under its own id.
    pub fingerprint: Option<u64>,
    pub valid_until: i64,
}

/// What Sentinel holds for an indicator, as far as we know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The STIX UUID when it is not the one derived from the Mandiant id.
    pub stix_uuid: Option<[u8; 16]>,
    pub fingerprint: Option<u64>,
    pub valid_until: i64,
    /// Known from the workspace, not from our own upload: not in the cache yet.
    pub seeded: bool,
}

impl Held {
    /// The cache entry for it as it stands (a seeded object Sentinel already has).
    pub fn entry(&self) -> Option<Entry> {
        Some(Entry {
            stix_uuid: self.stix_uuid,
            fingerprint: self.fingerprint?,
            valid_until: self.valid_until,
        })
    }
}

/// The decision for an object with this fingerprint and lifetime, given what Sentinel holds.
pub fn judge(held: Option<&Held>, fingerprint: u64, valid_until: i64) -> Decision {
    match held {
        None => Decision::New,
        Some(h) if h.fingerprint != Some(fingerprint) => Decision::Changed,
        Some(h) if valid_until - h.valid_until > EXTEND_THRESHOLD_SECS => Decision::Extend,
        Some(_) => Decision::Unchanged,
    }
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

/// A lowercase UUID's 16 bytes; `None` for anything else (uppercase does not round-trip).
pub fn uuid_bytes(uuid: &str) -> Option<[u8; 16]> {
    let b = uuid.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut i = 0;
    while i < 36 {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        out[n] = nibble(b[i])? << 4 | nibble(b[i + 1])?;
        n += 1;
        i += 2;
    }
    Some(out)
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
        self.entries.get(&Key::of(mandiant_id))
    }

    /// Remembers an object the workspace holds. When several share a pattern (duplicates
    /// another tool left), the first is kept, so one of them is updated and no more are made.
    /// Returns whether it was new.
    pub fn seed(&mut self, pattern: &str, s: Seeded) -> bool {
        if self.seeded.contains_key(pattern) {
            return false;
        }
        self.seeded.insert(pattern.into(), s);
        true
    }

    pub fn seeded(&self) -> usize {
        self.seeded.len()
    }

    /// What Sentinel holds for this indicator: what we recorded uploading, or else an object
    /// with the same pattern found in the workspace (under the id derived from this Mandiant
    /// id, or one to adopt).
    pub fn lookup(&self, mandiant_id: &str, pattern: &str) -> Option<Held> {
        if let Some(e) = self.get(mandiant_id) {
            return Some(Held {
                stix_uuid: e.stix_uuid,
                fingerprint: Some(e.fingerprint),
                valid_until: e.valid_until,
                seeded: false,
            });
        }
        if self.seeded.is_empty() {
            return None;
        }
        let s = self.seeded.get(pattern)?;
        Some(Held {
            stix_uuid: (s.stix_uuid != derived_uuid(mandiant_id)).then_some(s.stix_uuid),
            fingerprint: s.fingerprint,
            valid_until: s.valid_until,
            seeded: true,
        })
    }

    pub fn record(&mut self, mandiant_id: &str, entry: Entry) {
        self.entries.insert(Key::of(mandiant_id), entry);
    }

    /// Forgets an indicator (after Sentinel accepted its expiry): if it qualifies again, it
    /// is new again.
    pub fn remove(&mut self, mandiant_id: &str) -> bool {
        self.entries.remove(&Key::of(mandiant_id)).is_some()
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
    /// Entries come in map order: equal caches may encode to different bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + self.entries.len() * 34);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (key, e) in &self.entries {
            match key {
                Key::Packed(kind, uuid) => {
                    out.push(*kind);
                    out.extend_from_slice(uuid);
                }
                Key::Raw(raw) => {
                    let bytes = raw.as_bytes();
                    let len = bytes.len().min(u16::MAX as usize);
                    out.push(RAW_KEY);
                    out.extend_from_slice(&(len as u16).to_le_bytes());
                    out.extend_from_slice(&bytes[..len]);
                }
            }
            match &e.stix_uuid {
                None => out.push(1),
                Some(uuid) => {
                    out.push(0);
                    out.extend_from_slice(uuid);
                }
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
                let text = std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Corrupt)?;
                Key::Raw(text.into())
            } else {
                if usize::from(tag) >= KINDS.len() {
                    return Err(DecodeError::Corrupt);
                }
                Key::Packed(tag, r.take(16)?.try_into().unwrap())
            };
            let stix_uuid = match r.take(1)?[0] {
                1 => None,
                0 => Some(r.take(16)?.try_into().unwrap()),
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
        Ok(DedupeCache {
            entries,
            seeded: HashMap::new(),
        })
    }
}

fn packed_key(key: &str) -> Option<(u8, [u8; 16])> {
    let (kind, uuid) = key.split_once("--")?;
    let idx = KINDS.iter().position(|k| *k == kind)?;
    Some((idx as u8, uuid_bytes(uuid)?))
}

/// The STIX UUID `stix::indicator_id` gives a Mandiant id, as bytes.
pub fn derived_uuid(mandiant_id: &str) -> [u8; 16] {
    crate::stix::derive_uuid_bytes("indicator", mandiant_id)
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

    fn entry(fp: u64, until: i64) -> Entry {
        Entry {
            stix_uuid: None,
            fingerprint: fp,
            valid_until: until,
        }
    }

    #[test]
    fn decisions() {
        let mut c = DedupeCache::new();
        let id = "ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf8";
        let decide = |c: &DedupeCache, fp, until| judge(c.lookup(id, "").as_ref(), fp, until);
        assert_eq!(decide(&c, 1, 10 * DAY), Decision::New);
        c.record(id, entry(1, 10 * DAY));
        assert_eq!(decide(&c, 1, 10 * DAY), Decision::Unchanged);
        assert_eq!(
            decide(&c, 1, 11 * DAY),
            Decision::Unchanged,
            "exactly a day more"
        );
        assert_eq!(decide(&c, 1, 11 * DAY + 1), Decision::Extend);
        assert_eq!(decide(&c, 2, 10 * DAY), Decision::Changed);
    }

    #[test]
    fn prune_drops_only_lapsed_entries() {
        let mut c = DedupeCache::new();
        c.record("a", entry(1, 100));
        c.record("b", entry(1, 200));
        assert_eq!(c.prune(150), 1);
        assert!(c.get("a").is_none() && c.get("b").is_some());
    }

    #[test]
    fn encode_decode_round_trips_packed_raw_and_foreign_ids() {
        let mut c = DedupeCache::new();
        c.record(
            "ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf8",
            entry(7, 1_800_000_000),
        );
        c.record("weird id ünicode", entry(u64::MAX, -5));
        // Reconciliation may adopt an id Sentinel already had: kept as 16 bytes.
        c.record(
            "md5--e54a4f18-5d4d-56cd-8a41-a96938e9779f",
            Entry {
                stix_uuid: Some([9; 16]),
                fingerprint: 3,
                valid_until: 42,
            },
        );
        let bytes = c.encode();
        assert_eq!(DedupeCache::decode(&bytes).unwrap(), c);
        assert_eq!(
            bytes.len(),
            DedupeCache::decode(&bytes).unwrap().encode().len()
        );
        assert_eq!(
            uuid_bytes("E54A4F18-5D4D-56CD-8A41-A96938E9779F"),
            None,
            "uppercase"
        );
        assert_eq!(
            uuid_bytes("e54a4f18-5d4d-56cd-8a41-a96938e9779"),
            None,
            "short"
        );
        assert_eq!(
            uuid_bytes("e54a4f18x5d4d-56cd-8a41-a96938e9779f"),
            None,
            "separator"
        );
        assert_eq!(
            uuid_bytes("e54a4f18-5d4d-56cd-8a41-a96938e9779f").map(|b| uuid_text(&b)),
            Some("e54a4f18-5d4d-56cd-8a41-a96938e9779f".to_string())
        );
    }

    #[test]
    fn packed_entries_are_compact() {
        let mut c = DedupeCache::new();
        for i in 0..1000u32 {
            let id = format!("ipv4--{i:08x}-0000-5000-8000-000000000000");
            c.record(&id, entry(i as u64, i as i64));
        }
        let per_entry = c.encode().len() / c.len();
        assert!(per_entry <= 34, "{per_entry} bytes per entry");
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let mut c = DedupeCache::new();
        c.record("fqdn--1", entry(1, 1));
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

    #[test]
    fn a_seeded_object_is_found_by_pattern_and_adopted_unless_its_id_is_ours() {
        let mut c = DedupeCache::new();
        let id = "ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf8";
        let pattern = "[ipv4-addr:value = '1.2.3.4']";
        assert_eq!(c.lookup(id, pattern), None);
        let foreign = [7; 16];
        assert!(c.seed(
            pattern,
            Seeded {
                stix_uuid: foreign,
                fingerprint: None,
                valid_until: 10 * DAY
            }
        ));
        assert!(
            !c.seed(
                pattern,
                Seeded {
                    stix_uuid: [8; 16],
                    fingerprint: None,
                    valid_until: 0
                }
            ),
            "the first of two duplicates is kept"
        );
        let held = c.lookup(id, pattern).unwrap();
        assert_eq!(held.stix_uuid, Some(foreign));
        assert!(held.seeded);
        assert_eq!(held.entry(), None, "a foreign object has no fingerprint");
        assert_eq!(judge(Some(&held), 1, 10 * DAY), Decision::Changed);
        assert_eq!(c.lookup(id, "[ipv4-addr:value = '1.2.3.5']"), None);

        // Our own object, uploaded by an earlier install whose state was lost.
        let own = "fqdn--e54a4f18-5d4d-56cd-8a41-a96938e9779f";
        let own_pattern = "[domain-name:value = 'evil.example']";
        c.seed(
            own_pattern,
            Seeded {
                stix_uuid: derived_uuid(own),
                fingerprint: Some(5),
                valid_until: 10 * DAY,
            },
        );
        let held = c.lookup(own, own_pattern).unwrap();
        assert_eq!(held.stix_uuid, None, "the derived id needs no adopting");
        assert_eq!(judge(Some(&held), 5, 10 * DAY), Decision::Unchanged);
        assert_eq!(judge(Some(&held), 5, 12 * DAY), Decision::Extend);
        assert_eq!(judge(Some(&held), 6, 10 * DAY), Decision::Changed);

        // The cache wins over the seed, and the seed is never saved.
        c.record(own, entry(9, 20 * DAY));
        let held = c.lookup(own, own_pattern).unwrap();
        assert!(!held.seeded && held.fingerprint == Some(9));
        let back = DedupeCache::decode(&c.encode()).unwrap();
        assert_eq!((back.len(), back.seeded()), (1, 0));
    }
}
