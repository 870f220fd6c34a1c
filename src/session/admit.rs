//! Admission of a turn (SC-3): a turn slot of its account from the state store, then an
//! upstream context from the pool. Either may have to wait up to `session.admission_timeout`;
//! the waiting happens in a background task so the session keeps reading the client (TP-3) and
//! a preemption or a disconnect cancels it (aborting the task gives back what it took).

use std::sync::Arc;
use tracing::Instrument;

use tokio::time::Instant;

use super::record::Ending;
use super::turn::TurnStatus;
use super::{Session, Step};
use crate::config::AccountConfig;
use crate::error::{RelayError, Retry, Side};
use crate::state::{self, Slot, StateStore};
use crate::upstream::Lease;

/// What the admission task hands back.
pub(super) struct Admitted {
    /// The turn slot, when the task had to wait for one.
    pub slot: Option<Slot>,
    /// The leased context; none when the session's held one is used.
    pub lease: Option<Lease>,
    /// An `http` turn's started request and the bytes it sent.
    pub http: Option<(crate::upstream::http::HttpTurn, usize)>,
}

impl Session {
    /// Admits the running turn on `account`: a slot now if one is free, else in the
    /// background; then the held context (`reuse`) or a leased one.
    pub(super) async fn admit(&mut self, account: AccountConfig, reuse: bool) -> Step {
        let scope = state::account_scope(&account.id);
        let ttl = self.p.state.lease_ttl();
        let now = self
            .p
            .state
            .try_acquire(&scope, account.concurrency, ttl)
            .await;
        match now {
            Ok(Some(id)) => {
                let slot = Slot::new(self.p.state.clone(), scope, id, ttl);
                if let Some(turn) = self.turn.as_mut() {
                    turn.slot = Some(slot);
                }
                if reuse {
                    return self.write_request().await;
                }
                self.lease(account);
                Step::Go
            }
            Ok(None) => {
                if reuse {
                    // Waiting for a slot: the held context stays ours meanwhile.
                    self.waiting_lease = self.upstream.take();
                }
                self.wait_for_slot(account, scope);
                Step::Go
            }
            Err(e) => self.fail_turn(
                RelayError::new(Side::Internal, 500, "server_error", "state_unavailable")
                    .message(e.to_string()),
            ),
        }
    }

    /// Leases a context of `account` in the background (a dial when none is open); the turn
    /// already holds its slot.
    pub(super) fn lease(&mut self, account: AccountConfig) {
        if self.turn.as_ref().is_some_and(|t| t.is_http()) {
            return self.start_http(account);
        }
        let (pool, identity) = (self.p.pool.clone(), self.identity_for_dial());
        let (session, depth) = (self.p.id, self.p.cfg.session.pump_channel);
        let deadline = Instant::now() + self.p.cfg.session.admission_timeout;
        let span = self.turn_span();
        self.dialing = Some(tokio::spawn(
            async move {
                let lease = pool
                    .lease(&account, session, &identity, depth, deadline)
                    .await?;
                Ok(Admitted {
                    slot: None,
                    lease: Some(lease),
                    http: None,
                })
            }
            .instrument(span),
        ));
    }

    pub(super) fn wait_for_slot(&mut self, account: AccountConfig, scope: String) {
        let (pool, identity) = (self.p.pool.clone(), self.identity_for_dial());
        let (session, depth) = (self.p.id, self.p.cfg.session.pump_channel);
        let store = self.p.state.clone();
        let deadline = Instant::now() + self.p.cfg.session.admission_timeout;
        // An HTTP turn takes no context: its request starts once the slot is there.
        let held = self.waiting_lease.is_some() || self.turn.as_ref().is_some_and(|t| t.is_http());
        let span = self.turn_span();
        self.dialing = Some(tokio::spawn(
            async move {
                let slot = wait_slot(&store, &scope, &account, deadline).await?;
                let lease = if held {
                    None
                } else {
                    Some(
                        pool.lease(&account, session, &identity, depth, deadline)
                            .await?,
                    )
                };
                Ok(Admitted {
                    slot: Some(slot),
                    lease,
                    http: None,
                })
            }
            .instrument(span),
        ));
    }

    pub(super) async fn on_dialed(
        &mut self,
        r: Result<Result<Admitted, RelayError>, tokio::task::JoinError>,
    ) -> Step {
        self.dialing = None;
        let held = self.waiting_lease.take();
        match r {
            Ok(Ok(a)) => {
                if let Some(turn) = self.turn.as_mut() {
                    if a.slot.is_some() {
                        turn.slot = a.slot;
                        turn.mark_admitted();
                    }
                }
                if let Some((http, sent)) = a.http {
                    return self.on_http_started(http, sent);
                }
                if let Some(account) = self.http_account() {
                    // Admitted after waiting for a slot: now the request starts.
                    self.start_http(account);
                    return Step::Go;
                }
                let lease = a.lease.or(held);
                if let Some(ts) = lease.as_ref().and_then(Lease::turn_state) {
                    self.upstream_turn_state = Some(ts);
                }
                self.upstream = lease;
                self.write_request().await
            }
            // CT-9: a failed dial or handshake at turn start is retried like a lost upstream,
            // on another account when there is one (SC-4).
            Ok(Err(e)) if e.retry == Retry::BeforeOutput => {
                self.upstream = held;
                self.note_refusal(&e);
                self.retry_or_fail(e)
            }
            // The upstream's own refusal of an HTTP request, or one of the relay's (no
            // capacity): to the client as it is, unless another account can take the turn.
            Ok(Err(e)) => {
                if self.note_refusal(&e) {
                    if let Some(step) = self.fail_over_refusal(&e) {
                        return step;
                    }
                }
                self.upstream = held;
                self.out.push_json(&e.ws_frame());
                let status = if e.side == Side::UpstreamProtocol {
                    TurnStatus::Error
                } else {
                    TurnStatus::Rejected
                };
                self.end_turn(Ending::by_error(status, &e));
                Step::Go
            }
            Err(e) => self.fail_turn(
                RelayError::new(Side::Internal, 500, "server_error", "internal_error")
                    .message(format!("admission task failed: {e}")),
            ),
        }
    }
}

async fn wait_slot(
    store: &Arc<dyn StateStore>,
    scope: &str,
    account: &AccountConfig,
    deadline: Instant,
) -> Result<Slot, RelayError> {
    match state::acquire(
        store,
        scope,
        account.concurrency,
        store.lease_ttl(),
        deadline,
    )
    .await
    {
        Ok(Some(slot)) => Ok(slot),
        Ok(None) => Err(no_capacity(account)),
        Err(e) => Err(
            RelayError::new(Side::Internal, 500, "server_error", "state_unavailable")
                .message(e.to_string()),
        ),
    }
}

fn no_capacity(account: &AccountConfig) -> RelayError {
    RelayError::new(Side::Internal, 503, "server_error", "no_capacity").message(format!(
        "All {} turn slots of account {} stayed busy for session.admission_timeout.",
        account.concurrency, account.id
    ))
}

impl Session {
    /// Notes an upstream's refusal of the running turn's dial or request against its account;
    /// true when it was the account's failure (a 5xx, a 429, a credential refused, or no
    /// answer). WebSocket dials are counted by the pool, HTTP requests here.
    fn note_refusal(&mut self, e: &RelayError) -> bool {
        let Some(turn) = self.turn.as_mut() else {
            return false;
        };
        let account_failed = crate::scheduler::health::Refusal::of(e)
            != crate::scheduler::health::Refusal::NotTheAccount;
        if account_failed {
            if turn.is_http() {
                turn.account_refused(e);
            }
            turn.avoid_account();
        }
        account_failed
    }

    /// SC-4: an upstream refusal at turn start moves the turn to another eligible account
    /// (strictly another), within the retry budget.
    fn fail_over_refusal(&mut self, e: &RelayError) -> Option<Step> {
        let turn = self.turn.as_ref()?;
        if turn.bound || turn.retries_left == 0 {
            return None;
        }
        let choice = self.next_account(true)?;
        Some(self.retry_on(choice, &e.message))
    }

    /// The running turn's account when it goes over HTTP.
    fn http_account(&self) -> Option<AccountConfig> {
        let turn = self.turn.as_ref().filter(|t| t.is_http())?;
        self.p
            .current
            .read()
            .accounts
            .iter()
            .find(|a| a.id == turn.account_id)
            .cloned()
    }
}
