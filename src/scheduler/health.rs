//! What the scheduler knows about each account's upstream (SC-5, UP-8): the circuit breaker,
//! a rate-limit cooldown, and running averages of its error rate and time to first token that
//! penalise it in the choice (SC-2). Turns in flight are counted here too, for the load part of
//! that choice.
//!
//! Only upstream failures count: the session and the pool report them, and never report a
//! client cancel, a preemption or a refusal caused by the request itself.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use super::Registry;
use crate::error::RelayError;
use crate::state::StateStore;
use crate::telemetry::metric;

/// Weight of the newest sample in the running averages.
const ALPHA: f64 = 0.2;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Breaker {
    Closed,
    /// Out of the choice until then.
    Open {
        until: Instant,
    },
    /// The cooldown is over: up to `breaker_probes` turns find out whether it is back.
    HalfOpen {
        probes: u32,
    },
}

#[derive(Debug)]
struct Account {
    breaker: Breaker,
    /// Upstream failures since the last success.
    consecutive: u32,
    /// A 429 from the upstream keeps the account out until then.
    cooldown_until: Option<Instant>,
    /// Running average of failures (1) and successes (0).
    error_rate: f64,
    /// Running average of time to first event, ms.
    ttft_ms: Option<f64>,
    in_flight: usize,
}

impl Default for Account {
    fn default() -> Self {
        Account {
            breaker: Breaker::Closed,
            consecutive: 0,
            cooldown_until: None,
            error_rate: 0.0,
            ttft_ms: None,
            in_flight: 0,
        }
    }
}

/// `scheduler.breaker_*` (reloadable).
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub failures: u32,
    pub cooldown: Duration,
    pub probes: u32,
}

impl BreakerSettings {
    pub fn of(cfg: &crate::config::SchedulerConfig) -> BreakerSettings {
        BreakerSettings {
            failures: cfg.breaker_failures,
            cooldown: cfg.breaker_cooldown,
            probes: cfg.breaker_probes,
        }
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failures: 5,
            cooldown: Duration::from_secs(30),
            probes: 1,
        }
    }
}

/// What the choice reads about one account.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub in_flight: usize,
    pub error_rate: f64,
    pub ttft_ms: Option<f64>,
}

/// Every account's health.
#[derive(Default)]
pub struct Health {
    settings: Mutex<BreakerSettings>,
    accounts: Mutex<HashMap<String, Account>>,
    /// Where an automatic disable goes (UP-8): the operators' overrides, and their store.
    overrides: Option<(std::sync::Arc<Registry>, std::sync::Arc<dyn StateStore>)>,
    /// The shared open periods already applied here or published from here (SC-7).
    pub(super) seen: Mutex<HashMap<String, String>>,
}

/// A turn's hold on its account: counted in flight until dropped; a half-open probe until it
/// reports.
pub struct Ticket {
    health: std::sync::Arc<Health>,
    account: String,
    probe: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ticket({}{})",
            self.account,
            if self.probe { ", probe" } else { "" }
        )
    }
}

impl Ticket {
    /// The health this ticket reports to.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The turn got its first event after `ttft_ms`: the account works.
    pub fn success(&mut self, ttft_ms: Option<f64>) {
        self.health.success(&self.account, ttft_ms);
        self.probe = false;
    }

    /// The turn's upstream failed.
    pub fn failure(&mut self, why: &str) {
        self.health.failure(&self.account, why);
        self.probe = false;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut all = self.health.accounts.lock();
        let Some(a) = all.get_mut(&self.account) else {
            return;
        };
        a.in_flight = a.in_flight.saturating_sub(1);
        if let (true, Breaker::HalfOpen { probes }) = (self.probe, &mut a.breaker) {
            // A probe that ended without a verdict (cancelled): another may go.
            *probes = probes.saturating_sub(1);
        }
    }
}

impl Health {
    /// Health whose automatic disables are written as overrides to `registry` and `store`.
    pub fn new(
        registry: std::sync::Arc<Registry>,
        store: std::sync::Arc<dyn StateStore>,
    ) -> Health {
        Health {
            overrides: Some((registry, store)),
            ..Health::default()
        }
    }

    /// An upstream refused a dial or a request of `account` (or it never answered): 401/403
    /// disable the account, 429 cools it down, a 5xx or an I/O failure is a failure; any other
    /// 4xx is the request's own fault and does not count.
    pub fn refused(&self, account: &str, e: &RelayError) {
        match Refusal::of(e) {
            Refusal::Auth => self.auth_refused(account, e),
            Refusal::RateLimited(wait) => self.rate_limited(account, wait),
            Refusal::Failure => self.failure(account, &e.message),
            Refusal::NotTheAccount => {}
        }
    }

    /// UP-8: the upstream refused the account's credential. The account is disabled until an
    /// operator enables it again, stored like an operator's own disable (TM-3).
    fn auth_refused(&self, account: &str, e: &RelayError) {
        tracing::error!(account, status = ?e.handshake_status, "upstream refused the account's credential: account disabled");
        metrics::counter!(metric::ACCOUNTS_AUTO_DISABLED, "account" => account.to_string())
            .increment(1);
        let Some((registry, store)) = self.overrides.clone() else {
            return;
        };
        let mut o = registry.get(account).unwrap_or_default();
        if o.enabled == Some(false) {
            return;
        }
        o.enabled = Some(false);
        registry.set(account, o.clone());
        let id = account.to_string();
        tokio::spawn(async move {
            if let Err(e) = store.set_override(&id, o).await {
                tracing::warn!(account = %id, error = %e, "automatic disable not stored");
            }
        });
    }

    pub fn configure(&self, s: BreakerSettings) {
        *self.settings.lock() = s;
    }

    /// Whether `account` takes a turn now (breaker and cooldown; the operators' overrides are
    /// the registry's), and its load.
    pub fn available(&self, account: &str) -> Option<Load> {
        let probes = self.settings.lock().probes;
        let now = Instant::now();
        let mut all = self.accounts.lock();
        let Some(a) = all.get_mut(account) else {
            return Some(Load {
                in_flight: 0,
                error_rate: 0.0,
                ttft_ms: None,
            });
        };
        open_for(a, now, probes).then_some(Load {
            in_flight: a.in_flight,
            error_rate: a.error_rate,
            ttft_ms: a.ttft_ms,
        })
    }

    /// Counts a turn on `account` in flight, if it is still available (a half-open one lets
    /// `breaker_probes` through).
    pub fn start(self: &std::sync::Arc<Self>, account: &str) -> Option<Ticket> {
        let probes = self.settings.lock().probes;
        let now = Instant::now();
        let mut all = self.accounts.lock();
        let a = all.entry(account.to_string()).or_default();
        if !open_for(a, now, probes) {
            return None;
        }
        a.in_flight += 1;
        let probe = match &mut a.breaker {
            Breaker::HalfOpen { probes } => {
                *probes += 1;
                true
            }
            _ => false,
        };
        Some(Ticket {
            health: self.clone(),
            account: account.to_string(),
            probe,
        })
    }

    pub fn success(&self, account: &str, ttft_ms: Option<f64>) {
        let mut all = self.accounts.lock();
        let a = all.entry(account.to_string()).or_default();
        a.consecutive = 0;
        a.error_rate *= 1.0 - ALPHA;
        if let Some(t) = ttft_ms {
            a.ttft_ms = Some(a.ttft_ms.map_or(t, |old| old + ALPHA * (t - old)));
        }
        if a.breaker != Breaker::Closed {
            tracing::info!(account, "breaker closed: the account answered again");
            a.breaker = Breaker::Closed;
            set_gauge(account, 0.0);
        }
    }

    /// One upstream failure of `account`; the `breaker_failures`-th in a row, or any during a
    /// probe, opens its breaker for `breaker_cooldown`.
    pub fn failure(&self, account: &str, why: &str) {
        let s = *self.settings.lock();
        let mut all = self.accounts.lock();
        let a = all.entry(account.to_string()).or_default();
        a.consecutive += 1;
        a.error_rate += ALPHA * (1.0 - a.error_rate);
        metrics::counter!(metric::ACCOUNT_FAILURES, "account" => account.to_string()).increment(1);
        let opens = match a.breaker {
            Breaker::HalfOpen { .. } => true,
            Breaker::Closed => a.consecutive >= s.failures,
            Breaker::Open { .. } => false,
        };
        if opens {
            tracing::warn!(account, failures = a.consecutive, last = why, cooldown = ?s.cooldown, "breaker opened");
            a.breaker = Breaker::Open {
                until: Instant::now() + s.cooldown,
            };
            metrics::counter!(metric::BREAKER_OPENED, "account" => account.to_string())
                .increment(1);
            set_gauge(account, 1.0);
            drop(all);
            self.publish(account, super::shared::Kind::Breaker, s.cooldown);
        }
    }

    /// Tells other instances that `account` is out for `wait` (SC-7), on a shared store.
    fn publish(&self, account: &str, kind: super::shared::Kind, wait: Duration) {
        if let Some((_, store)) = self.overrides.as_ref().filter(|(_, s)| s.shared()) {
            super::shared::publish(self, store.clone(), account, kind, wait);
        }
    }

    /// Another instance opened `account`'s breaker for `left` more: it is out here too, then
    /// half-open as if opened here.
    pub(super) fn opened_elsewhere(&self, account: &str, left: Duration) {
        let mut all = self.accounts.lock();
        let a = all.entry(account.to_string()).or_default();
        let until = Instant::now() + left;
        if matches!(a.breaker, Breaker::Open { until: mine } if mine >= until) {
            return;
        }
        tracing::warn!(account, cooldown = ?left, "breaker opened by another instance");
        a.breaker = Breaker::Open { until };
        set_gauge(account, 1.0);
    }

    /// Another instance was told 429 for `account`: it cools down here too.
    pub(super) fn cooled_elsewhere(&self, account: &str, left: Duration) {
        let mut all = self.accounts.lock();
        let a = all.entry(account.to_string()).or_default();
        let until = Instant::now() + left;
        if a.cooldown_until.is_none_or(|mine| mine < until) {
            a.cooldown_until = Some(until);
        }
    }

    /// The upstream said 429: no turns for `retry_after` (else `breaker_cooldown`).
    pub fn rate_limited(&self, account: &str, retry_after: Option<Duration>) {
        let wait = retry_after.unwrap_or_else(|| self.settings.lock().cooldown);
        tracing::warn!(account, cooldown = ?wait, "upstream rate limit: account cooling down");
        metrics::counter!(metric::ACCOUNT_COOLDOWNS, "account" => account.to_string()).increment(1);
        let mut all = self.accounts.lock();
        let a = all.entry(account.to_string()).or_default();
        a.cooldown_until = Some(Instant::now() + wait);
        drop(all);
        self.publish(account, super::shared::Kind::Cooldown, wait);
    }

    /// For the admin API.
    pub fn view(&self, account: &str) -> HealthView {
        let probes = self.settings.lock().probes;
        let now = Instant::now();
        let mut all = self.accounts.lock();
        let a = all.entry(account.to_string()).or_default();
        open_for(a, now, probes);
        let ms = |until: Option<Instant>| {
            until
                .filter(|u| *u > now)
                .map(|u| u.duration_since(now).as_millis() as u64)
        };
        let (breaker, open_until) = match a.breaker {
            Breaker::Closed => ("closed", None),
            Breaker::Open { until } => ("open", Some(until)),
            Breaker::HalfOpen { .. } => ("half_open", None),
        };
        HealthView {
            breaker,
            consecutive_failures: a.consecutive,
            breaker_open_ms: ms(open_until),
            cooldown_ms: ms(a.cooldown_until),
            error_rate: (a.error_rate * 1000.0).round() / 1000.0,
            ttft_ms: a.ttft_ms.map(|t| t.round()),
            turns_in_flight: a.in_flight,
        }
    }
}

/// Whether `a` takes a turn at `now`; an open breaker whose cooldown is over turns half-open.
fn open_for(a: &mut Account, now: Instant, probes: u32) -> bool {
    if a.cooldown_until.is_some_and(|u| u > now) {
        return false;
    }
    match a.breaker {
        Breaker::Closed => true,
        Breaker::Open { until } if until > now => false,
        Breaker::Open { .. } => {
            a.breaker = Breaker::HalfOpen { probes: 0 };
            true
        }
        Breaker::HalfOpen { probes: out } => out < probes,
    }
}

fn set_gauge(account: &str, v: f64) {
    metrics::gauge!(metric::BREAKER_STATE, "account" => account.to_string()).set(v);
}

/// An account's health as the admin API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthView {
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    pub consecutive_failures: u32,
    /// Time left until an open breaker lets a probe through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker_open_ms: Option<u64>,
    /// Time left in a rate-limit cooldown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_ms: Option<u64>,
    pub error_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<f64>,
    pub turns_in_flight: usize,
}

/// What a failed dial or refused request says about its account (UP-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401/403: the credential.
    Auth,
    /// 429, with its `Retry-After`.
    RateLimited(Option<Duration>),
    /// A 5xx, or no answer at all.
    Failure,
    /// Another 4xx (the request's own fault), or the relay's own failure.
    NotTheAccount,
}

impl Refusal {
    pub fn of(e: &RelayError) -> Refusal {
        use crate::error::Side;
        let status = match e.side {
            Side::UpstreamProtocol => e.handshake_status.or(Some(e.status)),
            Side::UpstreamIo => e.handshake_status,
            // The relay's own failure (a bad header value, say) says nothing of the upstream.
            Side::Client | Side::Internal => return Refusal::NotTheAccount,
        };
        match status {
            Some(401 | 403) => Refusal::Auth,
            Some(429) => Refusal::RateLimited(e.retry_after.as_deref().and_then(parse_retry_after)),
            Some(s) if s < 500 => Refusal::NotTheAccount,
            _ => Refusal::Failure,
        }
    }
}

/// A `Retry-After` value: delay seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn health(failures: u32, probes: u32) -> Arc<Health> {
        let h = Arc::new(Health::default());
        h.configure(BreakerSettings {
            failures,
            cooldown: Duration::from_secs(30),
            probes,
        });
        h
    }

    #[tokio::test(start_paused = true)]
    async fn sc5_consecutive_failures_open_then_a_probe_closes() {
        let h = health(3, 1);
        h.failure("a", "x");
        h.failure("a", "x");
        h.success("a", Some(100.0));
        h.failure("a", "x");
        h.failure("a", "x");
        assert!(h.available("a").is_some(), "a success reset the count");
        h.failure("a", "x");
        assert!(h.available("a").is_none() && h.start("a").is_none());
        assert_eq!(h.view("a").breaker, "open");
        tokio::time::advance(Duration::from_secs(31)).await;
        let mut probe = h.start("a").expect("half-open lets one probe through");
        assert_eq!(h.view("a").breaker, "half_open");
        assert!(h.start("a").is_none(), "only breaker_probes at once");
        probe.success(Some(50.0));
        drop(probe);
        assert_eq!(h.view("a").breaker, "closed");
        assert!(h.start("a").is_some() && h.start("a").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn sc5_a_failed_probe_reopens_and_a_cancelled_one_frees_its_place() {
        let h = health(1, 1);
        h.failure("a", "x");
        tokio::time::advance(Duration::from_secs(31)).await;
        let cancelled = h.start("a").expect("probe");
        drop(cancelled);
        let mut probe = h.start("a").expect("the place is free again");
        probe.failure("still down");
        drop(probe);
        assert_eq!(h.view("a").breaker, "open");
        assert!(h.view("a").breaker_open_ms.unwrap() > 29_000);
    }

    #[tokio::test(start_paused = true)]
    async fn up8_rate_limit_cooldown_follows_retry_after_else_the_breaker_cooldown() {
        let h = health(5, 1);
        h.rate_limited("a", Some(Duration::from_secs(3)));
        assert!(h.available("a").is_none());
        assert_eq!(h.view("a").breaker, "closed", "a 429 is not a failure");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(h.available("a").is_some());
        h.rate_limited("a", None);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(h.available("a").is_none());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.available("a").is_some());
    }

    #[test]
    fn sc2_averages_and_in_flight_counts() {
        let h = health(5, 1);
        let t1 = h.start("a").unwrap();
        let _t2 = h.start("a").unwrap();
        assert_eq!(h.available("a").unwrap().in_flight, 2);
        drop(t1);
        assert_eq!(h.available("a").unwrap().in_flight, 1);
        h.success("a", Some(100.0));
        h.success("a", Some(200.0));
        let load = h.available("a").unwrap();
        assert_eq!(load.ttft_ms, Some(120.0));
        h.failure("a", "x");
        let rate = h.available("a").unwrap().error_rate;
        assert!((rate - ALPHA).abs() < 1e-9, "{rate}");
    }

    #[test]
    fn retry_after_as_seconds_or_a_date() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
