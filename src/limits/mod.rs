//! Per-key limits (SC-6): requests and tokens per minute over a sliding window, turns and
//! sockets at once, and spend per UTC day and month. The counters live in the `StateStore`, so
//! with a shared backend every relay instance enforces one limit together.
//!
//! Checked when a turn is admitted (before an account is chosen) and when a socket is upgraded;
//! tokens and cost are charged when a turn ends, estimates included (US-3). A refusal is 429
//! `rate_limit_exceeded` with the seconds until the limit allows the request again.

use std::sync::Arc;
use std::time::Duration;

use crate::config::KeyConfig;
use crate::error::{RelayError, Side};
use crate::state::{Slot, StateStore};
use crate::telemetry::metric;

pub mod keys_cli;
pub mod periods;

/// The sliding window of `rpm` and `tpm`.
const MINUTE: Duration = Duration::from_secs(60);

/// What a turn holds while it runs: its place among the key's concurrent turns.
#[derive(Debug)]
pub struct TurnHold {
    _slot: Option<Slot>,
}

/// The limits of every key, over one state store.
pub struct Limits {
    state: Arc<dyn StateStore>,
}

impl Limits {
    pub fn new(state: Arc<dyn StateStore>) -> Limits {
        Limits { state }
    }

    /// Admits a turn of `key`: its request rate (not for a warm-up, CT-5), its token rate, its
    /// budgets, and a place among its concurrent turns, in that order.
    pub async fn admit_turn(&self, key: &KeyConfig, warm_up: bool) -> Result<TurnHold, RelayError> {
        let l = &key.limits;
        if let (Some(rpm), false) = (l.rpm, warm_up) {
            let w = self
                .state
                .window(&name("rpm", &key.id), MINUTE, 1, Some(rpm))
                .await
                .map_err(unavailable)?;
            if !w.allowed {
                return Err(over(
                    key,
                    "rpm",
                    format!("{rpm} requests per minute"),
                    w.retry_after,
                ));
            }
        }
        if let (Some(tpm), false) = (l.tpm, warm_up) {
            let w = self
                .state
                .window(&name("tpm", &key.id), MINUTE, 0, Some(tpm))
                .await
                .map_err(unavailable)?;
            if !w.allowed {
                return Err(over(
                    key,
                    "tpm",
                    format!("{tpm} tokens per minute"),
                    w.retry_after,
                ));
            }
        }
        self.check_budgets(key).await?;
        let slot = match l.concurrent_turns {
            Some(n) => Some(self.take(key, "turns", n).await?),
            None => None,
        };
        Ok(TurnHold { _slot: slot })
    }

    /// A place among `key`'s open WebSocket connections, held until dropped.
    pub async fn admit_socket(&self, key: &KeyConfig) -> Result<Option<Slot>, RelayError> {
        match key.limits.concurrent_sockets {
            Some(n) => self.take(key, "sockets", n).await.map(Some),
            None => Ok(None),
        }
    }

    async fn take(&self, key: &KeyConfig, what: &str, limit: usize) -> Result<Slot, RelayError> {
        let scope = format!("key:{}:{what}", key.id);
        // Slots of a key are released when a turn or socket ends; the lease is for a crashed
        // instance of a shared backend.
        let ttl = self.state.lease_ttl();
        match self.state.try_acquire(&scope, limit, ttl).await {
            Ok(Some(id)) => Ok(Slot::new(self.state.clone(), scope, id, ttl)),
            Ok(None) => Err(over(
                key,
                &format!("concurrent_{what}"),
                format!("{limit} {what} at once"),
                Duration::from_secs(1),
            )),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn check_budgets(&self, key: &KeyConfig) -> Result<(), RelayError> {
        let now = periods::now_utc();
        for (limit, period) in [
            (key.limits.daily_budget_usd, periods::Period::Day),
            (key.limits.monthly_budget_usd, periods::Period::Month),
        ] {
            let Some(usd) = limit else { continue };
            let spent = self
                .state
                .counter_add(&periods::spend_name(&key.id, period, now), 0, period.keep())
                .await
                .map_err(unavailable)?;
            if spent as f64 / 1e6 >= usd {
                let what = format!("a {} budget of {usd} USD", period.as_str());
                return Err(over(key, period.limit_name(), what, period.until_next(now)));
            }
        }
        Ok(())
    }

    /// Charges a finished turn: its tokens to the key's minute window, its cost (when priced)
    /// to the day and month. Never waits: a networked store is written in the background.
    pub fn charge(&self, key_id: &str, tokens: u64, cost_usd: Option<f64>) {
        let (state, key) = (self.state.clone(), key_id.to_string());
        let micro = cost_usd.map(|c| (c * 1e6).round().max(0.0) as u64);
        // The memory backend charges at once, before the client can send its next request.
        crate::state::write_soon(async move {
            if tokens > 0 {
                if let Err(e) = state.window(&name("tpm", &key), MINUTE, tokens, None).await {
                    tracing::warn!(error = %e, key = %key, "tokens not charged");
                }
            }
            if let Some(micro) = micro.filter(|m| *m > 0) {
                let now = periods::now_utc();
                for p in [periods::Period::Day, periods::Period::Month] {
                    let n = periods::spend_name(&key, p, now);
                    if let Err(e) = state.counter_add(&n, micro, p.keep()).await {
                        tracing::warn!(error = %e, key = %key, "spend not charged");
                    }
                }
            }
        });
    }

    /// Seeds the day and month spend counters from the recorded cost (at start, before any
    /// turn is charged), so a restart does not forget what was spent.
    pub async fn seed_spend(&self, spent: &[(String, f64, f64)]) {
        let now = periods::now_utc();
        for (key, day, month) in spent {
            for (p, usd) in [(periods::Period::Day, day), (periods::Period::Month, month)] {
                let micro = (usd * 1e6).round().max(0.0) as u64;
                if micro == 0 {
                    continue;
                }
                let n = periods::spend_name(key, p, now);
                // A shared counter that exists already holds this spend (charged when it was
                // made, or seeded by an instance that started earlier).
                if let Err(e) = self.state.counter_seed(&n, micro, p.keep()).await {
                    tracing::warn!(error = %e, key = %key, "spend not seeded");
                }
            }
        }
    }
}

fn name(what: &str, key_id: &str) -> String {
    format!("{what}:{key_id}")
}

/// 429 `rate_limit_exceeded` with `Retry-After` in whole seconds (at least 1).
fn over(key: &KeyConfig, limit: &str, what: String, retry_after: Duration) -> RelayError {
    metrics::counter!(metric::LIMIT_REJECTIONS, "key" => key.id.clone(), "limit" => limit.to_string())
        .increment(1);
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    RelayError::new(Side::Client, 429, "rate_limit_error", "rate_limit_exceeded")
        .message(format!(
            "Key '{}' is over its limit of {what}; try again in {} s.",
            key.id,
            secs.max(1)
        ))
        .retry_after(secs.max(1).to_string())
}

fn unavailable(e: crate::state::StateError) -> RelayError {
    RelayError::new(Side::Internal, 500, "server_error", "state_unavailable").message(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyLimits;
    use crate::state::MemoryStore;

    fn key(limits: KeyLimits) -> KeyConfig {
        let mut k = KeyConfig::new("k", "sy-k");
        k.limits = limits;
        k
    }

    #[tokio::test]
    async fn sc6_budgets_by_day_and_month_and_their_retry_after() {
        let limits = Limits::new(Arc::new(MemoryStore::default()));
        let monthly = key(KeyLimits {
            monthly_budget_usd: Some(0.5),
            ..KeyLimits::default()
        });
        assert!(limits.admit_turn(&monthly, false).await.is_ok());
        limits.charge("k", 10, Some(0.3));
        assert!(
            limits.admit_turn(&monthly, false).await.is_ok(),
            "0.3 of 0.5"
        );
        limits.charge("k", 10, Some(0.2));
        let e = limits.admit_turn(&monthly, true).await.expect_err("spent");
        let now = periods::now_utc();
        let left = periods::Period::Month.until_next(now).as_secs();
        let said: u64 = e.retry_after.as_deref().unwrap().parse().unwrap();
        assert!(said <= left + 1 && said + 5 >= left, "{said} vs {left}");
        // The same spend under a daily budget: also over.
        let daily = key(KeyLimits {
            daily_budget_usd: Some(0.5),
            ..KeyLimits::default()
        });
        assert_eq!(
            limits.admit_turn(&daily, false).await.unwrap_err().status,
            429
        );
        // Seeded spend counts like charged spend (a restart).
        let fresh = Limits::new(Arc::new(MemoryStore::default()));
        fresh.seed_spend(&[("k".into(), 0.0, 0.6)]).await;
        assert!(fresh.admit_turn(&monthly, false).await.is_err());
        assert!(
            fresh.admit_turn(&daily, false).await.is_ok(),
            "nothing spent today"
        );
    }

    #[tokio::test]
    async fn sc6_concurrent_turns_are_held_until_the_hold_drops() {
        let limits = Limits::new(Arc::new(MemoryStore::default()));
        let k = key(KeyLimits {
            concurrent_turns: Some(1),
            ..KeyLimits::default()
        });
        let hold = limits.admit_turn(&k, false).await.expect("first");
        let e = limits.admit_turn(&k, false).await.expect_err("second");
        assert_eq!((e.status, e.retry_after.as_deref()), (429, Some("1")));
        drop(hold);
        assert!(limits.admit_turn(&k, false).await.is_ok());
    }
}
