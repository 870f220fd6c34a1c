//! Account choice per turn (SC-2): the account a stored `previous_response_id` is bound to,
//! else the session's sticky account, else the lowest priority tier with an eligible account
//! and, within it, power of two choices over load and capacity ([`balance`]). Eligibility is
//! re-checked at every turn: enabled and not draining (the operators' overrides, TM-3), serving
//! the model, not cooling down, breaker not open ([`health`]).

pub mod balance;
pub mod health;
pub mod shared;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::config::{AccountConfig, Config};
use crate::state::Override;
use crate::telemetry::metric;
use balance::Candidate;
use health::{Health, Load, Ticket};

/// The operators' overrides as the per-turn choice reads them: a copy of the state store's,
/// updated by the admin API after each change is stored.
#[derive(Default)]
pub struct Registry {
    overrides: RwLock<HashMap<String, Override>>,
    /// Bumped by every change made here, so a copy read from a shared store meanwhile does not
    /// undo it.
    version: std::sync::atomic::AtomicU64,
}

impl Registry {
    pub fn new(overrides: HashMap<String, Override>) -> Registry {
        Registry {
            overrides: RwLock::new(overrides),
            version: Default::default(),
        }
    }

    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Takes `all` (read from the store) unless a change was made here since `version`.
    pub fn replace_since(&self, version: u64, all: HashMap<String, Override>) {
        let mut held = self.overrides.write();
        if self.version() == version && *held != all {
            *held = all;
        }
    }

    pub fn get(&self, account: &str) -> Option<Override> {
        self.overrides.read().get(account).cloned()
    }

    pub fn set(&self, account: &str, o: Override) {
        let mut all = self.overrides.write();
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if o.is_empty() {
            all.remove(account);
        } else {
            all.insert(account.to_string(), o);
        }
    }

    pub fn enabled(&self, account: &str) -> bool {
        self.get(account).and_then(|o| o.enabled) != Some(false)
    }

    pub fn draining(&self, account: &str) -> bool {
        self.get(account).and_then(|o| o.draining) == Some(true)
    }

    /// `a` as turns see it now: its mode overridden; `None` when it takes no new turns.
    pub fn effective(&self, a: &AccountConfig) -> Option<AccountConfig> {
        let o = self.get(&a.id).unwrap_or_default();
        if o.enabled == Some(false) || o.draining == Some(true) {
            return None;
        }
        let mut a = a.clone();
        if let Some(mode) = o.mode() {
            a.mode = mode;
        }
        Some(a)
    }
}

/// The per-turn choice and what it reads.
pub struct Scheduler {
    pub registry: Arc<Registry>,
    pub health: Arc<Health>,
}

/// What a turn asks for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ask<'a> {
    pub model: &'a str,
    /// The session's account of its last turn.
    pub sticky: Option<&'a str>,
    /// Accounts this turn already failed on (SC-4): chosen again only when nothing else is
    /// eligible, and never when `strict`.
    pub avoid: &'a [String],
    pub strict: bool,
}

/// A chosen account and the turn's hold on it.
#[derive(Debug)]
pub struct Choice {
    pub account: AccountConfig,
    pub ticket: Ticket,
}

impl Scheduler {
    /// The account for a turn of `ask.model`, counted in flight there until the ticket drops.
    pub fn choose(&self, cfg: &Config, ask: Ask<'_>) -> Result<Choice, NoAccount> {
        let serving: Vec<&AccountConfig> = cfg
            .accounts
            .iter()
            .filter(|a| a.serves_model(ask.model))
            .collect();
        if serving.is_empty() {
            return Err(NoAccount::Unknown);
        }
        let mut eligible: Vec<(AccountConfig, Load)> = serving
            .iter()
            .filter_map(|a| Some((self.registry.effective(a)?, self.health.available(&a.id)?)))
            .collect();
        let fresh = |a: &AccountConfig| !ask.avoid.contains(&a.id);
        if eligible.iter().any(|(a, _)| fresh(a)) {
            eligible.retain(|(a, _)| fresh(a));
        } else if ask.strict {
            eligible.clear();
        }
        if let Some(sticky) = ask.sticky {
            if let Some((a, _)) = eligible.iter().find(|(a, _)| a.id == sticky) {
                if let Some(ticket) = self.health.start(&a.id) {
                    return Ok(chosen(a.clone(), ticket, "sticky"));
                }
            }
        }
        while !eligible.is_empty() {
            let Some(i) = self.pick_balanced(&eligible) else {
                break;
            };
            let (a, _) = eligible.swap_remove(i);
            // Taken by the time it was chosen (the last half-open probe): try the rest.
            if let Some(ticket) = self.health.start(&a.id) {
                return Ok(chosen(a, ticket, "balanced"));
            }
        }
        Err(NoAccount::Ineligible)
    }

    /// The account a stored response is bound to, when it takes turns now (CT-3).
    pub fn choose_bound(&self, cfg: &Config, account: &str, model: &str) -> Option<Choice> {
        let a = cfg.accounts.iter().find(|a| a.id == account)?;
        if !a.serves_model(model) {
            return None;
        }
        let a = self.registry.effective(a)?;
        let ticket = self.health.start(&a.id)?;
        Some(chosen(a, ticket, "bound"))
    }

    /// Within the lowest priority tier: power of two choices.
    fn pick_balanced(&self, eligible: &[(AccountConfig, Load)]) -> Option<usize> {
        let tier = eligible.iter().map(|(a, _)| a.priority).min()?;
        let members: Vec<usize> = (0..eligible.len())
            .filter(|i| eligible[*i].0.priority == tier)
            .collect();
        let cands: Vec<Candidate> = members
            .iter()
            .map(|i| {
                let (a, load) = &eligible[*i];
                Candidate {
                    capacity: a.concurrency as f64 * a.weight,
                    load: *load,
                }
            })
            .collect();
        let mut rng = rand::rng();
        let mut draw = || rand::Rng::random::<f64>(&mut rng);
        balance::choose(&cands, &mut draw).map(|k| members[k])
    }
}

fn chosen(account: AccountConfig, ticket: Ticket, how: &'static str) -> Choice {
    metrics::counter!(metric::ACCOUNT_CHOICES, "account" => account.id.clone(), "how" => how)
        .increment(1);
    Choice { account, ticket }
}

/// Why no account was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAccount {
    /// No configured account serves the model (400 `model_not_found`).
    Unknown,
    /// Accounts serve it, but none takes turns now (503 `no_capacity`).
    Ineligible,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccountMode;

    /// `a` serves gpt-4* only at priority 0; `b` and `c` serve everything at priority 1.
    fn cfg() -> Config {
        let mut cfg = Config::default();
        let mut a = AccountConfig::new("a", "http://127.0.0.1:1/v1", "k");
        a.models = vec!["gpt-4*".into()];
        cfg.accounts = vec![
            a,
            AccountConfig::new("b", "http://127.0.0.1:2/v1", "k"),
            AccountConfig::new("c", "http://127.0.0.1:3/v1", "k"),
        ];
        cfg.accounts[1].priority = 1;
        cfg.accounts[2].priority = 1;
        cfg
    }

    fn sched() -> Scheduler {
        Scheduler {
            registry: Arc::default(),
            health: Arc::default(),
        }
    }

    fn ask(model: &str) -> Ask<'_> {
        Ask {
            model,
            ..Ask::default()
        }
    }

    fn id(r: Result<Choice, NoAccount>) -> Result<String, NoAccount> {
        r.map(|c| c.account.id)
    }

    #[test]
    fn sc2_lowest_priority_tier_first_then_unknown_models() {
        let (mut cfg, s) = (cfg(), sched());
        for _ in 0..20 {
            assert_eq!(id(s.choose(&cfg, ask("gpt-4.1"))), Ok("a".into()));
            let other = id(s.choose(&cfg, ask("gpt-5"))).unwrap();
            assert!(other == "b" || other == "c");
        }
        cfg.accounts.truncate(1);
        assert_eq!(id(s.choose(&cfg, ask("gpt-5"))), Err(NoAccount::Unknown));
    }

    #[test]
    fn sc2_sticky_wins_over_tiers_while_eligible() {
        let (cfg, s) = (cfg(), sched());
        let sticky = Ask {
            sticky: Some("c"),
            ..ask("gpt-4.1")
        };
        assert_eq!(id(s.choose(&cfg, sticky)), Ok("c".into()));
        s.health.configure(health::BreakerSettings {
            failures: 1,
            ..Default::default()
        });
        s.health.failure("c", "down");
        assert_eq!(
            id(s.choose(&cfg, sticky)),
            Ok("a".into()),
            "re-checked per turn"
        );
    }

    #[test]
    fn sc4_avoided_accounts_only_when_nothing_else_and_never_when_strict() {
        let (cfg, s) = (cfg(), sched());
        let avoid = vec!["a".to_string()];
        let a = Ask {
            avoid: &avoid,
            ..ask("gpt-4.1")
        };
        let got = id(s.choose(&cfg, a)).unwrap();
        assert!(got == "b" || got == "c", "moved off a: {got}");
        let all = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let a = Ask {
            avoid: &all,
            ..ask("gpt-4.1")
        };
        assert_eq!(
            id(s.choose(&cfg, a)),
            Ok("a".into()),
            "nothing else: back to a"
        );
        let strict = Ask { strict: true, ..a };
        assert_eq!(id(s.choose(&cfg, strict)), Err(NoAccount::Ineligible));
    }

    #[test]
    fn sc2_bound_account_only_when_it_takes_turns() {
        let (cfg, s) = (cfg(), sched());
        assert_eq!(
            s.choose_bound(&cfg, "b", "gpt-5").map(|c| c.account.id),
            Some("b".into())
        );
        assert!(
            s.choose_bound(&cfg, "a", "gpt-5").is_none(),
            "model not served"
        );
        assert!(s.choose_bound(&cfg, "zz", "gpt-5").is_none());
        s.registry.set(
            "b",
            Override {
                draining: Some(true),
                ..Override::default()
            },
        );
        assert!(s.choose_bound(&cfg, "b", "gpt-5").is_none());
    }

    #[test]
    fn sc2_in_flight_turns_are_counted_until_the_ticket_drops() {
        let (cfg, s) = (cfg(), sched());
        let c = s.choose(&cfg, ask("gpt-4.1")).unwrap();
        assert_eq!(s.health.view("a").turns_in_flight, 1);
        drop(c);
        assert_eq!(s.health.view("a").turns_in_flight, 0);
    }

    #[test]
    fn tm3_overrides_disable_drain_and_switch_mode() {
        let (cfg, s) = (cfg(), sched());
        let set = |id: &str, mode: Option<&str>, enabled, draining| {
            let o = Override {
                mode: mode.map(str::to_string),
                enabled,
                draining,
            };
            s.registry.set(id, o)
        };
        set("b", None, Some(false), None);
        assert_eq!(id(s.choose(&cfg, ask("gpt-5"))), Ok("c".into()));
        set("c", Some("http"), None, Some(true));
        assert_eq!(id(s.choose(&cfg, ask("gpt-5"))), Err(NoAccount::Ineligible));
        set("c", Some("http"), None, None);
        let c = s.choose(&cfg, ask("gpt-5")).expect("c again");
        assert_eq!(
            (c.account.id.as_str(), c.account.mode),
            ("c", AccountMode::Http)
        );
        s.registry.set("b", Override::default());
        s.registry.set(
            "c",
            Override {
                enabled: Some(false),
                ..Override::default()
            },
        );
        assert_eq!(id(s.choose(&cfg, ask("gpt-5"))), Ok("b".into()));
    }
}
