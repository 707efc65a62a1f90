//! Mandiant indicator → STIX 2.1 `indicator`: pure, no I/O, the clock passed in.
//!
//! Invariants: the STIX id depends only on the Mandiant id (so every run and every re-install
//! names an indicator the same way, and re-sending is an update, never a duplicate); the
//! pattern is one comparison whose quoted value round-trips to the observable's value;
//! timestamps are RFC 3339 UTC with milliseconds and `created <= modified`.

use serde::Serialize;
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::config::{Action, HashType, StixConfig};
use crate::mati::{MatiIndicator, parse_timestamp};
use crate::policy::{Observable, ObservableKind, categories};

/// The property extension that carries what STIX has no field for (DESIGN §5).
pub const EXTENSION_ID: &str = "extension-definition--5b3c9e4e-6f1d-4c57-9a0e-2d7f4b1c8a31";
/// The `identity` every indicator names as its creator.
pub const IDENTITY_ID: &str = "identity--7a8c5d1e-3b2f-4e6a-9c0d-1f2e3d4c5b6a";
const IDENTITY_CREATED: &str = "2013-01-01T00:00:00.000Z";

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ExternalReference {
    pub source_name: &'static str,
    pub external_id: String,
    pub url: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MandiantExtension {
    pub extension_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mscore: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threat_score: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    pub action: &'static str,
    pub passive_only: bool,
}

/// `extensions`: our one property extension, under its fixed definition id.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Extensions {
    #[serde(rename = "extension-definition--5b3c9e4e-6f1d-4c57-9a0e-2d7f4b1c8a31")]
    pub mandiant: MandiantExtension,
}

/// Our STIX 2.1 indicator; field order is the order on the wire. Fixed values are static
/// strings: a feed of a million indicators should not allocate them a million times.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StixIndicator {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub spec_version: &'static str,
    pub id: String,
    pub created: String,
    pub modified: String,
    pub created_by_ref: &'static str,
    pub name: String,
    pub description: String,
    pub indicator_types: [&'static str; 1],
    pub pattern: String,
    pub pattern_type: &'static str,
    pub pattern_version: &'static str,
    pub valid_from: String,
    pub valid_until: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<u8>,
    pub labels: Vec<String>,
    pub external_references: [ExternalReference; 1],
    pub extensions: Extensions,
}

/// The timestamps every object of one cycle shares, formatted once.
#[derive(Clone, Debug)]
pub struct Clock {
    pub now: OffsetDateTime,
    now_text: String,
    /// `valid_until` text and Unix seconds for ipv4, domain, url, file.
    until: [(String, i64); 4],
}

impl Clock {
    pub fn new(now: OffsetDateTime, c: &StixConfig) -> Self {
        let until = |days: u32| {
            let t = now + Duration::days(days.into());
            (format_timestamp(t), t.unix_timestamp())
        };
        Clock {
            now,
            now_text: format_timestamp(now),
            until: [
                until(c.ipv4_days),
                until(c.fqdn_days),
                until(c.url_days),
                until(c.hash_days),
            ],
        }
    }

    fn until(&self, kind: ObservableKind) -> &(String, i64) {
        &self.until[match kind {
            ObservableKind::Ipv4 => 0,
            ObservableKind::Domain => 1,
            ObservableKind::Url => 2,
            ObservableKind::File(_) => 3,
        }]
    }

    /// `valid_until` of an indicator of this kind uploaded now, as Unix seconds.
    pub fn valid_until_unix(&self, kind: ObservableKind) -> i64 {
        self.until(kind).1
    }
}

/// STIX timestamp: UTC, exactly three fraction digits (the validator requires milliseconds).
pub fn format_timestamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// A UUID derived from a name, shaped as version 4 (STIX wants v4 for these objects).
pub fn derive_uuid(namespace: &str, name: &str) -> String {
    uuid_text(&derive_uuid_bytes(namespace, name))
}

/// The bytes of [`derive_uuid`].
pub fn derive_uuid_bytes(namespace: &str, name: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"mati-sentinel/");
    h.update(namespace.as_bytes());
    h.update(b"/");
    h.update(name.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// 16 bytes as a lowercase UUID (8-4-4-4-12), without a formatter per byte: ids are made
/// for every indicator of every cycle.
pub fn uuid_text(b: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0x0f)] as char);
    }
    out
}

/// The STIX id of a Mandiant indicator.
pub fn indicator_id(mandiant_id: &str) -> String {
    format!("indicator--{}", derive_uuid("indicator", mandiant_id))
}

/// Quotes a value for a STIX pattern: `\` → `\\`, `'` → `\'`, nothing else changes.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

pub fn pattern(o: &Observable) -> String {
    let path = match o.kind {
        ObservableKind::Ipv4 => "ipv4-addr:value",
        ObservableKind::Domain => "domain-name:value",
        ObservableKind::Url => "url:value",
        ObservableKind::File(HashType::Md5) => "file:hashes.'MD5'",
        ObservableKind::File(HashType::Sha1) => "file:hashes.'SHA-1'",
        ObservableKind::File(HashType::Sha256) => "file:hashes.'SHA-256'",
    };
    format!("[{path} = {}]", quote(&o.value))
}

/// When an indicator uploaded at `now` stops being valid: the type's expiration later.
pub fn valid_until(kind: ObservableKind, c: &StixConfig, now: OffsetDateTime) -> OffsetDateTime {
    let days = match kind {
        ObservableKind::Ipv4 => c.ipv4_days,
        ObservableKind::Domain => c.fqdn_days,
        ObservableKind::Url => c.url_days,
        ObservableKind::File(_) => c.hash_days,
    };
    now + Duration::days(days.into())
}

/// The STIX object for a kept indicator, as uploaded at `clock.now`.
pub fn to_stix(
    ind: &MatiIndicator,
    obs: &Observable,
    c: &StixConfig,
    clock: &Clock,
) -> StixIndicator {
    // A first_seen in the future (clock skew) would make created > modified, which STIX forbids.
    let created = ind
        .first_seen
        .as_deref()
        .and_then(parse_timestamp)
        .filter(|t| *t <= clock.now)
        .map(format_timestamp)
        .unwrap_or_else(|| clock.now_text.clone());

    let mut labels: Vec<String> = categories(ind).into_iter().collect();
    let mut attributed: Vec<&str> = Vec::new();
    for a in &ind.attributed_associations {
        let name = a.name.trim();
        if !name.is_empty() && !attributed.contains(&name) {
            attributed.push(name);
        }
    }
    for name in &attributed {
        if !labels.iter().any(|l| l == name) {
            labels.push((*name).to_string());
        }
    }
    labels.push(
        match c.action {
            Action::Alert => "action:alert",
            Action::Block => "action:block",
            Action::Allow => "action:allow",
        }
        .to_string(),
    );
    if c.passive_only {
        labels.push("passive-only".into());
    }

    let threat = ind.threat_rating.as_ref();
    let threat_score = threat.and_then(|t| t.threat_score);
    let severity = threat
        .and_then(|t| t.severity_level.clone())
        .filter(|s| !s.trim().is_empty());
    let mut description = match threat_score {
        Some(s) => format!("Mandiant threat score {s}"),
        None => "Mandiant threat score unknown".to_string(),
    };
    if let Some(sev) = &severity {
        description.push_str(", severity ");
        description.push_str(sev);
    }
    if !attributed.is_empty() {
        description.push_str("; attributed to ");
        description.push_str(&attributed.join(", "));
    }

    StixIndicator {
        kind: "indicator",
        spec_version: "2.1",
        id: indicator_id(&ind.id),
        created,
        modified: clock.now_text.clone(),
        created_by_ref: IDENTITY_ID,
        name: obs.value.clone(),
        description,
        indicator_types: ["malicious-activity"],
        pattern: pattern(obs),
        pattern_type: "stix",
        pattern_version: "2.1",
        valid_from: clock.now_text.clone(),
        valid_until: clock.until(obs.kind).0.clone(),
        confidence: ind.mscore,
        labels,
        external_references: [ExternalReference {
            source_name: "Mandiant",
            external_id: ind.id.clone(),
            url: format!("https://advantage.mandiant.com/indicator/{}", ind.id),
        }],
        extensions: Extensions {
            mandiant: MandiantExtension {
                extension_type: "property-extension",
                mscore: ind.mscore,
                threat_score,
                severity,
                action: c.action.as_str(),
                passive_only: c.passive_only,
            },
        },
    }
}

/// The same object, expired: `valid_until` now, so Sentinel stops matching it. STIX wants
/// `valid_from` strictly earlier, so it becomes `created` (or a second before now).
pub fn expire(mut s: StixIndicator, clock: &Clock) -> StixIndicator {
    s.valid_until = clock.now_text.clone();
    s.valid_from = if s.created < clock.now_text {
        s.created.clone()
    } else {
        format_timestamp(clock.now - Duration::seconds(1))
    };
    s
}

/// A digest of everything but the timestamps: when it changes, Sentinel's copy is stale.
pub fn fingerprint(s: &StixIndicator) -> u64 {
    let e = &s.extensions.mandiant;
    digest(&Fields {
        id: &s.id,
        created_by_ref: s.created_by_ref,
        name: &s.name,
        description: &s.description,
        indicator_types: &s.indicator_types,
        pattern: &s.pattern,
        confidence: s.confidence,
        labels: &s.labels,
        external_references: s
            .external_references
            .iter()
            .map(|r| [r.source_name, r.external_id.as_str(), r.url.as_str()])
            .collect(),
        action: e.action,
        severity: e.severity.as_deref(),
        mscore: e.mscore,
        threat_score: e.threat_score,
        passive_only: e.passive_only,
    })
}

/// The [`fingerprint`] of an object as Sentinel stores it (read back from the workspace):
/// equal to the fingerprint of the object we sent, whatever Sentinel adds beside our fields
/// (its `sentinel-ext` extension, for one). `None` when it is not one of ours: no Mandiant
/// extension, or a field of the wrong type.
pub fn fingerprint_value(v: &serde_json::Value) -> Option<u64> {
    fn text(v: &serde_json::Value) -> Option<&str> {
        v.as_str()
    }
    let small = |v: &serde_json::Value| -> Option<Option<u8>> {
        if v.is_null() {
            Some(None)
        } else {
            v.as_u64().and_then(|n| u8::try_from(n).ok()).map(Some)
        }
    };
    let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect()
    };
    let e = v.get("extensions")?.get(EXTENSION_ID)?;
    let refs = v.get("external_references")?.as_array()?;
    let mut external_references = Vec::with_capacity(refs.len());
    for r in refs {
        external_references.push([
            text(r.get("source_name")?)?,
            text(r.get("external_id")?)?,
            text(r.get("url")?)?,
        ]);
    }
    let labels = match v.get("labels") {
        None => Vec::new(),
        Some(l) => strings(l)?,
    };
    let null = serde_json::Value::Null;
    let field = |name: &str| v.get(name).unwrap_or(&null);
    let ext = |name: &str| e.get(name).unwrap_or(&null);
    Some(digest(&Fields {
        id: text(field("id"))?,
        created_by_ref: text(field("created_by_ref"))?,
        name: text(field("name"))?,
        description: text(field("description"))?,
        indicator_types: &strings(field("indicator_types"))?,
        pattern: text(field("pattern"))?,
        confidence: small(field("confidence"))?,
        labels: &labels,
        external_references,
        action: text(ext("action"))?,
        severity: match ext("severity") {
            serde_json::Value::Null => None,
            s => Some(text(s)?),
        },
        mscore: small(ext("mscore"))?,
        threat_score: small(ext("threat_score"))?,
        passive_only: ext("passive_only").as_bool()?,
    }))
}

/// What [`fingerprint`] covers, borrowed from either form of an object.
struct Fields<'a, T: AsRef<str>, L: AsRef<str>> {
    id: &'a str,
    created_by_ref: &'a str,
    name: &'a str,
    description: &'a str,
    indicator_types: &'a [T],
    pattern: &'a str,
    confidence: Option<u8>,
    labels: &'a [L],
    external_references: Vec<[&'a str; 3]>,
    action: &'a str,
    severity: Option<&'a str>,
    mscore: Option<u8>,
    threat_score: Option<u8>,
    passive_only: bool,
}

fn digest<T: AsRef<str>, L: AsRef<str>>(f: &Fields<'_, T, L>) -> u64 {
    fn field(h: &mut Sha256, v: &str) {
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    fn number(h: &mut Sha256, v: Option<u8>) {
        h.update(v.map_or(u16::MAX, u16::from).to_le_bytes());
    }
    let mut h = Sha256::new();
    field(&mut h, f.id);
    field(&mut h, f.created_by_ref);
    field(&mut h, f.name);
    field(&mut h, f.description);
    for t in f.indicator_types {
        field(&mut h, t.as_ref());
    }
    field(&mut h, f.pattern);
    number(&mut h, f.confidence);
    h.update((f.labels.len() as u64).to_le_bytes());
    for l in f.labels {
        field(&mut h, l.as_ref());
    }
    for [source_name, external_id, url] in &f.external_references {
        field(&mut h, source_name);
        field(&mut h, external_id);
        field(&mut h, url);
    }
    field(&mut h, EXTENSION_ID);
    field(&mut h, f.action);
    match f.severity {
        Some(sev) => field(&mut h, sev),
        None => h.update([0xff]),
    }
    number(&mut h, f.mscore);
    number(&mut h, f.threat_score);
    h.update([u8::from(f.passive_only)]);
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The Mandiant `identity` that `created_by_ref` names, uploaded once per cycle with the
/// STIX objects API so Sentinel shows "Created by Mandiant".
pub fn identity() -> serde_json::Value {
    serde_json::json!({
        "type": "identity",
        "spec_version": "2.1",
        "id": IDENTITY_ID,
        "created": IDENTITY_CREATED,
        "modified": IDENTITY_CREATED,
        "name": "Mandiant",
        "identity_class": "organization",
        "description": "Mandiant Threat Intelligence, synced by mati-sentinel",
    })
}

/// The opening of a STIX bundle, up to and including the Mandiant identity; indicators follow,
/// each preceded by `,\n`, and [`BUNDLE_END`] closes it. Written piece by piece, so a dry run
/// over a large feed never holds its output.
pub fn bundle_start(now: OffsetDateTime) -> String {
    format!(
        "{{\"type\":\"bundle\",\"id\":\"bundle--{}\",\"objects\":[\n{}",
        derive_uuid("bundle", &format_timestamp(now)),
        identity()
    )
}

pub const BUNDLE_END: &str = "\n]}\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Action, EnabledTypes, PolicyConfig};
    use crate::policy::evaluate;
    use proptest::prelude::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-03 12:00:00.123456 UTC);

    fn cfg() -> StixConfig {
        StixConfig {
            ipv4_days: 7,
            fqdn_days: 14,
            url_days: 21,
            hash_days: 90,
            action: Action::Alert,
            passive_only: false,
        }
    }

    fn lenient(hash: HashType) -> PolicyConfig {
        PolicyConfig {
            min_confidence: 0,
            min_threat_score: 0,
            exclude_osint: false,
            include_uncategorized: true,
            hash_type: hash,
            types: EnabledTypes {
                ipv4: true,
                fqdn: true,
                url: true,
                hash: true,
            },
        }
    }

    /// Parses a single-comparison pattern with the STIX 2.1 grammar's rules for the
    /// bracketed comparison and `StringLiteral` (`'` ( ~['\\] | `\'` | `\\` )* `'`),
    /// returning the object path and the unescaped value. Independent of `quote`.
    fn parse_pattern(p: &str) -> Option<(String, String)> {
        let inner = p.strip_prefix('[')?.strip_suffix(']')?;
        let (path, rest) = inner.split_once(" = ")?;
        let mut chars = rest.chars();
        if chars.next()? != '\'' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    c @ ('\\' | '\'') => value.push(c),
                    _ => return None,
                },
                '\'' => break,
                c => value.push(c),
            }
        }
        chars.next().is_none().then(|| (path.to_string(), value))
    }

    #[test]
    fn escaping_follows_the_grammar() {
        let o = Observable {
            kind: ObservableKind::Url,
            value: r"http://x/a'b\c".into(),
        };
        assert_eq!(pattern(&o), r"[url:value = 'http://x/a\'b\\c']");
        assert_eq!(
            parse_pattern(&pattern(&o)),
            Some(("url:value".into(), o.value.clone()))
        );
    }

    proptest! {
        #[test]
        fn any_value_yields_a_pattern_that_round_trips(value in any::<String>()) {
            for kind in [ObservableKind::Url, ObservableKind::Domain, ObservableKind::File(HashType::Sha256)] {
                let o = Observable { kind, value: value.clone() };
                let (_, back) = parse_pattern(&pattern(&o)).expect("pattern parses");
                prop_assert_eq!(back, value.clone());
            }
        }

        #[test]
        fn long_urls_with_quotes_round_trip(
            value in proptest::collection::vec(prop_oneof![Just('\''), Just('\\'), Just('é'), Just('😀'), any::<char>()], 1..2000)
        ) {
            let value: String = value.into_iter().collect();
            let o = Observable { kind: ObservableKind::Url, value: value.clone() };
            let (path, back) = parse_pattern(&pattern(&o)).expect("pattern parses");
            prop_assert_eq!(path, "url:value");
            prop_assert_eq!(back, value);
        }
    }

    #[test]
    fn ids_are_deterministic_version_4_shaped_and_distinct() {
        let a = indicator_id("ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf8");
        assert_eq!(
            a,
            indicator_id("ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf8")
        );
        assert_ne!(
            a,
            indicator_id("ipv4--296e3068-fe73-558d-a4b9-77ac5b9d4cf9")
        );
        let uuid = a.strip_prefix("indicator--").unwrap();
        let b = uuid.as_bytes();
        assert_eq!(b[14], b'4', "version nibble in {uuid}");
        assert!(
            matches!(b[19], b'8' | b'9' | b'a' | b'b'),
            "variant in {uuid}"
        );
        assert!(crate::config::is_guid(uuid));
    }

    #[test]
    fn timestamps_have_milliseconds_and_utc() {
        assert_eq!(format_timestamp(NOW), "2026-12-03T12:00:00.123Z");
        let t = datetime!(2026-12-03 14:00:00 +02:00);
        assert_eq!(format_timestamp(t), "2026-12-03T12:00:00.000Z");
    }

    fn golden(name: &str, hash: HashType, action: Action, passive: bool) {
        let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
        let input: MatiIndicator =
            serde_json::from_str(&std::fs::read_to_string(format!("{path}.mati.json")).unwrap())
                .unwrap();
        let obs = evaluate(&input, &lenient(hash)).unwrap();
        let c = StixConfig {
            action,
            passive_only: passive,
            ..cfg()
        };
        let got = serde_json::to_string_pretty(&to_stix(&input, &obs, &c, &Clock::new(NOW, &c)))
            .unwrap()
            + "\n";
        let want_path = format!("{path}.stix.json");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&want_path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&want_path).unwrap();
        assert_eq!(
            got, want,
            "golden {name} differs (UPDATE_GOLDEN=1 rewrites after review)"
        );
    }

    #[test]
    fn golden_example_a_ipv4() {
        golden("example-a-ipv4", HashType::Md5, Action::Alert, false);
    }

    #[test]
    fn golden_example_b_md5_as_sha256_with_attribution() {
        golden("example-b-md5", HashType::Sha256, Action::Block, true);
    }

    #[test]
    fn golden_example_c_fqdn_mixed_sources() {
        golden("example-c-fqdn", HashType::Md5, Action::Allow, false);
    }

    #[test]
    fn golden_example_d_threat_rating() {
        golden(
            "example-d-threat-rating",
            HashType::Md5,
            Action::Alert,
            false,
        );
    }

    #[test]
    fn mapping_fields_follow_the_design() {
        let ind: MatiIndicator = serde_json::from_value(serde_json::json!({
            "id": "fqdn--1", "type": "fqdn", "value": "evil.example", "mscore": 95,
            "first_seen": "2030-01-01T00:00:00.000Z",
            "sources": [{"category": ["Phishing"]}],
            "attributed_associations": [{"name": "APT29", "type": "threat-actor"}, {"name": "APT29"}],
            "threat_rating": {"threat_score": 88}
        }))
        .unwrap();
        let obs = evaluate(&ind, &lenient(HashType::Md5)).unwrap();
        let c = StixConfig {
            passive_only: true,
            action: Action::Block,
            ..cfg()
        };
        let s = to_stix(&ind, &obs, &c, &Clock::new(NOW, &c));
        assert_eq!(
            s.created, s.modified,
            "a future first_seen is clamped to now"
        );
        assert_eq!(s.valid_from, "2026-12-03T12:00:00.123Z");
        assert_eq!(
            s.valid_until, "2026-12-17T12:00:00.123Z",
            "fqdn lifetime 14 days"
        );
        assert_eq!(s.confidence, Some(95));
        assert_eq!(
            s.labels,
            vec!["phishing", "APT29", "action:block", "passive-only"]
        );
        assert_eq!(
            s.description,
            "Mandiant threat score 88; attributed to APT29"
        );
        assert_eq!(s.pattern, "[domain-name:value = 'evil.example']");
        let ext = &s.extensions.mandiant;
        assert_eq!((ext.mscore, ext.threat_score), (Some(95), Some(88)));
        assert_eq!((ext.action, ext.passive_only), ("block", true));
    }

    #[test]
    fn fingerprint_ignores_timestamps_only() {
        let ind: MatiIndicator = serde_json::from_value(serde_json::json!({
            "id": "ipv4--1", "type": "ipv4", "value": "1.2.3.4", "mscore": 90
        }))
        .unwrap();
        let obs = evaluate(&ind, &lenient(HashType::Md5)).unwrap();
        let a = to_stix(&ind, &obs, &cfg(), &Clock::new(NOW, &cfg()));
        let b = to_stix(
            &ind,
            &obs,
            &cfg(),
            &Clock::new(NOW + Duration::days(3), &cfg()),
        );
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let mut c = a.clone();
        c.confidence = Some(91);
        assert_ne!(fingerprint(&a), fingerprint(&c));
        let mut d = a.clone();
        d.labels.push("new".into());
        assert_ne!(fingerprint(&a), fingerprint(&d));
    }

    #[test]
    fn the_stored_form_has_the_fingerprint_of_the_object_sent() {
        for (name, hash, action, passive) in [
            ("example-a-ipv4", HashType::Md5, Action::Alert, false),
            ("example-b-md5", HashType::Sha256, Action::Block, true),
            ("example-c-fqdn", HashType::Md5, Action::Allow, false),
            (
                "example-d-threat-rating",
                HashType::Md5,
                Action::Alert,
                false,
            ),
        ] {
            let path = format!(
                "{}/tests/golden/{name}.mati.json",
                env!("CARGO_MANIFEST_DIR")
            );
            let input: MatiIndicator =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            let obs = evaluate(&input, &lenient(hash)).unwrap();
            let c = StixConfig {
                action,
                passive_only: passive,
                ..cfg()
            };
            let s = to_stix(&input, &obs, &c, &Clock::new(NOW, &c));
            let mut stored = serde_json::to_value(&s).unwrap();
            // What Sentinel adds to what it stores.
            stored["extensions"]["sentinel-ext"] = serde_json::json!({"severity": null});
            stored["x_sentinel_ingested"] = serde_json::json!("2026-12-03T12:00:01Z");
            assert_eq!(fingerprint_value(&stored), Some(fingerprint(&s)), "{name}");

            let mut edited = stored.clone();
            edited["name"] = serde_json::json!("renamed in the portal");
            assert_ne!(fingerprint_value(&edited), Some(fingerprint(&s)), "{name}");
            let mut foreign = stored.clone();
            foreign["extensions"]
                .as_object_mut()
                .unwrap()
                .remove(EXTENSION_ID);
            assert_eq!(fingerprint_value(&foreign), None, "{name}");
        }
    }
}
