//! Collector configuration: a TOML file plus `INGEST_*` environment overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::magic::RelativePathBuf;
use profile_cache::ProfileConfig;
use profile_cache::segments::{Segment, SegmentErrors, compile};
use serde::{Deserialize, Serialize};

use crate::auth::{ApiToken, MAX_TOKEN_NAME, Scope, TOKEN_TABLE_HELP, TokenHash};
use crate::ratelimit::{IpNet, RateLimitsConfig};
use crate::spool::SpoolConfig;

/// The demo write key; accepted only on a loopback address.
pub const DEMO_WRITE_KEY: &str = "demo";
/// The demo API token; accepted only on a loopback address.
pub const DEMO_API_TOKEN: &str = "demo-secret";
/// The name the demo API token has in the audit stream and the logs.
pub const DEMO_TOKEN_NAME: &str = "demo";
/// The scopes of the demo API token: every read.
pub const DEMO_TOKEN_SCOPES: [Scope; 2] = [Scope::ProfilesRead, Scope::SegmentsRead];

/// Everything the collector needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Redis URL. Default `redis://127.0.0.1:6379`.
    pub redis_url: String,
    /// Path that accepts FlatBuffers batches. Default `/v1/fb`.
    pub batch_path: String,
    /// Demo mode: adds the demo write key and API token (loopback only). Default false.
    pub demo: bool,
    /// Directory served at `/` (the demo shop), if any.
    pub www_dir: Option<PathBuf>,
    /// How long in-flight requests may take to finish after SIGINT/SIGTERM. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// What `Retry-After` tells clients when Redis is unavailable. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// API tokens, `[[api_tokens]]` tables: name, SHA-256 of the token, scopes.
    pub api_tokens: Vec<ApiToken>,
    /// Sites allowed to send events.
    pub write_keys: Vec<WriteKey>,
    /// Batch limits.
    pub limits: LimitsConfig,
    /// Request rates per write key, client address and API token.
    pub rate_limits: RateLimitsConfig,
    /// Proxies (addresses or networks such as `10.0.0.0/8`) whose `X-Forwarded-For` names
    /// the client. Default none: the client is the socket's peer.
    pub trusted_proxies: Vec<IpNet>,
    /// The audit stream of profile reads, exports and deletions.
    pub audit: AuditConfig,
    /// How profiles are kept in Redis.
    pub profiles: ProfileConfig,
    /// Segment definitions, `[[segments]]` tables (see `profile_cache::segments`), kept as
    /// written so that [`Config::segments`] can report every problem of every table.
    pub segments: Vec<serde_json::Value>,
    /// A TOML file of `[[segments]]` tables, instead of `segments`. A relative path is taken
    /// from the directory of the config file that names it.
    pub segments_file: Option<RelativePathBuf>,
    /// The deadline scheduler, which re-evaluates profiles whose segments change by time.
    pub scheduler: SchedulerConfig,
    /// The local spool that takes batches while Redis does not answer (off by default).
    pub spool: SpoolConfig,
    /// Consent rules beyond each batch's consent mask.
    pub consent: ConsentConfig,
    /// Per write key: what is kept of its events (`[sources.<write key>]`).
    pub sources: std::collections::BTreeMap<String, SourceConfig>,
    /// Serve HTTPS with this certificate and key (`[tls]`); default plain HTTP.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Requests in flight, connections and slow clients (`crate::overload`).
    pub overload: crate::overload::OverloadConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            redis_url: "redis://127.0.0.1:6379".into(),
            batch_path: "/v1/fb".into(),
            demo: false,
            www_dir: None,
            shutdown_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(1),
            api_tokens: Vec::new(),
            write_keys: Vec::new(),
            limits: LimitsConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            trusted_proxies: Vec::new(),
            audit: AuditConfig::default(),
            profiles: ProfileConfig::default(),
            segments: Vec::new(),
            segments_file: None,
            scheduler: SchedulerConfig::default(),
            spool: SpoolConfig::default(),
            consent: ConsentConfig::default(),
            sources: std::collections::BTreeMap::new(),
            tls: None,
            overload: crate::overload::OverloadConfig::default(),
        }
    }
}

/// The deadline scheduler ([`crate::scheduler`]): every collector runs one, and they share
/// the work through claims with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Whether this collector runs it. Default true.
    pub enabled: bool,
    /// The longest sleep between two looks at the schedule; the scheduler wakes earlier when
    /// the earliest deadline comes sooner. Keep it under a second for deadlines to fire
    /// within a second. Default 250 ms.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a claimed profile is left to its scheduler before another may take it over:
    /// how late a deadline can fire when a collector dies. Longer than
    /// `profiles.redis_timeout`. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// The most profiles claimed and evaluated in one round trip. Default 100.
    pub batch_size: usize,
}

/// The most profiles one scheduler round takes: each claim is one script call that holds
/// Redis while it runs.
pub const MAX_SCHEDULER_BATCH: usize = 10_000;

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval: Duration::from_millis(250),
            lease: Duration::from_secs(30),
            batch_size: 100,
        }
    }
}

/// A site's write key and the browser origins allowed to use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteKey {
    /// The key sent inside each batch.
    pub key: String,
    /// Allowed `Origin` values, e.g. `https://shop.example`; `*` allows any. Requests without
    /// an `Origin` header (servers, curl) are not browser requests and are not checked.
    #[serde(default)]
    pub origins: Vec<String>,
}

/// Settings of one source (the events sent with one write key): `[sources.<write key>]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// Which event properties are kept (data minimisation); default all.
    pub properties: FieldFilter,
    /// Which traits of `identify` events are kept; default all.
    pub traits: FieldFilter,
    /// Segment API: the purposes a message without `context.consent` is taken to have been
    /// granted: the lawful basis the sending backend declares, e.g. `["necessary",
    /// "analytics"]`. Unset means [`DEFAULT_SEGMENT_PURPOSES`] (only `necessary`: such
    /// messages are dropped as lacking consent until the source declares a basis); demo
    /// mode gives the demo key [`DEMO_SEGMENT_PURPOSES`].
    pub default_purposes: Option<Vec<profile_cache::Purpose>>,
    /// Segment API: consent category names of `context.consent.categoryPreferences` that
    /// are not purpose names, mapped onto purposes (`"Advertising" = "marketing"`).
    /// Names are compared case-insensitively; unmapped categories are ignored.
    pub consent_categories: std::collections::BTreeMap<String, profile_cache::Purpose>,
}

/// The purposes of a Segment message without a consent context when its source sets no
/// `default_purposes`: only `necessary`, which no tracked kind is allowed by. A backend
/// must declare its lawful basis before its events are kept.
pub const DEFAULT_SEGMENT_PURPOSES: [profile_cache::Purpose; 1] =
    [profile_cache::Purpose::Necessary];

/// The demo write key's `default_purposes`: the demo shop's backend sends what a shop
/// needs to measure and personalise, never marketing without the visitor's consent.
pub const DEMO_SEGMENT_PURPOSES: [profile_cache::Purpose; 3] = [
    profile_cache::Purpose::Necessary,
    profile_cache::Purpose::Analytics,
    profile_cache::Purpose::Personalization,
];

/// Names kept from a source: only those in `allow` when it is set, and never those in
/// `deny`. Names are compared exactly (case matters).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldFilter {
    /// When set, the only names kept.
    pub allow: Option<Vec<String>>,
    /// Names never kept.
    pub deny: Vec<String>,
}

impl FieldFilter {
    /// Whether `name` is kept.
    pub fn keeps(&self, name: &str) -> bool {
        self.allow
            .as_ref()
            .is_none_or(|allow| allow.iter().any(|a| a == name))
            && !self.deny.iter().any(|d| d == name)
    }
}

/// Consent rules the collector adds to each batch's own consent mask.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsentConfig {
    /// Per event kind, a purpose its events need besides their declared purpose and the
    /// kind's least purpose (the tracker's table): `{ track = "marketing" }` drops `track`
    /// events of visitors who have not granted marketing. Default none.
    pub purposes: std::collections::BTreeMap<profile_cache::EventKind, profile_cache::Purpose>,
}

/// The audit stream (`profile_cache::audit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Approximate cap of the audit stream (`XADD MAXLEN ~`): older entries are dropped, so
    /// ship them elsewhere to keep them longer. Default 1,000,000.
    pub stream_max_len: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            stream_max_len: 1_000_000,
        }
    }
}

/// Batch limits (defaults: the `wire` constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Body size, bytes.
    pub max_body_bytes: usize,
    /// Events per batch.
    pub max_events: usize,
    /// Any string but URLs, bytes.
    pub max_string_bytes: usize,
    /// Page URL and referrer, bytes.
    pub max_url_bytes: usize,
    /// Properties (traits) per event.
    pub max_properties: usize,
    /// Items per event.
    pub max_items: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = wire::Limits::default();
        Self {
            max_body_bytes: l.max_bytes,
            max_events: l.max_events,
            max_string_bytes: l.max_string_bytes,
            max_url_bytes: l.max_url_bytes,
            max_properties: l.max_properties,
            max_items: l.max_items,
        }
    }
}

impl LimitsConfig {
    /// The decoder's limits.
    pub fn wire(&self) -> wire::Limits {
        wire::Limits {
            max_bytes: self.max_body_bytes,
            max_events: self.max_events,
            max_string_bytes: self.max_string_bytes,
            max_url_bytes: self.max_url_bytes,
            max_properties: self.max_properties,
            max_items: self.max_items,
            ..wire::Limits::default()
        }
    }
}

/// Why a configuration cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable does not parse.
    #[error("{0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value parses but makes no sense.
    #[error("{field}: {problem}")]
    Invalid {
        /// The setting, e.g. `write_keys[0].origins[1]`.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// `api_tokens` written in the plain-text shape of earlier versions.
    #[error(
        "api_tokens in {location}: plain-text tokens are no longer accepted; {TOKEN_TABLE_HELP}"
    )]
    PlainApiTokens {
        /// Where they are written: the file, or the environment variable.
        location: String,
    },
    /// Segment definitions that do not check: every problem, one per line.
    #[error("{setting}: {} in the segment definitions:\n{}", count(.errors), indent(.errors))]
    Segments {
        /// `segments`, or `segments_file <path>`.
        setting: String,
        /// The problems.
        errors: SegmentErrors,
    },
}

fn count(errors: &SegmentErrors) -> String {
    match errors.0.len() {
        1 => "1 problem".into(),
        n => format!("{n} problems"),
    }
}

fn indent(errors: &SegmentErrors) -> String {
    let lines: Vec<String> = errors.0.iter().map(|e| format!("  {e}")).collect();
    lines.join("\n")
}

impl Config {
    /// Reads `path` (if given) and then `INGEST_*` variables from `env` (nested settings use
    /// `__`, e.g. `INGEST_PROFILES__DEDUPE_WINDOW=1d`), applies demo mode, and validates.
    ///
    /// # Errors
    /// A parse error naming the key and its source, or [`ConfigError::Invalid`].
    pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(invalid(
                    "config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // The caller passes the environment in (rather than figment reading the process's) so
        // tests need no global state.
        let vars: Vec<(String, String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("INGEST_") && k != "INGEST_CONFIG")
            .cloned()
            .collect();
        for (k, v) in &vars {
            let key = k["INGEST_".len()..].to_ascii_lowercase().replace("__", ".");
            figment = figment.merge(Serialized::default(&key, parse_env_value(v)));
        }
        let tokens_from_env = vars.iter().any(|(k, _)| k == "INGEST_API_TOKENS");
        reject_plain_tokens(&figment, tokens_from_env)?;
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.apply_demo();
        config.validate()?;
        Ok(config)
    }

    fn apply_demo(&mut self) {
        if !self.demo {
            return;
        }
        if !self.write_keys.iter().any(|k| k.key == DEMO_WRITE_KEY) {
            let port = self.listen.port();
            self.write_keys.push(WriteKey {
                key: DEMO_WRITE_KEY.into(),
                origins: vec![
                    format!("http://127.0.0.1:{port}"),
                    format!("http://localhost:{port}"),
                ],
            });
        }
        let source = self.sources.entry(DEMO_WRITE_KEY.into()).or_default();
        if source.default_purposes.is_none() {
            source.default_purposes = Some(DEMO_SEGMENT_PURPOSES.to_vec());
        }
        let demo = TokenHash::of(DEMO_API_TOKEN);
        if !self.api_tokens.iter().any(|t| t.sha256 == demo) {
            self.api_tokens.push(ApiToken {
                name: DEMO_TOKEN_NAME.into(),
                sha256: demo,
                scopes: DEMO_TOKEN_SCOPES.to_vec(),
            });
        }
    }

    /// Checks what types cannot: demo credentials only on loopback, well-formed origins,
    /// unique non-empty keys, named tokens with scopes, a batch path under `/`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let demo_token = TokenHash::of(DEMO_API_TOKEN);
        let demo_credentials = self.write_keys.iter().any(|k| k.key == DEMO_WRITE_KEY)
            || self.api_tokens.iter().any(|t| t.sha256 == demo_token);
        if demo_credentials && !self.listen.ip().is_loopback() {
            return Err(invalid(
                "listen",
                format!(
                    "{} is not a loopback address; the demo credentials (write key \"{DEMO_WRITE_KEY}\", token \"{DEMO_API_TOKEN}\") are refused there",
                    self.listen
                ),
            ));
        }
        if !self.batch_path.starts_with('/') || self.batch_path == "/" {
            return Err(invalid("batch_path", "must be a path such as /v1/fb"));
        }
        for (i, k) in self.write_keys.iter().enumerate() {
            if k.key.is_empty() {
                return Err(invalid(format!("write_keys[{i}].key"), "is empty"));
            }
            if self.write_keys[..i].iter().any(|o| o.key == k.key) {
                return Err(invalid(format!("write_keys[{i}].key"), "is listed twice"));
            }
            for (j, o) in k.origins.iter().enumerate() {
                if o != "*" && !is_origin(o) {
                    return Err(invalid(
                        format!("write_keys[{i}].origins[{j}]"),
                        format!("{o:?} is not an origin like https://shop.example or *"),
                    ));
                }
            }
        }
        self.validate_tokens()?;
        for key in self.sources.keys() {
            if !self.write_keys.iter().any(|k| &k.key == key) {
                return Err(invalid(
                    format!("sources.{key}"),
                    "names no configured write key ([[write_keys]] key)",
                ));
            }
        }
        if self.audit.stream_max_len == 0 {
            return Err(invalid("audit.stream_max_len", "must be greater than zero"));
        }
        if self.limits.max_body_bytes == 0 || self.limits.max_events == 0 {
            return Err(invalid(
                "limits",
                "max_body_bytes and max_events must be positive",
            ));
        }
        self.profiles
            .validate()
            .map_err(|e| invalid("profiles", e.to_string()))?;
        self.validate_scheduler()?;
        self.validate_spool()?;
        self.segments()?;
        Ok(())
    }

    fn validate_tokens(&self) -> Result<(), ConfigError> {
        for (i, t) in self.api_tokens.iter().enumerate() {
            let field = |name: &str| format!("api_tokens[{i}].{name}");
            let name_ok = (1..=MAX_TOKEN_NAME).contains(&t.name.len())
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !name_ok {
                return Err(invalid(
                    field("name"),
                    format!(
                        "{:?} is not 1 to {MAX_TOKEN_NAME} letters, digits, '.', '_' or '-'",
                        t.name
                    ),
                ));
            }
            if let Some(j) = self.api_tokens[..i].iter().position(|o| o.name == t.name) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} is also the name of api_tokens[{j}]", t.name),
                ));
            }
            if let Some(j) = self.api_tokens[..i]
                .iter()
                .position(|o| o.sha256 == t.sha256)
            {
                return Err(invalid(
                    field("sha256"),
                    format!("is the same token as api_tokens[{j}]"),
                ));
            }
            if t.scopes.is_empty() {
                let all: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                return Err(invalid(
                    field("scopes"),
                    format!("is empty; give one or more of {}", all.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn validate_spool(&self) -> Result<(), ConfigError> {
        if !self.spool.enabled {
            return Ok(());
        }
        self.spool
            .validate()
            .map_err(|e| invalid(format!("spool.{}", e.field), e.problem))?;
        let largest = self.spool.max_body_bytes();
        if self.limits.max_body_bytes as u64 > largest {
            return Err(invalid(
                "spool.segment_size",
                format!(
                    "{} holds batch bodies up to {largest} bytes, less than limits.max_body_bytes ({})",
                    self.spool.segment_size, self.limits.max_body_bytes
                ),
            ));
        }
        Ok(())
    }

    fn validate_scheduler(&self) -> Result<(), ConfigError> {
        let s = &self.scheduler;
        if s.poll_interval < Duration::from_millis(1) {
            return Err(invalid("scheduler.poll_interval", "must be at least 1ms"));
        }
        // A claim that ends while its evaluation is still in flight lets another scheduler
        // take the profile over: harmless (the late evaluation writes nothing) but wasted.
        if s.lease <= self.profiles.redis_timeout {
            return Err(invalid(
                "scheduler.lease",
                format!(
                    "{} must be longer than profiles.redis_timeout ({}), so a claim outlives a slow Redis call",
                    humantime_serde::re::humantime::format_duration(s.lease),
                    humantime_serde::re::humantime::format_duration(self.profiles.redis_timeout),
                ),
            ));
        }
        if !(1..=MAX_SCHEDULER_BATCH).contains(&s.batch_size) {
            return Err(invalid(
                "scheduler.batch_size",
                format!(
                    "{} is not between 1 and {MAX_SCHEDULER_BATCH}",
                    s.batch_size
                ),
            ));
        }
        Ok(())
    }

    /// The segments of `segments` or `segments_file`, checked and compiled with the
    /// lifecycle thresholds of `profiles.lifecycle`.
    ///
    /// # Errors
    /// Both settings are given, the file cannot be read, or [`ConfigError::Segments`]
    /// listing every problem of every definition.
    pub fn segments(&self) -> Result<Vec<Segment>, ConfigError> {
        let Some(file) = &self.segments_file else {
            return compile(&self.segments, &self.profiles.lifecycle).map_err(|errors| {
                ConfigError::Segments {
                    setting: "segments".into(),
                    errors,
                }
            });
        };
        if !self.segments.is_empty() {
            return Err(invalid(
                "segments_file",
                "is set together with segments; define segments in one of them",
            ));
        }
        let path = file.relative();
        if !path.exists() {
            return Err(invalid(
                "segments_file",
                format!("file {} does not exist", path.display()),
            ));
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SegmentsFile {
            #[serde(default)]
            segments: Vec<serde_json::Value>,
        }
        let tables: SegmentsFile = Figment::from(Toml::file_exact(&path))
            .extract()
            .map_err(Box::new)?;
        compile(&tables.segments, &self.profiles.lifecycle).map_err(|errors| {
            ConfigError::Segments {
                setting: format!("segments_file {}", path.display()),
                errors,
            }
        })
    }
}

/// Refuses `api_tokens = ["<token>"]`, the plain-text shape of earlier versions, with the
/// new shape spelled out (the deserializer would only say "expected a table").
fn reject_plain_tokens(figment: &Figment, from_env: bool) -> Result<(), ConfigError> {
    use figment::value::Value;
    let Ok(Value::Array(_, entries)) = figment.find_value("api_tokens") else {
        return Ok(());
    };
    if !entries.iter().any(|e| matches!(e, Value::String(..))) {
        return Ok(());
    }
    let location = match figment.find_metadata("api_tokens") {
        _ if from_env => "INGEST_API_TOKENS".to_string(),
        Some(figment::Metadata {
            source: Some(source),
            ..
        }) => source.to_string(),
        _ => "the configuration".to_string(),
    };
    Err(ConfigError::PlainApiTokens { location })
}

/// Environment values are TOML-ish: numbers, booleans and `[a, b]` arrays parse as such,
/// anything else is a string.
fn parse_env_value(v: &str) -> figment::value::Value {
    use figment::value::Value;
    let trimmed = v.trim();
    match toml_value(trimmed) {
        Some(value) => value,
        None => Value::from(v.to_string()),
    }
}

fn toml_value(s: &str) -> Option<figment::value::Value> {
    #[derive(Deserialize)]
    struct Wrap {
        v: figment::value::Value,
    }
    let doc = format!("v = {s}");
    Figment::from(Toml::string(&doc))
        .extract::<Wrap>()
        .ok()
        .map(|w| w.v)
}

fn is_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}
