//! TM-4, the WebSocket anti-flap: an account whose WebSocket keeps failing (`upstream.
//! ws_failure_burst` failures within `upstream.ws_fallback_cooldown`) sends its new turns over
//! `http` for `upstream.ws_fallback_cooldown`, instead of dialing into the same failure.
//!
//! What counts: a dial that fails (network, timeout) or a handshake refused with a 5xx, and a
//! connection the upstream closes with 1012 or 1013. The connection age limit
//! (`websocket_connection_limit_reached`, then close 1000) does not count, and neither do a
//! 4xx handshake (the credential or the request, not the transport) or the relay's own closes.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::conn::UpEnd;
use crate::error::RelayError;
use crate::telemetry::metric;

#[derive(Default)]
struct Account {
    failures: VecDeque<Instant>,
    until: Option<Instant>,
}

/// WebSocket failures per account and the cooldowns they caused.
pub struct Fallback {
    /// `upstream.ws_failure_burst` and `upstream.ws_fallback_cooldown` (reloadable).
    limits: Mutex<(usize, Duration)>,
    accounts: Mutex<HashMap<String, Account>>,
}

impl Fallback {
    pub fn new(burst: usize, window: Duration) -> Fallback {
        Fallback {
            limits: Mutex::new((burst.max(1), window)),
            accounts: Mutex::default(),
        }
    }

    /// Sets the burst and window from the config.
    pub fn configure(&self, burst: usize, window: Duration) {
        *self.limits.lock() = (burst.max(1), window);
    }

    /// Notes one WebSocket failure of `account`; the burst-th within the window starts the
    /// cooldown.
    pub fn failure(&self, account: &str) {
        let now = Instant::now();
        let (burst, window) = *self.limits.lock();
        let mut accounts = self.accounts.lock();
        let a = accounts.entry(account.to_string()).or_default();
        a.failures.retain(|t| now.duration_since(*t) < window);
        a.failures.push_back(now);
        metrics::counter!(metric::WS_FAILURES, "account" => account.to_string()).increment(1);
        if a.failures.len() >= burst {
            a.failures.clear();
            a.until = Some(now + window);
            metrics::counter!(metric::WS_FALLBACKS, "account" => account.to_string()).increment(1);
            tracing::warn!(
                account,
                cooldown = ?window,
                "WebSocket failing: new turns of this account go over http for the cooldown"
            );
        }
    }

    /// Whether `account`'s new turns go over `http` now.
    pub fn active(&self, account: &str) -> bool {
        let now = Instant::now();
        let accounts = self.accounts.lock();
        accounts
            .get(account)
            .and_then(|a| a.until)
            .is_some_and(|until| until > now)
    }
}

/// Whether a failed dial counts toward TM-4.
pub fn dial_counts(e: &RelayError) -> bool {
    e.handshake_status.is_none_or(|s| s >= 500)
}

/// Whether a connection's end counts toward TM-4.
pub fn end_counts(end: &UpEnd) -> bool {
    matches!(
        end,
        UpEnd::Closed {
            code: Some(1012 | 1013),
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tm4_a_burst_within_the_window_starts_a_cooldown_that_ends() {
        let f = Fallback::new(3, Duration::from_secs(30));
        f.failure("a");
        f.failure("a");
        assert!(!f.active("a"));
        tokio::time::advance(Duration::from_secs(31)).await;
        f.failure("a");
        assert!(!f.active("a"), "the first two fell out of the window");
        f.failure("a");
        f.failure("a");
        assert!(f.active("a") && !f.active("b"));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!f.active("a"), "the cooldown ended");
    }

    #[test]
    fn tm4_what_counts() {
        let closed = |code| UpEnd::Closed {
            code: Some(code),
            reason: String::new(),
        };
        assert!(end_counts(&closed(1012)) && end_counts(&closed(1013)));
        assert!(!end_counts(&closed(1000)) && !end_counts(&UpEnd::Abandoned));
        let mut e = RelayError::upstream_lost("dial");
        assert!(dial_counts(&e));
        e.handshake_status = Some(503);
        assert!(dial_counts(&e));
        e.handshake_status = Some(401);
        assert!(!dial_counts(&e));
    }
}
