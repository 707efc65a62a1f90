//! Which indicators to keep: pure, no I/O.
//!
//! Each rule of DESIGN §3 "Policy" is checked in order; the first that fails gives the one
//! bounded reason the indicator is counted under. A kept indicator comes back as an
//! [`Observable`]: the type and the (normalised) value its STIX pattern will carry.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::config::{HashType, PolicyConfig};
use crate::mati::MatiIndicator;

/// Why an indicator was not uploaded. `as_str` is the label in reports and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    UnsupportedType,
    TypeDisabled,
    LowConfidence,
    LowThreatScore,
    Osint,
    Uncategorized,
    HashUnavailable,
    InvalidValue,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        RejectReason::UnsupportedType,
        RejectReason::TypeDisabled,
        RejectReason::LowConfidence,
        RejectReason::LowThreatScore,
        RejectReason::Osint,
        RejectReason::Uncategorized,
        RejectReason::HashUnavailable,
        RejectReason::InvalidValue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::UnsupportedType => "unsupported_type",
            RejectReason::TypeDisabled => "type_disabled",
            RejectReason::LowConfidence => "low_confidence",
            RejectReason::LowThreatScore => "low_threat_score",
            RejectReason::Osint => "osint",
            RejectReason::Uncategorized => "uncategorized",
            RejectReason::HashUnavailable => "hash_unavailable",
            RejectReason::InvalidValue => "invalid_value",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObservableKind {
    Ipv4,
    Domain,
    Url,
    File(HashType),
}

/// What a kept indicator's pattern will match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observable {
    pub kind: ObservableKind,
    pub value: String,
}

/// The categories of an indicator: the union of `sources[].category` and `category`,
/// lower-cased, sorted, without duplicates.
pub fn categories(ind: &MatiIndicator) -> BTreeSet<String> {
    ind.sources
        .iter()
        .flat_map(|s| s.category.iter())
        .chain(ind.category.iter())
        .map(|c| c.trim().to_lowercase())
        .filter(|c| !c.is_empty())
        .collect()
}

/// Open-source only: sources non-empty and every one marked `osint`.
pub fn is_osint_only(ind: &MatiIndicator) -> bool {
    !ind.sources.is_empty() && ind.sources.iter().all(|s| s.osint)
}

pub fn evaluate(ind: &MatiIndicator, p: &PolicyConfig) -> Result<Observable, RejectReason> {
    let kind = match ind.kind.to_ascii_lowercase().as_str() {
        "ipv4" => ObservableKind::Ipv4,
        "fqdn" => ObservableKind::Domain,
        "url" => ObservableKind::Url,
        other => match HashType::from_mandiant(other) {
            Some(_) => ObservableKind::File(p.hash_type),
            None => return Err(RejectReason::UnsupportedType),
        },
    };
    let enabled = match kind {
        ObservableKind::Ipv4 => p.types.ipv4,
        ObservableKind::Domain => p.types.fqdn,
        ObservableKind::Url => p.types.url,
        ObservableKind::File(_) => p.types.hash,
    };
    if !enabled {
        return Err(RejectReason::TypeDisabled);
    }
    if ind.mscore.unwrap_or(0) < p.min_confidence {
        return Err(RejectReason::LowConfidence);
    }
    let threat_score = ind
        .threat_rating
        .as_ref()
        .and_then(|t| t.threat_score)
        .unwrap_or(0);
    if threat_score < p.min_threat_score {
        return Err(RejectReason::LowThreatScore);
    }
    if p.exclude_osint && is_osint_only(ind) {
        return Err(RejectReason::Osint);
    }
    if !p.include_uncategorized && categories(ind).is_empty() {
        return Err(RejectReason::Uncategorized);
    }
    let raw_value = match kind {
        ObservableKind::File(wanted) => {
            if ind.kind.eq_ignore_ascii_case(wanted.as_str()) {
                ind.value.as_str()
            } else {
                match ind
                    .associated_hashes
                    .iter()
                    .find(|h| h.kind.eq_ignore_ascii_case(wanted.as_str()))
                {
                    Some(h) => h.value.as_str(),
                    None => return Err(RejectReason::HashUnavailable),
                }
            }
        }
        _ => ind.value.as_str(),
    };
    let value = normalise(kind, raw_value).ok_or(RejectReason::InvalidValue)?;
    Ok(Observable { kind, value })
}

/// The value as the pattern will carry it, or `None` when it is not well-formed.
fn normalise(kind: ObservableKind, value: &str) -> Option<String> {
    let v = value.trim();
    match kind {
        ObservableKind::Ipv4 => v.parse::<Ipv4Addr>().ok().map(|ip| ip.to_string()),
        ObservableKind::File(h) => {
            let len = match h {
                HashType::Md5 => 32,
                HashType::Sha1 => 40,
                HashType::Sha256 => 64,
            };
            (v.len() == len && v.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| v.to_ascii_lowercase())
        }
        ObservableKind::Domain | ObservableKind::Url => (!v.is_empty()
            && !v.chars().any(|c| c.is_whitespace() || c.is_control()))
        .then(|| v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EnabledTypes;
    use serde_json::json;

    fn defaults() -> PolicyConfig {
        PolicyConfig {
            min_confidence: 80,
            min_threat_score: 80,
            exclude_osint: true,
            include_uncategorized: true,
            hash_type: HashType::Md5,
            types: EnabledTypes {
                ipv4: true,
                fqdn: true,
                url: true,
                hash: true,
            },
        }
    }

    /// A kept-by-default indicator of the given type and value, with `patch` merged in.
    fn ind(kind: &str, value: &str, patch: serde_json::Value) -> MatiIndicator {
        let mut base = json!({
            "id": format!("{kind}--00000000-0000-5000-8000-000000000001"),
            "type": kind, "value": value, "mscore": 90,
            "sources": [{"osint": false, "category": ["malware"], "source_name": "Mandiant"}],
            "threat_rating": {"threat_score": 90, "severity_level": "high"},
            "associated_hashes": [
                {"type": "md5", "value": "fe09cf6d3a358305f8c2f687b6f6da02"},
                {"type": "sha1", "value": "30d64987a6903a9995ea74fe268689811b14b81b"},
                {"type": "sha256", "value": "af95c55f3d09ee6c691afc248e8d4a9c07d4f304449c6f609bf9c4e4c202b070"}
            ]
        });
        for (k, v) in patch.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    type Row<'a> = (
        MatiIndicator,
        PolicyConfig,
        Result<(&'a str, &'a str), RejectReason>,
    );

    fn check(i: &MatiIndicator, p: &PolicyConfig, want: Result<(&str, &str), RejectReason>) {
        let got = evaluate(i, p).map(|o| (format!("{:?}", o.kind), o.value));
        let want = want.map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(got, want, "indicator {} {}", i.kind, i.value);
    }

    #[test]
    fn every_rule_and_reason() {
        let d = defaults();
        let md5 = "fe09cf6d3a358305f8c2f687b6f6da02";
        use RejectReason::*;
        let table: Vec<Row> = vec![
            (
                ind("ipv4", "1.2.3.4", json!({})),
                d.clone(),
                Ok(("Ipv4", "1.2.3.4")),
            ),
            (
                ind("fqdn", "evil.example", json!({})),
                d.clone(),
                Ok(("Domain", "evil.example")),
            ),
            (
                ind("url", "https://e.example/a?b=c", json!({})),
                d.clone(),
                Ok(("Url", "https://e.example/a?b=c")),
            ),
            (
                ind("md5", md5, json!({})),
                d.clone(),
                Ok(("File(Md5)", md5)),
            ),
            (
                ind("ipv6", "::1", json!({})),
                d.clone(),
                Err(UnsupportedType),
            ),
            (
                ind("email", "a@b.c", json!({})),
                d.clone(),
                Err(UnsupportedType),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({})),
                PolicyConfig {
                    types: EnabledTypes {
                        ipv4: false,
                        ..d.types
                    },
                    ..d.clone()
                },
                Err(TypeDisabled),
            ),
            (
                ind("fqdn", "a.example", json!({})),
                PolicyConfig {
                    types: EnabledTypes {
                        fqdn: false,
                        ..d.types
                    },
                    ..d.clone()
                },
                Err(TypeDisabled),
            ),
            (
                ind("url", "https://a.example", json!({})),
                PolicyConfig {
                    types: EnabledTypes {
                        url: false,
                        ..d.types
                    },
                    ..d.clone()
                },
                Err(TypeDisabled),
            ),
            (
                ind("md5", md5, json!({})),
                PolicyConfig {
                    types: EnabledTypes {
                        hash: false,
                        ..d.types
                    },
                    ..d.clone()
                },
                Err(TypeDisabled),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({"mscore": 79})),
                d.clone(),
                Err(LowConfidence),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({"mscore": null})),
                d.clone(),
                Err(LowConfidence),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({"mscore": 80})),
                d.clone(),
                Ok(("Ipv4", "1.2.3.4")),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({"mscore": 50})),
                PolicyConfig {
                    min_confidence: 50,
                    ..d.clone()
                },
                Ok(("Ipv4", "1.2.3.4")),
            ),
            (
                ind(
                    "ipv4",
                    "1.2.3.4",
                    json!({"threat_rating": {"threat_score": 79}}),
                ),
                d.clone(),
                Err(LowThreatScore),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({"threat_rating": null})),
                d.clone(),
                Err(LowThreatScore),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({"threat_rating": null})),
                PolicyConfig {
                    min_threat_score: 0,
                    ..d.clone()
                },
                Ok(("Ipv4", "1.2.3.4")),
            ),
            (
                ind(
                    "ipv4",
                    "1.2.3.4",
                    json!({"sources": [{"osint": true}, {"osint": true, "category": ["x"]}]}),
                ),
                d.clone(),
                Err(Osint),
            ),
            (
                ind(
                    "ipv4",
                    "1.2.3.4",
                    json!({"sources": [{"osint": true}, {"osint": false}]}),
                ),
                d.clone(),
                Ok(("Ipv4", "1.2.3.4")),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({"sources": [{"osint": true}]})),
                PolicyConfig {
                    exclude_osint: false,
                    ..d.clone()
                },
                Ok(("Ipv4", "1.2.3.4")),
            ),
            (
                ind("ipv4", "1.2.3.4", json!({"sources": []})),
                d.clone(),
                Ok(("Ipv4", "1.2.3.4")),
            ),
            (
                ind(
                    "ipv4",
                    "1.2.3.4",
                    json!({"sources": [{"osint": false, "category": []}]}),
                ),
                PolicyConfig {
                    include_uncategorized: false,
                    ..d.clone()
                },
                Err(Uncategorized),
            ),
            (
                ind(
                    "ipv4",
                    "1.2.3.4",
                    json!({"sources": [{"osint": false, "category": []}], "category": ["phishing"]}),
                ),
                PolicyConfig {
                    include_uncategorized: false,
                    ..d.clone()
                },
                Ok(("Ipv4", "1.2.3.4")),
            ),
            (
                ind("md5", md5, json!({})),
                PolicyConfig {
                    hash_type: HashType::Sha256,
                    ..d.clone()
                },
                Ok((
                    "File(Sha256)",
                    "af95c55f3d09ee6c691afc248e8d4a9c07d4f304449c6f609bf9c4e4c202b070",
                )),
            ),
            (
                ind("md5", md5, json!({})),
                PolicyConfig {
                    hash_type: HashType::Sha1,
                    ..d.clone()
                },
                Ok(("File(Sha1)", "30d64987a6903a9995ea74fe268689811b14b81b")),
            ),
            (
                ind("md5", md5, json!({"associated_hashes": []})),
                PolicyConfig {
                    hash_type: HashType::Sha256,
                    ..d.clone()
                },
                Err(HashUnavailable),
            ),
            (
                ind("md5", &md5.to_uppercase(), json!({"associated_hashes": []})),
                d.clone(),
                Ok(("File(Md5)", md5)),
            ),
            (ind("md5", "abc", json!({})), d.clone(), Err(InvalidValue)),
            (
                ind("md5", "zz09cf6d3a358305f8c2f687b6f6da02", json!({})),
                d.clone(),
                Err(InvalidValue),
            ),
            (
                ind("ipv4", "1.2.3", json!({})),
                d.clone(),
                Err(InvalidValue),
            ),
            (
                ind("ipv4", "256.1.1.1", json!({})),
                d.clone(),
                Err(InvalidValue),
            ),
            (ind("fqdn", "", json!({})), d.clone(), Err(InvalidValue)),
            (
                ind("fqdn", "bad domain.example", json!({})),
                d.clone(),
                Err(InvalidValue),
            ),
            (
                ind("url", "https://a.example/ x", json!({})),
                d.clone(),
                Err(InvalidValue),
            ),
        ];
        for (i, p, want) in &table {
            check(i, p, *want);
        }
        // Every reason appears in the table at least once.
        for reason in RejectReason::ALL {
            assert!(
                table.iter().any(|(_, _, w)| *w == Err(reason)),
                "{reason:?} untested"
            );
        }
    }

    #[test]
    fn rules_apply_in_design_order() {
        // Low confidence and OSINT-only at once: the first rule that fails names it.
        let i = ind(
            "ipv4",
            "1.2.3.4",
            json!({"mscore": 10, "sources": [{"osint": true}]}),
        );
        assert_eq!(evaluate(&i, &defaults()), Err(RejectReason::LowConfidence));
        let i = ind("ftp", "x", json!({"mscore": 10}));
        assert_eq!(
            evaluate(&i, &defaults()),
            Err(RejectReason::UnsupportedType)
        );
    }

    #[test]
    fn categories_are_the_union_lowercased() {
        let i = ind(
            "ipv4",
            "1.2.3.4",
            json!({"sources": [{"category": ["Malware", "control-server"]}, {"category": ["malware"]}], "category": ["phishing"]}),
        );
        let c: Vec<String> = categories(&i).into_iter().collect();
        assert_eq!(c, vec!["control-server", "malware", "phishing"]);
    }
}
