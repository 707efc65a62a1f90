//! Settings: environment variables (Functions app settings) turned into validated sections.
//!
//! Parsing is pure: `Config::from_lookup` takes a function that maps a setting name to its
//! value, so tests pass a map and `main` passes the process environment. Every problem is
//! collected and reported at once, each naming its setting. Secret values live in [`Secret`],
//! whose `Debug` and `Display` never show them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

/// Defaults, named so that the README table and the code cannot drift apart silently.
pub mod defaults {
    pub const IP_EXPIRATION_DAYS: u32 = 7;
    pub const FQDN_EXPIRATION_DAYS: u32 = 7;
    pub const URL_EXPIRATION_DAYS: u32 = 7;
    pub const HASH_EXPIRATION_DAYS: u32 = 90;
    pub const INITIAL_LOOKBACK_DAYS: u32 = 30;
    pub const MINIMUM_CONFIDENCE: u8 = 80;
    pub const MINIMUM_THREAT_SCORE: u8 = 80;
    pub const SYNC_SCHEDULE_HOURS: u32 = 4;
    pub const SYNC_TIME_BUDGET_SECONDS: u64 = 1500;
    pub const HTTP_TIMEOUT_SECONDS: u64 = 120;
    pub const SOURCE_SYSTEM: &str = "Mandiant";
    pub const STATE_DIR: &str = "./.mati-sentinel";
    pub const TIMER_SCHEDULE: &str = "0 */15 * * * *";
    pub const MATI_BASE_URL: &str = "https://api.intelligence.mandiant.com";
}

/// A secret setting. It can only be read through [`Secret::expose`], and prints as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashType {
    Md5,
    Sha1,
    Sha256,
}

impl HashType {
    pub fn as_str(self) -> &'static str {
        match self {
            HashType::Md5 => "md5",
            HashType::Sha1 => "sha1",
            HashType::Sha256 => "sha256",
        }
    }
    pub fn from_mandiant(s: &str) -> Option<Self> {
        match s {
            "md5" => Some(HashType::Md5),
            "sha1" => Some(HashType::Sha1),
            "sha256" => Some(HashType::Sha256),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Alert,
    Block,
    Allow,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::Block => "block",
            Action::Allow => "allow",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadApi {
    /// `threat-intelligence-stix-objects:upload`, 2024-02-01-preview (the default).
    StixObjects,
    /// `threatintelligence:upload-indicators`, 2022-07-01 (what the vendor's container used).
    UploadIndicators,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    Public,
    UsGov,
    China,
}

impl Cloud {
    pub fn authority_host(self) -> &'static str {
        match self {
            Cloud::Public => "https://login.microsoftonline.com",
            Cloud::UsGov => "https://login.microsoftonline.us",
            Cloud::China => "https://login.chinacloudapi.cn",
        }
    }
    pub fn resource_manager(self) -> &'static str {
        match self {
            Cloud::Public => "https://management.azure.com",
            Cloud::UsGov => "https://management.usgovcloudapi.net",
            Cloud::China => "https://management.chinacloudapi.cn",
        }
    }
    /// The upload host for an API; the legacy API has no documented sovereign endpoint.
    pub fn sentinel_endpoint(self, api: UploadApi) -> Option<&'static str> {
        match (self, api) {
            (Cloud::Public, UploadApi::StixObjects) => Some("https://api.ti.sentinel.azure.com"),
            (Cloud::UsGov, UploadApi::StixObjects) => Some("https://api.ti.sentinel.azure.us"),
            (Cloud::China, UploadApi::StixObjects) => Some("https://api.ti.sentinel.azure.cn"),
            (Cloud::Public, UploadApi::UploadIndicators) => {
                Some("https://sentinelus.azure-api.net")
            }
            _ => None,
        }
    }
}

/// Which indicator types are synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnabledTypes {
    pub ipv4: bool,
    pub fqdn: bool,
    pub url: bool,
    pub hash: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    pub min_confidence: u8,
    pub min_threat_score: u8,
    pub exclude_osint: bool,
    pub include_uncategorized: bool,
    pub hash_type: HashType,
    pub types: EnabledTypes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StixConfig {
    pub ipv4_days: u32,
    pub fqdn_days: u32,
    pub url_days: u32,
    pub hash_days: u32,
    pub action: Action,
    pub passive_only: bool,
}

#[derive(Clone, Debug)]
pub struct MatiConfig {
    pub api_key: Secret,
    pub api_secret: Secret,
    pub base_url: Url,
}

#[derive(Clone, Debug)]
pub enum SentinelAuth {
    /// An Entra app registration.
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: Secret,
    },
    /// The Function app's managed identity; `client_id` picks a user-assigned one.
    ManagedIdentity { client_id: Option<String> },
}

#[derive(Clone, Debug)]
pub struct SentinelConfig {
    pub workspace_id: String,
    pub auth: SentinelAuth,
    pub api: UploadApi,
    pub endpoint: Url,
    pub source_system: String,
    pub authority_host: Url,
    /// `https://management.azure.com/.default` or its sovereign twin.
    pub token_scope: String,
}

/// The workspace as an Azure resource, for reconciliation (`ENABLE_DEDUPLICATION`).
#[derive(Clone, Debug)]
pub struct WorkspaceResource {
    pub subscription_id: String,
    pub resource_group: String,
    pub workspace_name: String,
    pub resource_manager: Url,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateConfig {
    Folder(PathBuf),
    /// Container URL reached with the managed identity.
    BlobManagedIdentity(String),
    /// Container URL carrying a SAS token (kept secret: the token is a credential).
    BlobSas(Secret),
    /// Azurite's well-known development account.
    DevelopmentStorage,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncConfig {
    pub initial_lookback_days: u32,
    pub schedule_hours: u32,
    pub time_budget: Duration,
    pub timer_schedule: String,
    pub enable_deduplication: bool,
    /// How long one HTTP request may take before it counts as hung (and is retried).
    pub http_timeout: Duration,
}

impl SyncConfig {
    /// The retry limits every client uses, with the configured request timeout.
    pub fn retry_policy(&self) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy {
            request_timeout: self.http_timeout,
            ..crate::retry::RetryPolicy::DEFAULT
        }
    }
}

/// Everything the product reads from its settings. Sections that a command does not need
/// are `None` (a dry run from a file needs neither Mandiant nor Sentinel).
#[derive(Clone, Debug)]
pub struct Config {
    pub policy: PolicyConfig,
    pub stix: StixConfig,
    pub sync: SyncConfig,
    pub state: StateConfig,
    pub mati: Option<MatiConfig>,
    pub sentinel: Option<SentinelConfig>,
    pub workspace: Option<WorkspaceResource>,
    /// A user-assigned managed identity, for Sentinel (without a client secret) and Blob state.
    pub managed_identity_client_id: Option<String>,
    pub app_insights: Option<Secret>,
}

/// What a command needs from the settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    pub mati: bool,
    pub sentinel: bool,
}

impl Needs {
    pub const ALL: Needs = Needs {
        mati: true,
        sentinel: true,
    };
    pub const NOTHING: Needs = Needs {
        mati: false,
        sentinel: false,
    };
}

/// One problem with one setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub setting: &'static str,
    pub message: String,
}

/// Every problem found, in the order the settings are read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} setting(s) need attention:", self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  {}: {}", p.setting, p.message)?;
        }
        Ok(())
    }
}

/// Every setting the product reads, in the order it reads them (a unit test keeps this list
/// and `Config::from_lookup` in step; deployment files are checked against it).
pub const SETTINGS: &[&str] = &[
    "MINIMUM_CONFIDENCE",
    "MINIMUM_THREAT_SCORE",
    "EXCLUDE_OSINT",
    "INCLUDE_UNCATEGORIZED",
    "HASH_TYPE",
    "INCLUDE_IPV4",
    "INCLUDE_FQDN",
    "INCLUDE_URL",
    "INCLUDE_HASH",
    "IP_INDICATOR_EXPIRATION",
    "FQDN_INDICATOR_EXPIRATION",
    "URL_INDICATOR_EXPIRATION",
    "HASH_INDICATOR_EXPIRATION",
    "DEFAULT_ACTION",
    "PASSIVE_ONLY",
    "TIMER_SCHEDULE",
    "INITIAL_LOOKBACK",
    "SYNC_SCHEDULE",
    "SYNC_TIME_BUDGET_SECONDS",
    "HTTP_TIMEOUT_SECONDS",
    "ENABLE_DEDUPLICATION",
    "STATE_CONTAINER_URL",
    "STATE_CONTAINER_SAS_URL",
    "AzureWebJobsStorage",
    "STATE_DIR",
    "MATI_API_KEY",
    "MATI_API_SECRET",
    "MATI_BASE_URL",
    "AZURE_CLOUD",
    "MANAGED_IDENTITY_CLIENT_ID",
    "AZURE_WORKSPACE_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "SENTINEL_UPLOAD_API",
    "SENTINEL_ENDPOINT",
    "SENTINEL_SOURCE_SYSTEM",
    "AZURE_AUTHORITY_HOST",
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_RESOURCE_GROUP_NAME",
    "AZURE_WORKSPACE_NAME",
    "AZURE_RESOURCE_MANAGER_ENDPOINT",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
];

const KEY_VAULT_PREFIX: &str = "@Microsoft.KeyVault(";

/// Reads settings and remembers problems, so validation goes on after the first one.
struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn problem(&mut self, setting: &'static str, message: impl Into<String>) {
        self.problems.push(Problem {
            setting,
            message: message.into(),
        });
    }

    /// The trimmed value, `None` when unset or empty. An unresolved Key Vault reference is
    /// a problem of its own: the Functions host leaves the literal text when it cannot
    /// resolve one, and using it as a value would fail far from the cause.
    fn raw(&mut self, name: &'static str) -> Option<String> {
        let value = (self.lookup)(name)?;
        let value = value.trim();
        if value.is_empty() {
            return None;
        }
        if value.starts_with(KEY_VAULT_PREFIX) {
            self.problem(
                name,
                "is an unresolved Key Vault reference (@Microsoft.KeyVault(...)): \
                 check the reference and that the app's identity may read the secret \
                 (Key Vault Secrets User)",
            );
            return None;
        }
        Some(value.to_string())
    }

    fn required(&mut self, name: &'static str, needed: bool) -> Option<String> {
        let had_problems = self.problems.len();
        let v = self.raw(name);
        if v.is_none() && needed && self.problems.len() == had_problems {
            self.problem(name, "is required but not set");
        }
        v
    }

    fn number<T>(&mut self, name: &'static str, default: T, min: T, max: T) -> T
    where
        T: std::str::FromStr + PartialOrd + Copy + fmt::Display,
    {
        match self.raw(name) {
            None => default,
            Some(v) => match v.parse::<T>() {
                Ok(n) if n >= min && n <= max => n,
                _ => {
                    self.problem(
                        name,
                        format!("must be a whole number from {min} to {max}, got {v:?}"),
                    );
                    default
                }
            },
        }
    }

    fn boolean(&mut self, name: &'static str, default: bool) -> bool {
        match self.raw(name) {
            None => default,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    self.problem(name, format!("must be true or false, got {v:?}"));
                    default
                }
            },
        }
    }

    fn choice<T: Copy>(&mut self, name: &'static str, default: T, choices: &[(&str, T)]) -> T {
        match self.raw(name) {
            None => default,
            Some(v) => {
                let lower = v.to_ascii_lowercase();
                match choices.iter().find(|(k, _)| *k == lower) {
                    Some((_, t)) => *t,
                    None => {
                        let names: Vec<&str> = choices.iter().map(|(k, _)| *k).collect();
                        self.problem(
                            name,
                            format!("must be one of {}, got {v:?}", names.join(", ")),
                        );
                        default
                    }
                }
            }
        }
    }

    fn guid(&mut self, name: &'static str, needed: bool) -> Option<String> {
        let v = self.required(name, needed)?;
        if is_guid(&v) {
            Some(v.to_ascii_lowercase())
        } else {
            self.problem(
                name,
                format!("must be a GUID like 00000000-0000-0000-0000-000000000000, got {v:?}"),
            );
            None
        }
    }

    /// An endpoint URL: https, or http on a loopback host (local fakes and emulators).
    fn endpoint(&mut self, name: &'static str, default: Option<&str>) -> Option<Url> {
        let (text, from_setting) = match self.raw(name) {
            Some(v) => (v, true),
            None => (default?.to_string(), false),
        };
        match Url::parse(&text) {
            Ok(url) if url.scheme() == "https" || (url.scheme() == "http" && is_loopback(&url)) => {
                Some(url)
            }
            Ok(_) if from_setting => {
                self.problem(
                    name,
                    format!("must be an https URL (http only for loopback), got {text:?}"),
                );
                None
            }
            Err(e) if from_setting => {
                self.problem(name, format!("is not a valid URL ({e}): {text:?}"));
                None
            }
            _ => None,
        }
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

pub fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Config {
    /// Reads the process environment.
    pub fn from_env(needs: Needs) -> Result<Config, ConfigError> {
        Self::from_lookup(&|name| std::env::var(name).ok(), needs)
    }

    /// Reads from a map; for tests and tools.
    pub fn from_map(map: &BTreeMap<String, String>, needs: Needs) -> Result<Config, ConfigError> {
        Self::from_lookup(&|name| map.get(name).cloned(), needs)
    }

    pub fn from_lookup(
        lookup: &dyn Fn(&str) -> Option<String>,
        needs: Needs,
    ) -> Result<Config, ConfigError> {
        let mut r = Reader {
            lookup,
            problems: Vec::new(),
        };

        let policy = PolicyConfig {
            min_confidence: r.number("MINIMUM_CONFIDENCE", defaults::MINIMUM_CONFIDENCE, 0, 100),
            min_threat_score: r.number(
                "MINIMUM_THREAT_SCORE",
                defaults::MINIMUM_THREAT_SCORE,
                0,
                100,
            ),
            exclude_osint: r.boolean("EXCLUDE_OSINT", true),
            include_uncategorized: r.boolean("INCLUDE_UNCATEGORIZED", true),
            hash_type: r.choice(
                "HASH_TYPE",
                HashType::Md5,
                &[
                    ("md5", HashType::Md5),
                    ("sha1", HashType::Sha1),
                    ("sha256", HashType::Sha256),
                ],
            ),
            types: EnabledTypes {
                ipv4: r.boolean("INCLUDE_IPV4", true),
                fqdn: r.boolean("INCLUDE_FQDN", true),
                url: r.boolean("INCLUDE_URL", true),
                hash: r.boolean("INCLUDE_HASH", true),
            },
        };

        let stix = StixConfig {
            ipv4_days: r.number(
                "IP_INDICATOR_EXPIRATION",
                defaults::IP_EXPIRATION_DAYS,
                1,
                365,
            ),
            fqdn_days: r.number(
                "FQDN_INDICATOR_EXPIRATION",
                defaults::FQDN_EXPIRATION_DAYS,
                1,
                365,
            ),
            url_days: r.number(
                "URL_INDICATOR_EXPIRATION",
                defaults::URL_EXPIRATION_DAYS,
                1,
                365,
            ),
            hash_days: r.number(
                "HASH_INDICATOR_EXPIRATION",
                defaults::HASH_EXPIRATION_DAYS,
                1,
                365,
            ),
            action: r.choice(
                "DEFAULT_ACTION",
                Action::Alert,
                &[
                    ("alert", Action::Alert),
                    ("block", Action::Block),
                    ("allow", Action::Allow),
                ],
            ),
            passive_only: r.boolean("PASSIVE_ONLY", false),
        };

        let timer_schedule = r
            .raw("TIMER_SCHEDULE")
            .unwrap_or_else(|| defaults::TIMER_SCHEDULE.to_string());
        if timer_schedule.split_whitespace().count() != 6 {
            r.problem(
                "TIMER_SCHEDULE",
                format!(
                    "must be an NCRONTAB expression with six fields (second minute hour day month weekday), got {timer_schedule:?}"
                ),
            );
        }
        let sync = SyncConfig {
            initial_lookback_days: r.number(
                "INITIAL_LOOKBACK",
                defaults::INITIAL_LOOKBACK_DAYS,
                1,
                89,
            ),
            schedule_hours: r.number("SYNC_SCHEDULE", defaults::SYNC_SCHEDULE_HOURS, 1, 168),
            time_budget: Duration::from_secs(r.number(
                "SYNC_TIME_BUDGET_SECONDS",
                defaults::SYNC_TIME_BUDGET_SECONDS,
                10,
                86_400,
            )),
            timer_schedule,
            enable_deduplication: r.boolean("ENABLE_DEDUPLICATION", false),
            http_timeout: Duration::from_secs(r.number(
                "HTTP_TIMEOUT_SECONDS",
                defaults::HTTP_TIMEOUT_SECONDS,
                5,
                600,
            )),
        };

        let state = read_state(&mut r);

        let mati = {
            let key = r.required("MATI_API_KEY", needs.mati);
            let secret = r.required("MATI_API_SECRET", needs.mati);
            let base_url = r.endpoint("MATI_BASE_URL", Some(defaults::MATI_BASE_URL));
            match (key, secret, base_url) {
                (Some(k), Some(s), Some(u)) => Some(MatiConfig {
                    api_key: Secret::new(k),
                    api_secret: Secret::new(s),
                    base_url: u,
                }),
                _ => None,
            }
        };

        let cloud = r.choice(
            "AZURE_CLOUD",
            Cloud::Public,
            &[
                ("public", Cloud::Public),
                ("usgov", Cloud::UsGov),
                ("china", Cloud::China),
            ],
        );
        let managed_identity_client_id = r.guid("MANAGED_IDENTITY_CLIENT_ID", false);
        let sentinel = read_sentinel(&mut r, cloud, needs.sentinel, &managed_identity_client_id);

        let workspace = {
            let needed = sync.enable_deduplication && needs.sentinel;
            let sub = r.guid("AZURE_SUBSCRIPTION_ID", needed);
            let rg = r.required("AZURE_RESOURCE_GROUP_NAME", needed);
            let name = r.required("AZURE_WORKSPACE_NAME", needed);
            let arm = r.endpoint(
                "AZURE_RESOURCE_MANAGER_ENDPOINT",
                Some(cloud.resource_manager()),
            );
            match (sub, rg, name, arm) {
                (Some(s), Some(g), Some(n), Some(a)) => Some(WorkspaceResource {
                    subscription_id: s,
                    resource_group: g,
                    workspace_name: n,
                    resource_manager: a,
                }),
                _ => None,
            }
        };

        let app_insights = r
            .raw("APPLICATIONINSIGHTS_CONNECTION_STRING")
            .map(Secret::new);

        if r.problems.is_empty() {
            Ok(Config {
                policy,
                stix,
                sync,
                state,
                mati,
                sentinel,
                workspace,
                managed_identity_client_id,
                app_insights,
            })
        } else {
            Err(ConfigError {
                problems: r.problems,
            })
        }
    }
}

fn read_state(r: &mut Reader<'_>) -> StateConfig {
    if let Some(url) = r.raw("STATE_CONTAINER_URL") {
        match Url::parse(&url) {
            Ok(u) if u.scheme() == "https" && u.query().is_none() => {
                return StateConfig::BlobManagedIdentity(url);
            }
            _ => r.problem(
                "STATE_CONTAINER_URL",
                "must be an https container URL without a query, like https://<account>.blob.core.windows.net/<container>",
            ),
        }
    }
    if let Some(url) = r.raw("STATE_CONTAINER_SAS_URL") {
        match Url::parse(&url) {
            Ok(u) if u.query().is_some_and(|q| q.contains("sig=")) => {
                return StateConfig::BlobSas(Secret::new(url));
            }
            // The value may hold a signature: never echo it.
            _ => r.problem(
                "STATE_CONTAINER_SAS_URL",
                "must be a container URL with a SAS token (…/<container>?sv=…&sig=…)",
            ),
        }
    }
    if r.raw("AzureWebJobsStorage")
        .is_some_and(|v| v.eq_ignore_ascii_case("UseDevelopmentStorage=true"))
    {
        return StateConfig::DevelopmentStorage;
    }
    StateConfig::Folder(PathBuf::from(
        r.raw("STATE_DIR")
            .unwrap_or_else(|| defaults::STATE_DIR.to_string()),
    ))
}

fn read_sentinel(
    r: &mut Reader<'_>,
    cloud: Cloud,
    needed: bool,
    mi_client_id: &Option<String>,
) -> Option<SentinelConfig> {
    let workspace_id = r.guid("AZURE_WORKSPACE_ID", needed);
    let tenant = r.raw("AZURE_TENANT_ID");
    let client_id = r.raw("AZURE_CLIENT_ID");
    let secret = r.raw("AZURE_CLIENT_SECRET");
    let auth = match secret {
        Some(secret) => {
            if tenant.is_none() && needed {
                r.problem(
                    "AZURE_TENANT_ID",
                    "is required when AZURE_CLIENT_SECRET is set (the Entra tenant of the app registration)",
                );
            }
            if client_id.is_none() && needed {
                r.problem(
                    "AZURE_CLIENT_ID",
                    "is required when AZURE_CLIENT_SECRET is set (the app registration's application id)",
                );
            }
            if let Some(t) = &tenant
                && !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                r.problem(
                    "AZURE_TENANT_ID",
                    format!("must be a tenant GUID or domain, got {t:?}"),
                );
            }
            match (tenant, client_id) {
                (Some(tenant_id), Some(client_id)) => Some(SentinelAuth::ClientSecret {
                    tenant_id,
                    client_id,
                    secret: Secret::new(secret),
                }),
                _ => None,
            }
        }
        None => Some(SentinelAuth::ManagedIdentity {
            client_id: mi_client_id.clone(),
        }),
    };
    let api = r.choice(
        "SENTINEL_UPLOAD_API",
        UploadApi::StixObjects,
        &[
            ("stix-objects", UploadApi::StixObjects),
            ("upload-indicators", UploadApi::UploadIndicators),
        ],
    );
    let default_endpoint = cloud.sentinel_endpoint(api);
    let endpoint = r.endpoint("SENTINEL_ENDPOINT", default_endpoint);
    if endpoint.is_none() && default_endpoint.is_none() && needed {
        r.problem(
            "SENTINEL_ENDPOINT",
            "is required: the legacy upload-indicators API has no documented endpoint in this AZURE_CLOUD",
        );
    }
    let source_system = r
        .raw("SENTINEL_SOURCE_SYSTEM")
        .unwrap_or_else(|| defaults::SOURCE_SYSTEM.to_string());
    if source_system.eq_ignore_ascii_case("Microsoft Sentinel") {
        r.problem(
            "SENTINEL_SOURCE_SYSTEM",
            "must not be \"Microsoft Sentinel\": Sentinel reserves that name",
        );
    }
    let authority_host = r.endpoint("AZURE_AUTHORITY_HOST", Some(cloud.authority_host()));
    let token_scope = format!("{}/.default", cloud.resource_manager());
    match (workspace_id, auth, endpoint, authority_host) {
        (Some(workspace_id), Some(auth), Some(endpoint), Some(authority_host)) => {
            Some(SentinelConfig {
                workspace_id,
                auth,
                api,
                endpoint,
                source_system,
                authority_host,
                token_scope,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const WS: &str = "11111111-2222-3333-4444-555555555555";

    fn valid() -> BTreeMap<String, String> {
        map(&[
            ("MATI_API_KEY", "key-id"),
            ("MATI_API_SECRET", "very-secret-mati"),
            ("AZURE_WORKSPACE_ID", WS),
            ("AZURE_TENANT_ID", "contoso.onmicrosoft.com"),
            ("AZURE_CLIENT_ID", "client"),
            ("AZURE_CLIENT_SECRET", "very-secret-entra"),
        ])
    }

    fn problems(m: &BTreeMap<String, String>, needs: Needs) -> Vec<&'static str> {
        Config::from_map(m, needs)
            .unwrap_err()
            .problems
            .iter()
            .map(|p| p.setting)
            .collect()
    }

    #[test]
    fn defaults_match_the_design_table() {
        let c = Config::from_map(&valid(), Needs::ALL).unwrap();
        assert_eq!(c.policy.min_confidence, 80);
        assert_eq!(c.policy.min_threat_score, 80);
        assert!(c.policy.exclude_osint && c.policy.include_uncategorized);
        assert_eq!(c.policy.hash_type, HashType::Md5);
        assert_eq!(
            (
                c.stix.ipv4_days,
                c.stix.fqdn_days,
                c.stix.url_days,
                c.stix.hash_days
            ),
            (7, 7, 7, 90)
        );
        assert_eq!(c.stix.action, Action::Alert);
        assert!(!c.stix.passive_only);
        assert_eq!(c.sync.initial_lookback_days, 30);
        assert_eq!(c.sync.schedule_hours, 4);
        assert_eq!(c.sync.time_budget, Duration::from_secs(1500));
        assert_eq!(
            c.state,
            StateConfig::Folder(PathBuf::from("./.mati-sentinel"))
        );
        let s = c.sentinel.unwrap();
        assert_eq!(s.api, UploadApi::StixObjects);
        assert_eq!(s.endpoint.as_str(), "https://api.ti.sentinel.azure.com/");
        assert_eq!(s.source_system, "Mandiant");
        assert_eq!(s.token_scope, "https://management.azure.com/.default");
        assert_eq!(
            c.mati.unwrap().base_url.as_str(),
            "https://api.intelligence.mandiant.com/"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let m = map(&[
            ("MINIMUM_CONFIDENCE", "101"),
            ("HASH_TYPE", "sha512"),
            ("INCLUDE_URL", "maybe"),
            ("INITIAL_LOOKBACK", "90"),
            ("AZURE_WORKSPACE_ID", "not-a-guid"),
        ]);
        assert_eq!(
            problems(&m, Needs::ALL),
            vec![
                "MINIMUM_CONFIDENCE",
                "HASH_TYPE",
                "INCLUDE_URL",
                "INITIAL_LOOKBACK",
                "MATI_API_KEY",
                "MATI_API_SECRET",
                "AZURE_WORKSPACE_ID"
            ]
        );
    }

    #[test]
    fn client_secret_needs_tenant_and_client_id() {
        let mut m = valid();
        m.remove("AZURE_TENANT_ID");
        m.remove("AZURE_CLIENT_ID");
        assert_eq!(
            problems(&m, Needs::ALL),
            vec!["AZURE_TENANT_ID", "AZURE_CLIENT_ID"]
        );
    }

    #[test]
    fn without_a_client_secret_the_managed_identity_is_used() {
        let mut m = valid();
        m.remove("AZURE_CLIENT_SECRET");
        m.insert(
            "MANAGED_IDENTITY_CLIENT_ID".into(),
            "AAAAAAAA-2222-3333-4444-555555555555".into(),
        );
        let c = Config::from_map(&m, Needs::ALL).unwrap();
        match c.sentinel.unwrap().auth {
            SentinelAuth::ManagedIdentity { client_id } => assert_eq!(
                client_id.as_deref(),
                Some("aaaaaaaa-2222-3333-4444-555555555555")
            ),
            other => panic!("expected managed identity, got {other:?}"),
        }
    }

    #[test]
    fn unresolved_key_vault_reference_is_named_as_such() {
        let mut m = valid();
        m.insert(
            "MATI_API_SECRET".into(),
            "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/mati/)".into(),
        );
        let err = Config::from_map(&m, Needs::ALL).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].setting, "MATI_API_SECRET");
        assert!(
            err.problems[0]
                .message
                .contains("unresolved Key Vault reference")
        );
    }

    #[test]
    fn debug_and_errors_never_show_secrets() {
        let mut m = valid();
        m.insert(
            "STATE_CONTAINER_SAS_URL".into(),
            "https://a.blob.core.windows.net/c?sv=1&sig=very-secret-sas".into(),
        );
        let c = Config::from_map(&m, Needs::ALL).unwrap();
        let dbg = format!("{c:?}");
        for secret in [
            "very-secret-mati",
            "very-secret-entra",
            "very-secret-sas",
            "key-id",
        ] {
            assert!(!dbg.contains(secret), "{secret} leaked into {dbg}");
        }
        // A malformed SAS URL is reported without echoing it.
        m.insert(
            "STATE_CONTAINER_SAS_URL".into(),
            "very-secret-sas-without-url".into(),
        );
        let err = Config::from_map(&m, Needs::ALL).unwrap_err().to_string();
        assert!(err.contains("STATE_CONTAINER_SAS_URL"));
        assert!(!err.contains("very-secret-sas"));
    }

    #[test]
    fn offline_needs_no_credentials_but_still_checks_what_is_set() {
        assert!(Config::from_map(&BTreeMap::new(), Needs::NOTHING).is_ok());
        let m = map(&[("HASH_TYPE", "sha3")]);
        assert_eq!(problems(&m, Needs::NOTHING), vec!["HASH_TYPE"]);
    }

    #[test]
    fn endpoints_must_be_https_unless_loopback() {
        let mut m = valid();
        m.insert("MATI_BASE_URL".into(), "http://127.0.0.1:8080".into());
        m.insert("SENTINEL_ENDPOINT".into(), "http://example.com".into());
        assert_eq!(problems(&m, Needs::ALL), vec!["SENTINEL_ENDPOINT"]);
    }

    #[test]
    fn sovereign_clouds_pick_their_endpoints_and_the_override_wins() {
        let mut m = valid();
        m.insert("AZURE_CLOUD".into(), "usgov".into());
        let s = Config::from_map(&m, Needs::ALL).unwrap().sentinel.unwrap();
        assert_eq!(s.endpoint.as_str(), "https://api.ti.sentinel.azure.us/");
        assert_eq!(
            s.authority_host.as_str(),
            "https://login.microsoftonline.us/"
        );
        assert_eq!(
            s.token_scope,
            "https://management.usgovcloudapi.net/.default"
        );
        m.insert(
            "AZURE_AUTHORITY_HOST".into(),
            "https://127.0.0.1:9443".into(),
        );
        let s = Config::from_map(&m, Needs::ALL).unwrap().sentinel.unwrap();
        assert_eq!(s.authority_host.as_str(), "https://127.0.0.1:9443/");
        m.insert("SENTINEL_UPLOAD_API".into(), "upload-indicators".into());
        assert_eq!(problems(&m, Needs::ALL), vec!["SENTINEL_ENDPOINT"]);
    }

    #[test]
    fn deduplication_needs_the_workspace_resource() {
        let mut m = valid();
        m.insert("ENABLE_DEDUPLICATION".into(), "true".into());
        assert_eq!(
            problems(&m, Needs::ALL),
            vec![
                "AZURE_SUBSCRIPTION_ID",
                "AZURE_RESOURCE_GROUP_NAME",
                "AZURE_WORKSPACE_NAME"
            ]
        );
    }

    #[test]
    fn the_settings_list_is_exactly_what_is_read() {
        use std::cell::RefCell;
        let read = RefCell::new(std::collections::BTreeSet::new());
        let mut m = valid();
        // Make every conditional branch read its settings.
        m.insert("ENABLE_DEDUPLICATION".into(), "true".into());
        let lookup = |name: &str| {
            read.borrow_mut().insert(name.to_string());
            m.get(name).cloned()
        };
        let _ = Config::from_lookup(&lookup, Needs::ALL);
        let listed: std::collections::BTreeSet<String> =
            SETTINGS.iter().map(|s| s.to_string()).collect();
        assert_eq!(*read.borrow(), listed);
    }

    #[test]
    fn reserved_source_system_is_refused() {
        let mut m = valid();
        m.insert("SENTINEL_SOURCE_SYSTEM".into(), "Microsoft Sentinel".into());
        assert_eq!(problems(&m, Needs::ALL), vec!["SENTINEL_SOURCE_SYSTEM"]);
    }

    #[test]
    fn state_settings_choose_the_store() {
        let mut m = valid();
        m.insert(
            "AzureWebJobsStorage".into(),
            "UseDevelopmentStorage=true".into(),
        );
        let c = Config::from_map(&m, Needs::ALL).unwrap();
        assert_eq!(c.state, StateConfig::DevelopmentStorage);
        m.insert(
            "STATE_CONTAINER_URL".into(),
            "https://acct.blob.core.windows.net/state".into(),
        );
        let c = Config::from_map(&m, Needs::ALL).unwrap();
        assert_eq!(
            c.state,
            StateConfig::BlobManagedIdentity("https://acct.blob.core.windows.net/state".into())
        );
    }
}
