//! All configuration, read once from the environment and validated at
//! start-up. A missing, malformed or unknown setting is an error naming the
//! variable; nothing else in the crate reads the environment.
//!
//! Every variable is listed in `.env.sample` with its default. Secrets are
//! never printed: [`Config`]'s `Debug` redacts them.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:4001";
pub const DEFAULT_DB_POOL_SIZE: u32 = 16;
pub const DEFAULT_DB_ACQUIRE_TIMEOUT_MS: u64 = 2_000;
pub const DEFAULT_DB_STATEMENT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;
pub const DEFAULT_MAX_DEPTH: usize = 15;
pub const DEFAULT_MAX_COMPLEXITY: usize = 50_000;
pub const DEFAULT_LOADER_DELAY_US: u64 = 1_000;
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_SHUTDOWN_DRAIN_MS: u64 = 5_000;
pub const DEFAULT_L1_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_CACHE_TTL_SECS: u64 = 60;
pub const DEFAULT_CACHE_NEGATIVE_TTL_SECS: u64 = 10;
pub const DEFAULT_CACHE_MAX_STALE_SECS: u64 = 120;
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 50;
pub const DEFAULT_LEASE_MS: u64 = 2_000;
pub const DEFAULT_LEASE_WAIT_MS: u64 = 150;
pub const DEFAULT_HOT_KEY_PER_SEC: u64 = 20;
pub const DEFAULT_STALE_CHECK_RATE: f64 = 0.001;
pub const DEFAULT_STALE_WINDOW_MS: u64 = 1_000;
pub const DEFAULT_WRITE_VISIBILITY_TIMEOUT_MS: u64 = 100;
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_024;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 256;
pub const DEFAULT_MAX_FIELDS: usize = 1_000;
pub const DEFAULT_MAX_ALIASES: usize = 50;
pub const DEFAULT_MAX_ROOT_FIELDS: usize = 20;
pub const DEFAULT_MAX_REPRESENTATIONS: usize = 1_000;
pub const DEFAULT_MAX_BATCH_OPERATIONS: usize = 10;
pub const DEFAULT_MAX_REQUEST_COMPLEXITY: usize = 100_000;
pub const DEFAULT_READ: Quota = Quota { per_sec: 200, burst: 400 };
pub const DEFAULT_WRITE: Quota = Quota { per_sec: 20, burst: 40 };
pub const DEFAULT_USER_WRITE: Quota = Quota { per_sec: 2, burst: 10 };
pub const DEFAULT_EVENTS: Quota = Quota { per_sec: 50, burst: 100 };

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} is required but not set")]
    Missing(&'static str),
    #[error("{name}={value:?} is invalid: {reason}")]
    Invalid { name: String, value: String, reason: String },
    #[error("{name} is not a setting of this service (known: {known})")]
    Unknown { name: String, known: String },
}

/// Postgres connection settings.
#[derive(Clone)]
pub struct DatabaseConfig {
    /// Primary: all writes, and reads unless `read_url` is set.
    pub url: String,
    /// Optional read replica for the read path. Replication lag makes a
    /// write invisible there for a moment; leave unset when read-your-writes
    /// across requests matters more than offloading the primary.
    pub read_url: Option<String>,
    pub pool_size: u32,
    pub acquire_timeout: Duration,
    /// Server-side `statement_timeout` for every connection.
    pub statement_timeout: Duration,
}

/// HTTP server settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Serve `/metrics` on this address only (not on `listen`), when set.
    pub metrics_listen: Option<SocketAddr>,
    pub request_timeout: Duration,
    /// A connection whose request headers take longer is closed (slowloris).
    /// hyper runs this timer while a keep-alive connection waits for its next
    /// request too, so it is also the idle time a connection may keep: keep
    /// it above clients' keep-alive time-outs (4–5 s for Node).
    pub header_read_timeout: Duration,
    /// Open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Requests executing at once at most; more are shed with 503.
    pub max_concurrent_requests: usize,
    pub max_body_bytes: usize,
    pub shutdown_timeout: Duration,
    /// On SIGTERM, how long readiness fails while requests are still served
    /// (so load balancers stop sending) before the listener closes.
    pub shutdown_drain: Duration,
    /// Serve the GraphiQL page on `GET /graphql`.
    pub graphiql: bool,
}

/// A rate: `per_sec` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub per_sec: u32,
    pub burst: u32,
}

/// Rate limits (SPEC §6). Each quota is shared by all instances through
/// Redis, and enforced per instance when Redis is unavailable.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// `UGC_RATE_LIMIT=off` turns every rate limit off (benchmarks).
    pub enabled: bool,
    /// Every `POST /graphql`, per client address.
    pub read: Quota,
    /// Mutations, per client address.
    pub write: Quota,
    /// Mutations, per signed-in user (JWT `sub`).
    pub user_write: Quota,
    /// `POST /events`, per bearer token.
    pub events: Quota,
}

/// GraphQL execution policy.
#[derive(Debug, Clone)]
pub struct GraphqlConfig {
    pub max_depth: usize,
    /// Cost of one operation: list fields weighted by `first`, `_entities`
    /// by its representations.
    pub max_complexity: usize,
    /// Fields of one operation after fragment expansion.
    pub max_fields: usize,
    pub max_aliases: usize,
    pub max_root_fields: usize,
    /// `_entities` representations in one request.
    pub max_representations: usize,
    /// Operations in one batched HTTP request.
    pub max_batch_operations: usize,
    /// Summed cost of every operation of one HTTP request.
    pub max_request_complexity: usize,
    pub introspection: bool,
    /// How long a DataLoader waits to gather keys into one batch.
    pub loader_delay: Duration,
}

/// Authentication and trust.
#[derive(Clone)]
pub struct AuthConfig {
    /// HS256 secret; without it every mutation is `UNAUTHENTICATED`.
    pub jwt_secret: Option<String>,
    /// Proxies whose `X-Forwarded-For` is believed (CIDRs; a bare address is one host).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Domain behaviour switches.
#[derive(Debug, Clone, Default)]
pub struct DomainConfig {
    /// New reviews start `PENDING` and wait for a moderator.
    pub moderate_on_create: bool,
}

/// The read-path cache (L1 moka, L2 Redis).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `UGC_CACHE=off` sends every read to Postgres (benchmarks, debugging).
    pub enabled: bool,
    /// Rendered `_entities` fragments in front of the data caches
    /// (`UGC_ENTITY_CACHE`; only with the cache on).
    pub entity_cache: bool,
    /// Namespace of every Redis key (several deployments or tests can share one Redis).
    pub prefix: String,
    /// L1 budget in bytes (weighed per entry).
    pub l1_max_bytes: u64,
    /// Freshness of pages and aggregates; reviews by id live 5× longer.
    pub ttl: Duration,
    /// Freshness of negative results (unknown ids, empty pages).
    pub negative_ttl: Duration,
    /// How long past freshness an entry may still be served while it is
    /// refreshed, or while Postgres fails.
    pub max_stale: Duration,
    /// Timeout of every Redis call.
    pub redis_timeout: Duration,
    /// Cross-instance load lease, and how long others wait for its fill.
    pub lease: Duration,
    pub lease_wait: Duration,
    /// Requests per second above which a key is hot.
    pub hot_key_per_sec: u64,
    /// Fraction of cache hits checked against Postgres (stale-read detector).
    pub stale_check_rate: f64,
    /// A hit older than the committed row by more than this is a stale read.
    pub stale_window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// How a write becomes visible on every instance (`events/visibility.rs`).
#[derive(Debug, Clone)]
pub struct CoherenceConfig {
    /// How long a mutation waits for every live instance to acknowledge its
    /// invalidation; an instance that has not by then stops serving its L1
    /// until it has caught up. Zero: no waiting (other instances' L1s catch
    /// up within the fan-out lag).
    pub write_visibility_timeout: Duration,
    /// How long writers keep waiting for a silent instance; it heartbeats
    /// every third of it and serves no L1 once two thirds passed without one.
    pub instance_lease: Duration,
}

/// A cache in front (Apollo Router's response cache, a CDN): what answers
/// tell it, and where invalidations are forwarded.
#[derive(Clone)]
pub struct RouterCacheConfig {
    /// `UGC_ROUTER_CACHE_TAGS`: answers carry `apolloCacheTags` /
    /// `apolloEntityCacheTags` (off: a few bytes less per entity).
    pub tags: bool,
    /// `UGC_ROUTER_INVALIDATION_URL` (a router's `/invalidation`): every
    /// applied invalidation is forwarded as `cache_tag` requests.
    pub invalidation_url: Option<String>,
    /// `UGC_ROUTER_INVALIDATION_SECRET`: the router's `shared_key`, sent as
    /// the `Authorization` header.
    pub invalidation_secret: Option<String>,
    /// `UGC_ROUTER_SUBGRAPH_NAME`: this subgraph's name in the supergraph.
    pub subgraph_name: String,
}

impl fmt::Debug for RouterCacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterCacheConfig")
            .field("tags", &self.tags)
            .field("invalidation_url", &self.invalidation_url)
            .field("invalidation_secret", &self.invalidation_secret.as_ref().map(|_| "<redacted>"))
            .field("subgraph_name", &self.subgraph_name)
            .finish()
    }
}

/// OpenTelemetry traces: exported over OTLP/HTTP (JSON) only when an
/// endpoint is set. The standard variables are read here, validated like
/// every other setting; the SDK reads the batch processor's `OTEL_BSP_*`
/// and `OTEL_EXPORTER_OTLP_HEADERS`/`_TIMEOUT` itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TracesConfig {
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended).
    pub endpoint: String,
    /// `OTEL_SERVICE_NAME`, default `ugc-subgraph`.
    pub service_name: String,
    pub sampler: TraceSampler,
}

/// `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. Default:
/// `parentbased_traceidratio` at [`DEFAULT_TRACE_RATIO`] — a gateway's
/// sampled trace is always continued, and a tenth of the requests that
/// come without one start a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSampler {
    /// Follow the caller's sampling decision when a `traceparent` came.
    pub parent_based: bool,
    /// Fraction of root traces sampled (1 = always on, 0 = always off).
    pub ratio: f64,
}

pub const DEFAULT_TRACE_RATIO: f64 = 0.1;

#[derive(Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    /// Where L2 and the shared rate-limit budgets live (`None`: L1 only).
    pub redis: Option<RedisTarget>,
    pub http: HttpConfig,
    pub graphql: GraphqlConfig,
    pub auth: AuthConfig,
    pub domain: DomainConfig,
    pub cache: CacheConfig,
    pub rate_limit: RateLimitConfig,
    pub coherence: CoherenceConfig,
    /// Bearer token other subgraphs present on `POST /events`; the endpoint
    /// is disabled without it.
    pub events_token: Option<String>,
    pub log_format: LogFormat,
    /// `None`: traces are off (no endpoint, or `OTEL_SDK_DISABLED=true`).
    pub traces: Option<TracesConfig>,
    pub router: RouterCacheConfig,
    /// `UGC_METRICS_OPERATIONS`: operation names that get their own label
    /// in the latency histogram (bounded cardinality: the rest is `other`).
    pub metrics_operations: OperationNames,
}

/// A fixed set of operation names, leaked once at start-up so that labels
/// are `&'static str` like every other label.
#[derive(Debug, Clone, Default)]
pub struct OperationNames(Vec<&'static str>);

impl OperationNames {
    /// `name` if listed, else `other`.
    pub fn label(&self, name: &str) -> &'static str {
        self.0.iter().find(|n| **n == name).copied().unwrap_or("other")
    }
}

impl Config {
    /// Reads the process environment.
    ///
    /// # Errors
    /// The first missing, malformed or unknown variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads settings from any list of variables (tests pass their own).
    ///
    /// # Errors
    /// The first missing, malformed or unknown variable.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let env = Env { vars: vars.into_iter().collect(), read: RefCell::new(BTreeSet::new()) };
        let config = Self::read(&env)?;
        // Every variable this service knows was read above; any other
        // `UGC_*` variable is a typo and refused.
        let known = env.read.borrow();
        let mut unknown: Vec<&String> =
            env.vars.keys().filter(|k| k.starts_with("UGC_") && !known.contains(k.as_str())).collect();
        unknown.sort();
        if let Some(name) = unknown.first() {
            let known =
                known.iter().filter(|k| k.starts_with("UGC_")).map(String::as_str).collect::<Vec<_>>().join(", ");
            return Err(ConfigError::Unknown { name: (*name).clone(), known });
        }
        Ok(config)
    }

    fn read(env: &Env) -> Result<Self, ConfigError> {
        let database = DatabaseConfig {
            url: env.postgres_url("DATABASE_URL")?.ok_or(ConfigError::Missing("DATABASE_URL"))?,
            read_url: env.postgres_url("DATABASE_READ_URL")?,
            pool_size: env.parse_in("UGC_DB_POOL_SIZE", DEFAULT_DB_POOL_SIZE, 1..=1000)?,
            acquire_timeout: env.millis("UGC_DB_ACQUIRE_TIMEOUT_MS", DEFAULT_DB_ACQUIRE_TIMEOUT_MS)?,
            statement_timeout: env.millis("UGC_DB_STATEMENT_TIMEOUT_MS", DEFAULT_DB_STATEMENT_TIMEOUT_MS)?,
        };
        let redis = redis_target(env)?;
        let http = HttpConfig {
            listen: env.parse("UGC_LISTEN", DEFAULT_LISTEN.parse().expect("valid default"))?,
            metrics_listen: env.parse_opt("UGC_METRICS_LISTEN")?,
            request_timeout: env.millis("UGC_REQUEST_TIMEOUT_MS", DEFAULT_REQUEST_TIMEOUT_MS)?,
            header_read_timeout: env.millis("UGC_HEADER_READ_TIMEOUT_MS", DEFAULT_HEADER_READ_TIMEOUT_MS)?,
            max_connections: env.parse_in("UGC_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, 1..=1_000_000)?,
            max_concurrent_requests: env.parse_in(
                "UGC_MAX_CONCURRENT_REQUESTS",
                DEFAULT_MAX_CONCURRENT_REQUESTS,
                1..=100_000,
            )?,
            graphiql: env.bool("UGC_GRAPHIQL", false)?,
            max_body_bytes: env.parse_in("UGC_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, 1024..=64 * 1024 * 1024)?,
            shutdown_timeout: Duration::from_secs(env.parse_in(
                "UGC_SHUTDOWN_TIMEOUT_SECS",
                DEFAULT_SHUTDOWN_TIMEOUT_SECS,
                0..=3600,
            )?),
            shutdown_drain: Duration::from_millis(env.parse_in(
                "UGC_SHUTDOWN_DRAIN_MS",
                DEFAULT_SHUTDOWN_DRAIN_MS,
                0..=600_000,
            )?),
        };
        let graphql = GraphqlConfig {
            max_depth: env.parse_in("UGC_MAX_DEPTH", DEFAULT_MAX_DEPTH, 1..=1000)?,
            max_complexity: env.parse_in("UGC_MAX_COMPLEXITY", DEFAULT_MAX_COMPLEXITY, 1..=10_000_000)?,
            max_fields: env.parse_in("UGC_MAX_FIELDS", DEFAULT_MAX_FIELDS, 1..=1_000_000)?,
            max_aliases: env.parse_in("UGC_MAX_ALIASES", DEFAULT_MAX_ALIASES, 0..=100_000)?,
            max_root_fields: env.parse_in("UGC_MAX_ROOT_FIELDS", DEFAULT_MAX_ROOT_FIELDS, 1..=10_000)?,
            max_representations: env.parse_in("UGC_MAX_REPRESENTATIONS", DEFAULT_MAX_REPRESENTATIONS, 1..=100_000)?,
            max_batch_operations: env.parse_in("UGC_MAX_BATCH_OPERATIONS", DEFAULT_MAX_BATCH_OPERATIONS, 1..=1_000)?,
            max_request_complexity: env.parse_in(
                "UGC_MAX_REQUEST_COMPLEXITY",
                DEFAULT_MAX_REQUEST_COMPLEXITY,
                1..=100_000_000,
            )?,
            introspection: env.bool("UGC_INTROSPECTION", false)?,
            loader_delay: Duration::from_micros(env.parse_in(
                "UGC_LOADER_DELAY_US",
                DEFAULT_LOADER_DELAY_US,
                0..=100_000,
            )?),
        };
        let jwt_secret = env.get("UGC_JWT_SECRET").map(str::to_owned);
        if jwt_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err(env.invalid("UGC_JWT_SECRET", "must be at least 16 bytes"));
        }
        let trusted_proxies = env
            .get("UGC_TRUSTED_PROXIES")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                item.parse::<ipnet::IpNet>()
                    .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| env.invalid("UGC_TRUSTED_PROXIES", format!("{item:?} is not a CIDR or an address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let quota = |name: &str, default: Quota| -> Result<Quota, ConfigError> {
            let per_sec = env.parse_in(&format!("UGC_RATE_LIMIT_{name}_PER_SEC"), default.per_sec, 1..=10_000_000)?;
            let burst = env.parse_in(&format!("UGC_RATE_LIMIT_{name}_BURST"), default.burst, 1..=10_000_000)?;
            Ok(Quota { per_sec, burst })
        };
        let rate_limit = RateLimitConfig {
            enabled: env.bool("UGC_RATE_LIMIT", true)?,
            read: quota("READ", DEFAULT_READ)?,
            write: quota("WRITE", DEFAULT_WRITE)?,
            user_write: quota("USER_WRITE", DEFAULT_USER_WRITE)?,
            events: quota("EVENTS", DEFAULT_EVENTS)?,
        };
        let log_format = match env.get("UGC_LOG_FORMAT") {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(_) => return Err(env.invalid("UGC_LOG_FORMAT", "expected text or json")),
        };
        let secs = |name: &str, default: u64| -> Result<Duration, ConfigError> {
            Ok(Duration::from_secs(env.parse_in(name, default, 1..=86_400)?))
        };
        let prefix = env.get("UGC_CACHE_PREFIX").unwrap_or("ugc").to_owned();
        // Braces would move the Redis Cluster hash tag that co-locates an
        // entry with its tag's token (cache/key.rs).
        if prefix.len() > 64 || prefix.contains(|c: char| c.is_whitespace() || c == '{' || c == '}') {
            return Err(env.invalid("UGC_CACHE_PREFIX", "at most 64 characters, no spaces or braces"));
        }
        let cache = CacheConfig {
            enabled: env.bool("UGC_CACHE", true)?,
            entity_cache: env.bool("UGC_ENTITY_CACHE", true)?,
            prefix,
            l1_max_bytes: env.parse_in("UGC_L1_MAX_BYTES", DEFAULT_L1_MAX_BYTES, 1024 * 1024..=1 << 40)?,
            ttl: secs("UGC_CACHE_TTL_SECS", DEFAULT_CACHE_TTL_SECS)?,
            negative_ttl: secs("UGC_CACHE_NEGATIVE_TTL_SECS", DEFAULT_CACHE_NEGATIVE_TTL_SECS)?,
            max_stale: secs("UGC_CACHE_MAX_STALE_SECS", DEFAULT_CACHE_MAX_STALE_SECS)?,
            redis_timeout: env.millis("UGC_REDIS_TIMEOUT_MS", DEFAULT_REDIS_TIMEOUT_MS)?,
            lease: env.millis("UGC_LEASE_MS", DEFAULT_LEASE_MS)?,
            lease_wait: env.millis("UGC_LEASE_WAIT_MS", DEFAULT_LEASE_WAIT_MS)?,
            hot_key_per_sec: env.parse_in("UGC_HOT_KEY_PER_SEC", DEFAULT_HOT_KEY_PER_SEC, 1..=1_000_000)?,
            stale_check_rate: env.parse_in("UGC_STALE_CHECK_RATE", DEFAULT_STALE_CHECK_RATE, 0.0..=1.0)?,
            stale_window: env.millis("UGC_STALE_WINDOW_MS", DEFAULT_STALE_WINDOW_MS)?,
        };
        let events_token = env.get("UGC_EVENTS_TOKEN").map(str::to_owned);
        if events_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(env.invalid("UGC_EVENTS_TOKEN", "must be at least 16 bytes"));
        }
        let coherence = CoherenceConfig {
            write_visibility_timeout: Duration::from_millis(env.parse_in(
                "UGC_WRITE_VISIBILITY_TIMEOUT_MS",
                DEFAULT_WRITE_VISIBILITY_TIMEOUT_MS,
                0..=10_000,
            )?),
            instance_lease: Duration::from_millis(env.parse_in("UGC_INSTANCE_LEASE_MS", 3_000, 1_500..=60_000)?),
        };
        Ok(Self {
            cache,
            rate_limit,
            coherence,
            events_token,
            database,
            redis,
            http,
            graphql,
            auth: AuthConfig { jwt_secret, trusted_proxies },
            domain: DomainConfig { moderate_on_create: env.bool("UGC_MODERATE_ON_CREATE", false)? },
            log_format,
            traces: traces(env)?,
            router: router(env)?,
            metrics_operations: operation_names(env)?,
        })
    }
}

fn operation_names(env: &Env) -> Result<OperationNames, ConfigError> {
    let names: Vec<&str> =
        env.get("UGC_METRICS_OPERATIONS").unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if names.len() > 200 {
        return Err(env.invalid("UGC_METRICS_OPERATIONS", "at most 200 names"));
    }
    if let Some(bad) = names.iter().find(|n| !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')) {
        return Err(env.invalid("UGC_METRICS_OPERATIONS", format!("{bad:?} is not a GraphQL name")));
    }
    Ok(OperationNames(names.into_iter().map(|n| &*Box::leak(n.to_owned().into_boxed_str())).collect()))
}

fn router(env: &Env) -> Result<RouterCacheConfig, ConfigError> {
    let invalidation_url = env.get("UGC_ROUTER_INVALIDATION_URL").map(str::to_owned);
    if let Some(url) = &invalidation_url {
        if !url.starts_with("http://") || url.parse::<axum::http::Uri>().is_err() {
            return Err(env.invalid("UGC_ROUTER_INVALIDATION_URL", "expected an http:// URL"));
        }
    }
    let invalidation_secret = env.get("UGC_ROUTER_INVALIDATION_SECRET").map(str::to_owned);
    if invalidation_url.is_some() && invalidation_secret.is_none() {
        return Err(ConfigError::Missing("UGC_ROUTER_INVALIDATION_SECRET"));
    }
    if invalidation_secret.as_deref().is_some_and(|s| axum::http::HeaderValue::from_str(s).is_err()) {
        return Err(env.invalid("UGC_ROUTER_INVALIDATION_SECRET", "must be visible ASCII (an HTTP header value)"));
    }
    let subgraph_name = env.get("UGC_ROUTER_SUBGRAPH_NAME").unwrap_or("ugc").to_owned();
    if subgraph_name.is_empty() || !subgraph_name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(env.invalid("UGC_ROUTER_SUBGRAPH_NAME", "letters, digits, - and _ only"));
    }
    Ok(RouterCacheConfig {
        tags: env.bool("UGC_ROUTER_CACHE_TAGS", false)?,
        invalidation_url,
        invalidation_secret,
        subgraph_name,
    })
}

fn traces(env: &Env) -> Result<Option<TracesConfig>, ConfigError> {
    let disabled = match env.get("OTEL_SDK_DISABLED") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(_) => return Err(env.invalid("OTEL_SDK_DISABLED", "expected true or false")),
    };
    let endpoint = match (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), env.get("OTEL_EXPORTER_OTLP_ENDPOINT")) {
        (Some(url), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url.to_owned()),
        (None, Some(base)) => ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("{}/v1/traces", base.trim_end_matches('/'))),
        (None, None) => return Ok(None),
    };
    if !(endpoint.1.starts_with("http://") || endpoint.1.starts_with("https://")) {
        return Err(env.invalid(endpoint.0, "expected an http:// or https:// URL (OTLP over HTTP)"));
    }
    if let Some(protocol) = env.get("OTEL_EXPORTER_OTLP_PROTOCOL") {
        if protocol != "http/json" {
            return Err(env.invalid("OTEL_EXPORTER_OTLP_PROTOCOL", "this build exports http/json only"));
        }
    }
    let ratio_arg = || -> Result<f64, ConfigError> {
        match env.get("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(1.0),
            Some(raw) => match raw.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                _ => Err(env.invalid("OTEL_TRACES_SAMPLER_ARG", "expected a ratio from 0 to 1")),
            },
        }
    };
    let sampler = match env.get("OTEL_TRACES_SAMPLER") {
        None => TraceSampler { parent_based: true, ratio: DEFAULT_TRACE_RATIO },
        Some("always_on") => TraceSampler { parent_based: false, ratio: 1.0 },
        Some("always_off") => TraceSampler { parent_based: false, ratio: 0.0 },
        Some("traceidratio") => TraceSampler { parent_based: false, ratio: ratio_arg()? },
        Some("parentbased_always_on") => TraceSampler { parent_based: true, ratio: 1.0 },
        Some("parentbased_always_off") => TraceSampler { parent_based: true, ratio: 0.0 },
        Some("parentbased_traceidratio") => TraceSampler { parent_based: true, ratio: ratio_arg()? },
        Some(_) => {
            return Err(env.invalid(
                "OTEL_TRACES_SAMPLER",
                "expected always_on, always_off, traceidratio or their parentbased_ forms",
            ))
        }
    };
    let service_name = env.get("OTEL_SERVICE_NAME").unwrap_or("ugc-subgraph").to_owned();
    Ok((!disabled).then_some(TracesConfig { endpoint: endpoint.1, service_name, sampler }))
}

/// One Redis server, or the seed nodes of a Redis Cluster.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Single(url) => f.debug_tuple("Single").field(&redact_url(url)).finish(),
            Self::Cluster(urls) => {
                f.debug_tuple("Cluster").field(&urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>()).finish()
            }
        }
    }
}

/// `REDIS_CLUSTER_URLS` (comma-separated seed nodes), or `REDIS_URL`: one
/// server (`redis://`, `rediss://`) or a cluster's seed nodes
/// (`redis+cluster://host:port,host:port`). Both set is a mistake.
fn redis_target(env: &Env) -> Result<Option<RedisTarget>, ConfigError> {
    let is_url = |u: &str| (u.starts_with("redis://") || u.starts_with("rediss://")) && u.len() > "redis://".len();
    let cluster = |name: &'static str, urls: Vec<String>| {
        if urls.is_empty() || !urls.iter().all(|u| is_url(u)) {
            return Err(env.invalid(name, "expected redis://host:port[,redis://host:port…]"));
        }
        Ok(Some(RedisTarget::Cluster(urls)))
    };
    match (env.get("REDIS_CLUSTER_URLS"), env.get("REDIS_URL")) {
        (Some(_), Some(_)) => {
            Err(env.invalid("REDIS_CLUSTER_URLS", "set either REDIS_URL or REDIS_CLUSTER_URLS, not both"))
        }
        (Some(list), None) => cluster(
            "REDIS_CLUSTER_URLS",
            list.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect(),
        ),
        (None, Some(url)) if url.starts_with("redis+cluster://") => {
            let hosts = &url["redis+cluster://".len()..];
            cluster("REDIS_URL", hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("redis://{h}")).collect())
        }
        (None, Some(url)) if is_url(url) => Ok(Some(RedisTarget::Single(url.to_owned()))),
        (None, Some(_)) => {
            Err(env.invalid("REDIS_URL", "expected redis://host:port[/db] or redis+cluster://host:port,host:port"))
        }
        (None, None) => Ok(None),
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database.url))
            .field("database_read_url", &self.database.read_url.as_deref().map(redact_url))
            .field("db_pool_size", &self.database.pool_size)
            .field("redis", &self.redis)
            .field("http", &self.http)
            .field("graphql", &self.graphql)
            .field("jwt_secret", &self.auth.jwt_secret.as_ref().map(|_| "<redacted>"))
            .field("trusted_proxies", &self.auth.trusted_proxies)
            .field("domain", &self.domain)
            .field("cache", &self.cache)
            .field("rate_limit", &self.rate_limit)
            .field("events_token", &self.events_token.as_ref().map(|_| "<redacted>"))
            .field("traces", &self.traces)
            .field("router", &self.router)
            .finish()
    }
}

/// `scheme://user:secret@host/db` → `scheme://user:***@host/db`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The variables, and the names read so far: whatever is read is known,
/// so every name is written once, where it is parsed.
struct Env {
    vars: HashMap<String, String>,
    read: RefCell<BTreeSet<String>>,
}

impl Env {
    fn get(&self, name: &str) -> Option<&str> {
        self.read.borrow_mut().insert(name.to_owned());
        self.vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn invalid(&self, name: &str, reason: impl fmt::Display) -> ConfigError {
        let value = self.vars.get(name).cloned().unwrap_or_default();
        let value = if name.contains("SECRET") || name.contains("TOKEN") { "<redacted>".into() } else { value };
        ConfigError::Invalid { name: name.to_owned(), value, reason: reason.to_string() }
    }

    fn parse<T: FromStr>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|e| self.invalid(name, e)),
        }
    }

    fn parse_opt<T: FromStr>(&self, name: &str) -> Result<Option<T>, ConfigError>
    where
        T::Err: fmt::Display,
    {
        self.get(name).map(|raw| raw.trim().parse().map_err(|e| self.invalid(name, e))).transpose()
    }

    fn parse_in<T>(&self, name: &str, default: T, range: std::ops::RangeInclusive<T>) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + fmt::Display,
        T::Err: fmt::Display,
    {
        let value = self.parse(name, default)?;
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(name, format!("must be between {} and {}", range.start(), range.end())))
        }
    }

    fn millis(&self, name: &str, default: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.parse_in(name, default, 1..=3_600_000)?))
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("1" | "true" | "on" | "yes") => Ok(true),
            Some("0" | "false" | "off" | "no") => Ok(false),
            Some(_) => Err(self.invalid(name, "expected true/false, on/off or 1/0")),
        }
    }

    fn postgres_url(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(Some(url.to_owned())),
            Some(_) => Err(self.invalid(name, "expected postgres://user@host:port/database")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_apply_with_only_the_database() {
        let c = Config::from_vars(vars(&[("DATABASE_URL", "postgres://postgres@127.0.0.1/ugc")])).unwrap();
        assert_eq!(c.http.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.database.pool_size, DEFAULT_DB_POOL_SIZE);
        assert!(c.redis.is_none() && c.auth.jwt_secret.is_none());
        assert!(!c.graphql.introspection && !c.http.graphiql, "safe defaults: no introspection, no GraphiQL");
        assert!(c.rate_limit.enabled && c.rate_limit.read == DEFAULT_READ);
    }

    #[test]
    fn redis_is_one_server_or_a_cluster_never_both() {
        let db = ("DATABASE_URL", "postgres://x@h/d");
        let target = |pairs: &[(&str, &str)]| Config::from_vars(vars(&[&[db], pairs].concat())).map(|c| c.redis);
        assert_eq!(target(&[("REDIS_URL", "redis://h:1")]).unwrap(), Some(RedisTarget::Single("redis://h:1".into())));
        let both = RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()]);
        assert_eq!(target(&[("REDIS_CLUSTER_URLS", "redis://a:1, redis://b:2")]).unwrap(), Some(both.clone()));
        assert_eq!(target(&[("REDIS_URL", "redis+cluster://a:1,b:2")]).unwrap(), Some(both));
        for bad in [
            vec![("REDIS_URL", "redis://a:1"), ("REDIS_CLUSTER_URLS", "redis://b:2")],
            vec![("REDIS_CLUSTER_URLS", "a:1")],
            vec![("REDIS_CLUSTER_URLS", ",")],
            vec![("REDIS_URL", "redis+cluster://")],
            vec![("REDIS_URL", "h:6379")],
            vec![("UGC_CACHE_PREFIX", "a{b}")],
        ] {
            assert!(target(&bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn trusted_proxies_take_cidrs_and_addresses() {
        let c = Config::from_vars(vars(&[
            ("DATABASE_URL", "postgres://x@h/d"),
            ("UGC_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1 ,::1"),
            ("UGC_RATE_LIMIT_READ_PER_SEC", "7"),
        ]))
        .unwrap();
        let shown: Vec<String> = c.auth.trusted_proxies.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
        assert_eq!(c.rate_limit.read, Quota { per_sec: 7, burst: DEFAULT_READ.burst });
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(Config::from_vars(vars(&[])).unwrap_err(), ConfigError::Missing("DATABASE_URL"));
        let db = ("DATABASE_URL", "postgres://x@h/d");
        for (bad, name) in [
            (("UGC_LISTEN", "nowhere"), "UGC_LISTEN"),
            (("UGC_DB_POOL_SIZE", "0"), "UGC_DB_POOL_SIZE"),
            (("UGC_INTROSPECTION", "maybe"), "UGC_INTROSPECTION"),
            (("REDIS_URL", "localhost:6379"), "REDIS_URL"),
            (("UGC_JWT_SECRET", "short"), "UGC_JWT_SECRET"),
        ] {
            let err = Config::from_vars(vars(&[db, bad])).unwrap_err();
            assert!(err.to_string().starts_with(name), "{err}");
        }
        let err = Config::from_vars(vars(&[db, ("UGC_LISTN", "1")])).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Unknown { name, known } if name == "UGC_LISTN" && known.contains("UGC_LISTEN")),
            "{err}"
        );
        let err = Config::from_vars(vars(&[db, ("UGC_TRUSTED_PROXIES", "10.0.0.0/8, gateway")])).unwrap_err();
        assert!(err.to_string().contains("\"gateway\" is not a CIDR"), "{err}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = Config::from_vars(vars(&[
            ("DATABASE_URL", "postgres://app:hunter2@db/ugc"),
            ("UGC_JWT_SECRET", "a-very-secret-signing-key"),
        ]))
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("app:***@db/ugc"));
    }
}
