//! Reading back what the workspace already holds (`ENABLE_DEDUPLICATION`): the management
//! API's clause-based `/query` (`2025-07-01-preview`), paged by `nextLink`.
//!
//! The only module that reads Sentinel's stored objects. `parse_page` is pure; `WorkspaceReader`
//! does the HTTP with the uploader's Entra credential (the same Azure Resource Manager
//! audience). Invariant: a reconciliation either reads every page or fails; a partial read
//! would let the cycle upload duplicates of what it did not see.

use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::config::WorkspaceResource;
use crate::dedupe::{Seeded, uuid_bytes};
use crate::mati::{ClientStats, excerpt};
use crate::retry::{Deadline, OutOfTime, RetryPolicy};
use crate::sentinel::{Post, Posted, SentinelError, SentinelUploader};
use crate::stix::fingerprint_value;

pub const API_VERSION: &str = "2025-07-01-preview";
/// Objects asked for per page (the size Microsoft's own example uses).
pub const PAGE_SIZE: u32 = 100;
/// A bound on pages, so a `nextLink` that never ends cannot hold a cycle (10 million objects).
const MAX_PAGES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("could not get an Entra token for the management API: {0}")]
    Token(String),
    #[error(
        "the management API refused the token twice (HTTP 401): check that {who} belongs to the workspace's tenant and that AZURE_CLOUD matches it"
    )]
    Unauthorized { who: String },
    #[error(
        "the management API denied reading the workspace's threat intelligence (HTTP 403): grant {who} the Microsoft Sentinel Reader (or Contributor) role on the resource group AZURE_RESOURCE_GROUP_NAME={resource_group}, or turn ENABLE_DEDUPLICATION off. It said: {excerpt}"
    )]
    Forbidden {
        who: String,
        resource_group: String,
        excerpt: String,
    },
    #[error(
        "the management API does not know the workspace (HTTP 404): check AZURE_SUBSCRIPTION_ID={subscription}, AZURE_RESOURCE_GROUP_NAME={resource_group} and AZURE_WORKSPACE_NAME={workspace} (the workspace's name, not its ID), and that Microsoft Sentinel is on for it. It said: {excerpt}"
    )]
    NotFound {
        subscription: String,
        resource_group: String,
        workspace: String,
        excerpt: String,
    },
    #[error("the management API rejected the query (HTTP {status}): {excerpt}")]
    Rejected { status: u16, excerpt: String },
    #[error(
        "the management API's nextLink points away from AZURE_RESOURCE_MANAGER_ENDPOINT ({link}); not following it with our token"
    )]
    ForeignNextLink { link: String },
    #[error("the workspace's indicators span more than {0} pages; not reading further")]
    TooManyPages(usize),
    #[error(transparent)]
    OutOfTime(#[from] OutOfTime),
    #[error("reading the workspace's indicators failed after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
}

/// One object of a page, as the cache will hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub pattern: String,
    pub seeded: Seeded,
}

/// One page of `/query`'s answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub found: Vec<Found>,
    /// Objects that are not live indicators we could update: another STIX type, revoked
    /// (STIX makes that final), or without a usable id or pattern.
    pub skipped: u64,
    pub next_link: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    #[serde(default)]
    value: Vec<Value>,
    next_link: Option<String>,
}

/// Pure: reads one page. `None` when the body is not the documented shape.
pub fn parse_page(body: &[u8]) -> Option<Page> {
    let answer: Answer = serde_json::from_slice(body).ok()?;
    let mut page = Page {
        next_link: answer.next_link.filter(|l| !l.is_empty()),
        ..Default::default()
    };
    for object in &answer.value {
        match found(object) {
            Some(f) => page.found.push(f),
            None => page.skipped += 1,
        }
    }
    Some(page)
}

fn found(object: &Value) -> Option<Found> {
    let data = object.get("properties")?.get("data")?;
    if data.get("type")?.as_str()? != "indicator" || data.get("revoked") == Some(&Value::Bool(true))
    {
        return None;
    }
    let id = data.get("id")?.as_str()?;
    let uuid = id.strip_prefix("indicator--")?.to_ascii_lowercase();
    let pattern = data.get("pattern")?.as_str()?;
    let valid_until = match data.get("valid_until").and_then(Value::as_str) {
        // No end: Sentinel matches it for ever.
        None => i64::MAX,
        Some(t) => OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .ok()?
            .unix_timestamp(),
    };
    Some(Found {
        pattern: pattern.to_string(),
        seeded: Seeded {
            stix_uuid: uuid_bytes(&uuid)?,
            fingerprint: fingerprint_value(data),
            valid_until,
        },
    })
}

/// The `/query` body: every indicator object from our source.
pub fn query_body(source_system: &str) -> Value {
    serde_json::json!({
        "condition": {
            "stixObjectType": "indicator",
            "clauses": [{"field": "source", "operator": "Equals", "values": [source_system]}],
            "conditionConnective": "And",
        },
        "maxPageSize": PAGE_SIZE,
    })
}

pub struct WorkspaceReader {
    http: reqwest::Client,
    url: String,
    resource: WorkspaceResource,
    retry: RetryPolicy,
    pub stats: ClientStats,
    /// Retries never wait past the running cycle's deadline.
    pub deadline: Deadline,
}

/// What a reconciliation read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub pages: u64,
    pub found: u64,
    pub skipped: u64,
}

impl WorkspaceReader {
    pub fn new(http: reqwest::Client, resource: &WorkspaceResource, retry: RetryPolicy) -> Self {
        let base = resource.resource_manager.as_str().trim_end_matches('/');
        let url = format!(
            "{base}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.OperationalInsights/workspaces/{}/providers/Microsoft.SecurityInsights/threatIntelligence/main/query?api-version={API_VERSION}",
            resource.subscription_id, resource.resource_group, resource.workspace_name
        );
        WorkspaceReader {
            http,
            url,
            resource: resource.clone(),
            retry,
            stats: ClientStats::default(),
            deadline: Deadline::default(),
        }
    }

    /// Reads every indicator of `source_system` in the workspace, page by page, handing each
    /// to `each`. Tokens come from the uploader's credential.
    pub async fn read_all(
        &self,
        source_system: &str,
        tokens: &SentinelUploader,
        mut each: impl FnMut(Found),
    ) -> Result<ReadStats, WorkspaceError> {
        let body = query_body(source_system).to_string();
        let origin = format!(
            "{}/",
            self.resource
                .resource_manager
                .origin()
                .ascii_serialization()
        );
        let mut stats = ReadStats::default();
        let mut url = self.url.clone();
        loop {
            if stats.pages as usize >= MAX_PAGES {
                return Err(WorkspaceError::TooManyPages(MAX_PAGES));
            }
            let page = self.page(&url, &body, tokens).await?;
            stats.pages += 1;
            stats.skipped += page.skipped;
            stats.found += page.found.len() as u64;
            page.found.into_iter().for_each(&mut each);
            let Some(next) = page.next_link else {
                return Ok(stats);
            };
            // The token is for Azure Resource Manager: never hand it to another host.
            if !next.starts_with(&origin) {
                return Err(WorkspaceError::ForeignNextLink { link: next });
            }
            url = next;
        }
    }

    /// Reads the first page only (`check`): proves the token, the role and the resource.
    pub async fn probe(
        &self,
        source_system: &str,
        tokens: &SentinelUploader,
    ) -> Result<Page, WorkspaceError> {
        let body = query_body(source_system).to_string();
        self.page(&self.url, &body, tokens).await
    }

    /// One page, with bounded retries; the same body goes to the `nextLink` URL.
    async fn page(
        &self,
        url: &str,
        body: &str,
        tokens: &SentinelUploader,
    ) -> Result<Page, WorkspaceError> {
        let post = Post {
            http: &self.http,
            url,
            body,
            retry: &self.retry,
            deadline: &self.deadline,
            stats: &self.stats,
            // Resource Manager reads have their own, far larger, limits.
            limiter: None,
            what: "reading the workspace failed; asking again",
        };
        let posted = post.send(tokens, parse_page).await.map_err(|e| match e {
            SentinelError::OutOfTime(t) => WorkspaceError::OutOfTime(t),
            other => WorkspaceError::Token(other.to_string()),
        })?;
        let r = &self.resource;
        match posted {
            Posted::Ok(page) => Ok(page),
            Posted::Unauthorized => Err(WorkspaceError::Unauthorized {
                who: tokens.who().to_string(),
            }),
            Posted::GaveUp { last } => Err(WorkspaceError::GaveUp {
                attempts: self.retry.max_attempts,
                last,
            }),
            Posted::Fatal { status: 403, body } => Err(WorkspaceError::Forbidden {
                who: tokens.who().to_string(),
                resource_group: r.resource_group.clone(),
                excerpt: excerpt(&body),
            }),
            Posted::Fatal { status: 404, body } => Err(WorkspaceError::NotFound {
                subscription: r.subscription_id.clone(),
                resource_group: r.resource_group.clone(),
                workspace: r.workspace_name.clone(),
                excerpt: excerpt(&body),
            }),
            Posted::Fatal { status, body } => Err(WorkspaceError::Rejected {
                status,
                excerpt: excerpt(&body),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedupe::derived_uuid;
    use crate::stix::uuid_text;

    #[test]
    fn a_page_yields_live_indicators_and_counts_the_rest() {
        let ours = uuid_text(&derived_uuid("ipv4--1"));
        let body = serde_json::json!({
            "value": [
                {"properties": {"data": {"type": "indicator", "id": format!("indicator--{ours}"),
                    "pattern": "[ipv4-addr:value = '1.2.3.4']", "valid_until": "2026-12-10T00:00:00.000Z"}}},
                {"properties": {"data": {"type": "indicator", "id": "indicator--8516D567-0DAA-4614-8745-E3591E1B48CF",
                    "pattern": "[url:value = 'https://x.example/']"}}},
                {"properties": {"data": {"type": "indicator", "id": "indicator--8516d567-0daa-4614-8745-e3591e1b48c0",
                    "pattern": "[url:value = 'https://y.example/']", "revoked": true}}},
                {"properties": {"data": {"type": "attack-pattern", "id": "attack-pattern--8516d567-0daa-4614-8745-e3591e1b48c1"}}},
                {"properties": {"data": {"type": "indicator", "id": "indicator--not-a-uuid", "pattern": "[x:y = 'z']"}}},
                {"properties": {}}
            ],
            "nextLink": "https://management.azure.com/next?skipToken=2"
        });
        let page = parse_page(body.to_string().as_bytes()).unwrap();
        assert_eq!(page.skipped, 4);
        assert_eq!(
            page.next_link.as_deref(),
            Some("https://management.azure.com/next?skipToken=2")
        );
        assert_eq!(page.found.len(), 2);
        assert_eq!(page.found[0].seeded.stix_uuid, derived_uuid("ipv4--1"));
        assert_eq!(page.found[0].seeded.valid_until, 1_796_860_800);
        assert_eq!(
            page.found[0].seeded.fingerprint, None,
            "no Mandiant extension"
        );
        assert_eq!(
            page.found[1].seeded.stix_uuid,
            uuid_bytes("8516d567-0daa-4614-8745-e3591e1b48cf").unwrap(),
            "an uppercase id is read"
        );
        assert_eq!(page.found[1].seeded.valid_until, i64::MAX);
    }

    #[test]
    fn the_last_page_and_foreign_bodies() {
        let last = parse_page(br#"{"value": [], "nextLink": ""}"#).unwrap();
        assert_eq!(last, Page::default());
        assert!(parse_page(b"<html>502</html>").is_none());
        assert!(parse_page(br#"{"value": [1, 2"#).is_none());
    }

    #[test]
    fn the_query_asks_for_our_source_only() {
        let b = query_body("Mandiant");
        assert_eq!(b["condition"]["stixObjectType"], "indicator");
        assert_eq!(
            b["condition"]["clauses"][0],
            serde_json::json!({"field": "source", "operator": "Equals", "values": ["Mandiant"]})
        );
    }
}
