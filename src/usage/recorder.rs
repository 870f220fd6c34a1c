//! The hand-off between sessions and the store. A session pushes its finished record into an
//! in-memory batch (a lock and a `Vec::push`, nothing else on the hot path); a background task
//! writes the batch in one transaction every `usage.flush_interval`, and shutdown flushes
//! what is left. A batch that fails to write goes back to the front of the next one.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::prices::Prices;
use super::store::Store;
use super::{Record, Tokens};
use crate::telemetry::metric;

/// Collects usage records and writes them to the embedded store.
pub struct Recorder {
    batch: Mutex<Vec<Record>>,
    store: Arc<Mutex<Store>>,
    prices: Prices,
    flushed: AtomicU64,
    recorded: AtomicU64,
    /// Serialises flushes so records reach the store in the order they were taken.
    flushing: tokio::sync::Mutex<()>,
    /// Unpriced model names given a series of their own so far (at most
    /// [`UNPRICED_SERIES`]).
    unpriced: Mutex<std::collections::HashSet<String>>,
}

/// Distinct model labels of `switchyard_usage_unpriced_total`: the model is the client's text,
/// and a series per name would let requests grow the relay's memory and the operators'
/// Prometheus without bound. Later names count under `other`.
const UNPRICED_SERIES: usize = 64;

impl Recorder {
    /// Opens (creating when missing) the store at `path` and the price table.
    pub fn open(path: &Path, prices: Prices) -> Result<Arc<Recorder>, String> {
        let store = Store::open(path).map_err(|e| e.to_string())?;
        Ok(Arc::new(Recorder {
            batch: Mutex::new(Vec::new()),
            store: Arc::new(Mutex::new(store)),
            prices,
            flushed: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            flushing: tokio::sync::Mutex::new(()),
            unpriced: Mutex::default(),
        }))
    }

    /// US-2's cost of `tokens` on `model` by the table in force; `None` (and a metric) when
    /// the table does not price the model.
    pub fn cost(&self, model: Option<&str>, tokens: &Tokens) -> Option<f64> {
        let model = model?;
        let cost = self.prices.get().cost(model, tokens);
        if cost.is_none() {
            let label = self.unpriced_label(model);
            metrics::counter!(metric::USAGE_UNPRICED, "model" => label).increment(1);
        }
        cost
    }

    fn unpriced_label(&self, model: &str) -> String {
        let mut seen = self.unpriced.lock();
        if seen.contains(model) {
            return model.to_string();
        }
        if seen.len() < UNPRICED_SERIES && model.len() <= 128 {
            seen.insert(model.to_string());
            return model.to_string();
        }
        "other".to_string()
    }

    /// Takes a finished record; it reaches the store with the next flush.
    pub fn record(&self, r: Record) {
        let t = &r.tokens;
        for (kind, n) in [
            ("input", t.input),
            ("cached_input", t.cached_input),
            ("output", t.output),
            ("reasoning", t.reasoning),
        ] {
            metrics::counter!(metric::USAGE_TOKENS, "kind" => kind).increment(n);
        }
        if let Some(c) = r.cost_usd {
            metrics::counter!(metric::USAGE_COST_MICRO_USD).increment((c * 1e6).round() as u64);
        }
        self.batch.lock().push(r);
        self.recorded.fetch_add(1, Ordering::Relaxed);
    }

    /// The store the records go to (the embedded store is shared with the admin overrides).
    pub fn store(&self) -> Arc<Mutex<Store>> {
        self.store.clone()
    }

    /// Records taken so far by this recorder.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Records written to the store so far by this recorder.
    pub fn flushed(&self) -> u64 {
        self.flushed.load(Ordering::Relaxed)
    }

    /// Records waiting for the next flush.
    pub fn pending(&self) -> usize {
        self.batch.lock().len()
    }

    /// Where the table in force came from.
    pub fn price_source(&self) -> String {
        self.prices.get().source.clone()
    }

    /// Reads `usage.prices` again (SIGHUP); the table in force stays on an error.
    pub fn reload_prices(&self) -> Result<(), String> {
        self.prices.reload()
    }

    /// Writes every pending record in one transaction; on an error they wait for the next.
    pub async fn flush(&self) -> Result<usize, String> {
        let _turn = self.flushing.lock().await;
        let batch = std::mem::take(&mut *self.batch.lock());
        if batch.is_empty() {
            return Ok(0);
        }
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            let r = store.lock().insert(&batch).map_err(|e| e.to_string());
            (r, batch)
        })
        .await;
        match written {
            Ok((Ok(_), batch)) => {
                let n = batch.len();
                self.flushed.fetch_add(n as u64, Ordering::Relaxed);
                metrics::counter!(metric::USAGE_FLUSHED).increment(n as u64);
                Ok(n)
            }
            Ok((Err(e), batch)) => {
                self.requeue(batch);
                Err(e)
            }
            Err(e) => Err(format!("usage flush task failed: {e}")),
        }
    }

    fn requeue(&self, mut batch: Vec<Record>) {
        let mut pending = self.batch.lock();
        batch.append(&mut pending);
        *pending = batch;
        metrics::gauge!(metric::USAGE_PENDING).set(pending.len() as f64);
    }

    /// Flushes every `every` until `stop`, then once more.
    pub fn spawn_flusher(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => break,
                }
                if let Err(e) = me.flush().await {
                    tracing::error!(error = %e, pending = me.pending(), "usage flush failed; retrying at the next interval");
                }
            }
            if let Err(e) = me.flush().await {
                tracing::error!(error = %e, pending = me.pending(), "final usage flush failed");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unpriced counter's `model` label takes the client's text: its distinct values stay
    /// bounded whatever names requests carry.
    #[test]
    fn us2_unpriced_model_labels_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let prices = crate::usage::prices::Prices::new(None).unwrap();
        let r = Recorder::open(&dir.path().join("u.db"), prices).unwrap();
        let tokens = Tokens::default();
        for i in 0..1000 {
            assert_eq!(r.cost(Some(&format!("made-up-{i}")), &tokens), None);
        }
        assert_eq!(r.unpriced.lock().len(), UNPRICED_SERIES);
        assert_eq!(
            r.unpriced_label("made-up-3"),
            "made-up-3",
            "an early name keeps its series"
        );
        assert_eq!(r.unpriced_label("made-up-999"), "other");
        assert_eq!(r.unpriced_label(&"m".repeat(500)), "other");
    }
}
