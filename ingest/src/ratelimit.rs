//! Request rate limits: per write key and per client address on batch ingest, per API token
//! on the reads. Each is a keyed GCRA limiter (`governor`): a steady rate per second and a
//! burst, one state per key, in this process's memory. Limits are per collector process:
//! behind a load balancer with N collectors, a client may get up to N times the rate.
//!
//! Memory: a key whose bucket is full again is indistinguishable from one never seen, so
//! every [`CLEANUP_EVERY`] checks each limiter drops those (`retain_recent`). A limiter then
//! holds at most the keys that sent within about the last `(burst + 1) / per_second`
//! seconds, plus [`CLEANUP_EVERY`], some 100 bytes each. Write keys and token names come from the configuration (a batch with
//! an unknown write key or a request with an unknown token is refused before its limit is
//! checked); client addresses are keyed by IPv4 address or IPv6 /64 network, since one
//! IPv6 host usually has a whole /64 to pick addresses from.
//!
//! The client address is the socket's peer, unless the peer is one of `trusted_proxies`:
//! then `X-Forwarded-For` is read from the right, skipping trusted proxies, and the first
//! address that is not one is the client.

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::http::HeaderMap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tracing::info;

pub use governor::clock::FakeRelativeClock;

use crate::error::ApiError;

/// How many checks a limiter makes between two clean-ups of keys it no longer needs.
pub const CLEANUP_EVERY: u64 = 1024;

/// A steady rate with a burst; `per_second = 0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rate {
    /// Requests per second, on average. 0: no limit.
    pub per_second: u32,
    /// Requests allowed at once after a quiet period; 0: the same as `per_second`.
    pub burst: u32,
}

impl Default for Rate {
    /// Off.
    fn default() -> Self {
        Self::OFF
    }
}

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate {
        per_second: 0,
        burst: 0,
    };

    /// `per_second` on average, `burst` at once.
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }

    /// The burst in effect: `burst`, or `per_second` when that is 0.
    pub fn effective_burst(&self) -> u32 {
        if self.burst == 0 {
            self.per_second
        } else {
            self.burst
        }
    }

    fn quota(&self) -> Option<Quota> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.effective_burst())?;
        Some(Quota::per_second(per_second).allow_burst(burst))
    }
}

/// The `[rate_limits]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Batches per write key. Default 5,000 per second (bursts of as many): about half of
    /// what one collector applies, so one site cannot take all of it.
    pub write_key: Rate,
    /// Batches per client address (IPv4 address, IPv6 /64). Default off: without
    /// `trusted_proxies`, a collector behind a load balancer sees one address for everyone.
    /// A browser sends a batch every few seconds; a limit of 20 per second, bursts of 100,
    /// leaves room for many people behind one NAT.
    pub client_ip: Rate,
    /// API requests per token. Default 100 per second (bursts of as many).
    pub token: Rate,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            // Bursts of 0, "as many as per second", so that setting only `per_second` does
            // not keep a default burst made for another rate.
            write_key: Rate::new(5_000, 0),
            client_ip: Rate::OFF,
            token: Rate::new(100, 0),
        }
    }
}

/// Which limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// `rate_limits.write_key`.
    WriteKey,
    /// `rate_limits.client_ip`.
    ClientIp,
    /// `rate_limits.token`.
    Token,
}

impl LimitKind {
    /// The setting's name under `rate_limits`, as error bodies name it.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::WriteKey => "write_key",
            LimitKind::ClientIp => "client_ip",
            LimitKind::Token => "token",
        }
    }

    /// What is counted, for messages.
    pub fn what(self) -> &'static str {
        match self {
            LimitKind::WriteKey => "this write key",
            LimitKind::ClientIp => "this client address",
            LimitKind::Token => "this API token",
        }
    }
}

/// The time the limiters run on: monotonic, or moved by hand in tests.
#[derive(Debug, Clone)]
pub struct LimitClock(ClockKind);

#[derive(Debug, Clone)]
enum ClockKind {
    Monotonic(Instant),
    Manual(FakeRelativeClock),
}

impl LimitClock {
    /// The process's monotonic clock.
    pub fn monotonic() -> Self {
        Self(ClockKind::Monotonic(Instant::now()))
    }

    /// A clock that stands still until `clock.advance(..)` moves it (clones share it).
    pub fn manual(clock: FakeRelativeClock) -> Self {
        Self(ClockKind::Manual(clock))
    }
}

impl Clock for LimitClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match &self.0 {
            ClockKind::Monotonic(start) => Nanos::from(start.elapsed()),
            ClockKind::Manual(clock) => clock.now(),
        }
    }
}

type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, LimitClock, NoOpMiddleware<Nanos>>;

/// One keyed limit.
struct Limit<K: Hash + Eq + Clone> {
    kind: LimitKind,
    rate: Rate,
    limiter: Keyed<K>,
    clock: LimitClock,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> Limit<K> {
    fn new(kind: LimitKind, rate: Rate, clock: &LimitClock) -> Option<Self> {
        Some(Self {
            kind,
            rate,
            limiter: RateLimiter::dashmap_with_clock(rate.quota()?, clock.clone()),
            clock: clock.clone(),
            checks: AtomicU64::new(0),
        })
    }

    fn check(&self, key: &K) -> Result<(), ApiError> {
        let result = self.limiter.check_key(key);
        if (self.checks.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(CLEANUP_EVERY) {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        result.map_err(|not_until| {
            report_rate_limited(self.kind);
            let wait = not_until.wait_time_from(self.clock.now());
            ApiError::RateLimited {
                limit: self.kind,
                rate: self.rate,
                retry_after: wait,
            }
        })
    }
}

/// The collector's rate limits ([`RateLimitsConfig`]) and how it finds a client's address.
pub struct RateLimits {
    write_key: Option<Limit<String>>,
    client_ip: Option<Limit<IpAddr>>,
    token: Option<Limit<String>>,
    trusted_proxies: Vec<IpNet>,
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = |l: Option<Rate>| l.unwrap_or(Rate::OFF);
        f.debug_struct("RateLimits")
            .field("write_key", &rate(self.write_key.as_ref().map(|l| l.rate)))
            .field("client_ip", &rate(self.client_ip.as_ref().map(|l| l.rate)))
            .field("token", &rate(self.token.as_ref().map(|l| l.rate)))
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

impl RateLimits {
    /// The limits of `config`, on the monotonic clock.
    pub fn new(config: &RateLimitsConfig, trusted_proxies: &[IpNet]) -> Self {
        Self::with_clock(config, trusted_proxies, &LimitClock::monotonic())
    }

    /// The limits of `config`, on `clock`.
    pub fn with_clock(
        config: &RateLimitsConfig,
        trusted_proxies: &[IpNet],
        clock: &LimitClock,
    ) -> Self {
        Self {
            write_key: Limit::new(LimitKind::WriteKey, config.write_key, clock),
            client_ip: Limit::new(LimitKind::ClientIp, config.client_ip, clock),
            token: Limit::new(LimitKind::Token, config.token, clock),
            trusted_proxies: trusted_proxies.to_vec(),
        }
    }

    /// Counts a batch for a configured write key.
    ///
    /// # Errors
    /// [`ApiError::RateLimited`] when the key is over its rate.
    pub fn check_write_key(&self, key: &str) -> Result<(), ApiError> {
        match &self.write_key {
            Some(limit) => limit.check(&key.to_string()),
            None => Ok(()),
        }
    }

    /// Counts a batch from the client at `ip` (see [`RateLimits::client_ip`]).
    ///
    /// # Errors
    /// [`ApiError::RateLimited`] when the address (IPv6: its /64) is over its rate.
    pub fn check_client_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        match &self.client_ip {
            Some(limit) => limit.check(&client_key(ip)),
            None => Ok(()),
        }
    }

    /// Counts an API request by the token named `name`.
    ///
    /// # Errors
    /// [`ApiError::RateLimited`] when the token is over its rate.
    pub fn check_token(&self, name: &str) -> Result<(), ApiError> {
        match &self.token {
            Some(limit) => limit.check(&name.to_string()),
            None => Ok(()),
        }
    }

    /// How many client address keys the per-address limit holds now: bounded as the module
    /// docs say.
    pub fn client_ip_keys(&self) -> usize {
        self.client_ip.as_ref().map_or(0, |l| l.limiter.len())
    }

    /// The client's address: `peer` (the socket's), or, when `peer` is a trusted proxy, what
    /// `X-Forwarded-For` says: read from the right, the first address that is not a trusted
    /// proxy. When every address in it is trusted, the leftmost; an entry that is not an
    /// address stops the walk at the last good one.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(peer) {
            return peer;
        }
        let mut client = peer;
        // Several headers count as one list, in order.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.into_iter().rev() {
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !trusted(ip) {
                break;
            }
        }
        client
    }
}

/// Counts requests refused by a rate limit, by limit; the key (a write key, an address, a
/// token name) is left out: addresses are personal data.
fn report_rate_limited(limit: LimitKind) {
    info!(limit = limit.as_str(), "request over its rate limit");
}

/// An `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// The key of a client address: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (!0u128 << 64))),
        v4 => v4,
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, what a dual-stack socket reports for an
/// IPv4 client) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An address or a network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`),
/// as `trusted_proxies` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` is in the network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an address or a network such as 10.0.0.0/8");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr = canonical(addr.parse::<IpAddr>().map_err(|_| bad())?);
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Self { addr, prefix })
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    #[test]
    fn networks_parse_and_contain_their_addresses() {
        let net: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.255.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        let host: IpNet = "192.0.2.7".parse().unwrap();
        assert_eq!(host.to_string(), "192.0.2.7/32");
        assert!(host.contains("192.0.2.7".parse().unwrap()));
        assert!(!host.contains("192.0.2.8".parse().unwrap()));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::5".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0/8", "proxy.local", "::/129", ""] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_bit_network() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        assert_eq!(
            client_key("::ffff:198.51.100.4".parse().unwrap()),
            "198.51.100.4".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn idle_client_keys_are_dropped_every_cleanup() {
        let clock = FakeRelativeClock::default();
        let config = RateLimitsConfig {
            client_ip: Rate::new(10, 10),
            ..RateLimitsConfig::default()
        };
        let limits = RateLimits::with_clock(&config, &[], &LimitClock::manual(clock.clone()));
        let ip = |n: u64| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n as u32));
        for n in 0..CLEANUP_EVERY {
            limits.check_client_ip(ip(n)).unwrap();
        }
        // All sent within the last second: none is idle yet.
        assert_eq!(limits.client_ip_keys(), CLEANUP_EVERY as usize);
        // A full bucket (10 at 10 per second) takes one second to refill.
        clock.advance(Duration::from_secs(1));
        for n in CLEANUP_EVERY..2 * CLEANUP_EVERY - 1 {
            limits.check_client_ip(ip(n)).unwrap();
        }
        assert_eq!(limits.client_ip_keys(), 2 * CLEANUP_EVERY as usize - 1);
        // The next check cleans up: only the keys of the last second stay.
        limits.check_client_ip(ip(2 * CLEANUP_EVERY - 1)).unwrap();
        assert_eq!(limits.client_ip_keys(), CLEANUP_EVERY as usize);
    }
}
