//! The `memory` backend: state of this process only, behind the same interface as a shared
//! one. A slot lives until it is released: its ttl guards against a crashed instance holding
//! shared slots forever, and here the only holder that could crash is this process.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{SlotId, StateError, StateStore};

#[derive(Default)]
struct Scope {
    held: HashSet<SlotId>,
    freed: Arc<Notify>,
}

/// In-process state.
#[derive(Default)]
pub struct MemoryStore {
    scopes: Mutex<HashMap<String, Scope>>,
    next: Mutex<SlotId>,
}

impl MemoryStore {
    fn next_id(&self) -> SlotId {
        let mut n = self.next.lock();
        *n += 1;
        *n
    }
}

impl StateStore for MemoryStore {
    fn try_acquire<'a>(
        &'a self,
        scope: &'a str,
        limit: usize,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<SlotId>, StateError>> {
        let id = self.next_id();
        let mut scopes = self.scopes.lock();
        let s = scopes.entry(scope.to_string()).or_default();
        let got = (s.held.len() < limit).then(|| {
            s.held.insert(id);
            id
        });
        futures::future::ready(Ok(got)).boxed()
    }

    fn release(&self, scope: &str, slot: SlotId) {
        let mut scopes = self.scopes.lock();
        if let Some(s) = scopes.get_mut(scope) {
            if s.held.remove(&slot) {
                s.freed.notify_waiters();
            }
        }
    }

    fn held<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<usize, StateError>> {
        let n = self.scopes.lock().get(scope).map_or(0, |s| s.held.len());
        futures::future::ready(Ok(n)).boxed()
    }

    fn released<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, ()> {
        let freed = self
            .scopes
            .lock()
            .entry(scope.to_string())
            .or_default()
            .freed
            .clone();
        // `notified` registers on first poll: enable it now, before the caller looks.
        let mut notified = Box::pin(freed.notified_owned());
        notified.as_mut().enable();
        notified.boxed()
    }
}
