//! What the pool shows: a view of each context (tests, the admin API), totals for leak checks
//! (the soak test), and the per-account context gauges.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;

use super::pool::{Context, Pool};

/// Metric names of the pool (the rest of the catalogue is `telemetry::metric`).
pub mod metric_names {
    /// Gauge of contexts per `account` and `state` (`idle`, `parked`, `in_turn`, `closed`).
    pub const UPSTREAM_CONTEXTS: &str = "switchyard_upstream_contexts";
    /// Contexts taken from a session that was between turns (UP-6), per `account`.
    pub const UPSTREAM_TAKEN: &str = "switchyard_upstream_contexts_taken_total";
    /// Leases that found no capacity within their deadline (SC-3), per `account`.
    pub const UPSTREAM_NO_CAPACITY: &str = "switchyard_upstream_no_capacity_total";
}

/// A context as tests and operators see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContextView {
    pub id: u64,
    pub account: String,
    pub generation: u64,
    pub open: bool,
    /// The session holding it (in a turn or parked between turns).
    pub leased_by: Option<u64>,
    pub in_turn: bool,
}

/// Totals over every account, for leak checks: once every session is gone, `held` and
/// `in_turn` are 0 and `tasks` equals `open`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PoolCounts {
    pub contexts: usize,
    /// Contexts with an open connection.
    pub open: usize,
    /// Contexts a session holds (in a turn or parked).
    pub held: usize,
    pub in_turn: usize,
    pub dialing: usize,
    /// Leases waiting for capacity.
    pub waiting: usize,
    /// Running connection tasks (closing connections included).
    pub tasks: usize,
}

impl Pool {
    /// Every context, for tests and the admin view.
    pub fn snapshot(&self) -> Vec<ContextView> {
        let mut out: Vec<ContextView> = self
            .all_contexts()
            .iter()
            .map(|c| {
                let st = c.st.lock();
                ContextView {
                    id: c.id,
                    account: c.account_id.clone(),
                    generation: st.generation,
                    open: st.live.is_some(),
                    leased_by: st.holder.map(|h| h.session),
                    in_turn: st.in_turn,
                }
            })
            .collect();
        out.sort_by_key(|v| v.id);
        out
    }

    /// Totals for leak checks and the soak test.
    pub fn counts(&self) -> PoolCounts {
        let mut n = PoolCounts {
            waiting: self.waiting.load(Ordering::Relaxed),
            tasks: self.tasks.get(),
            ..PoolCounts::default()
        };
        for c in self.all_contexts() {
            let st = c.st.lock();
            n.contexts += 1;
            n.open += usize::from(st.live.is_some());
            n.held += usize::from(st.holder.is_some());
            n.in_turn += usize::from(st.in_turn);
            n.dialing += usize::from(st.dialing);
        }
        n
    }

    /// `switchyard_upstream_contexts{account,state}`: idle, parked, in_turn, closed.
    pub(super) fn publish_gauges(&self) {
        let accounts: Vec<(String, Vec<Arc<Context>>)> = {
            let accounts = self.accounts.lock();
            accounts
                .iter()
                .map(|(id, a)| (id.clone(), a.list.clone()))
                .collect()
        };
        for (id, list) in accounts {
            let mut n = [0usize; 4];
            for c in &list {
                let st = c.st.lock();
                let i = match (st.live.is_some(), st.holder.is_some(), st.in_turn) {
                    (_, _, true) => 2,
                    (false, _, false) => 3,
                    (true, true, false) => 1,
                    (true, false, false) => 0,
                };
                n[i] += 1;
            }
            for (state, count) in ["idle", "parked", "in_turn", "closed"].iter().zip(n) {
                metrics::gauge!(metric_names::UPSTREAM_CONTEXTS, "account" => id.clone(), "state" => *state)
                    .set(count as f64);
            }
        }
    }
}
