//! Account choice. For now the stopgap rule: the first account in config order that serves the
//! model and is eligible (enabled, not draining, by the operators' overrides, TM-3), re-checked
//! every turn (SPEC SC-2's full rule replaces it). An override's mode applies from the next turn.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::config::{AccountConfig, Config};
use crate::state::Override;

/// The operators' overrides as the per-turn choice reads them: a copy of the state store's,
/// updated by the admin API after each change is stored.
#[derive(Default)]
pub struct Registry {
    overrides: RwLock<HashMap<String, Override>>,
}

impl Registry {
    pub fn new(overrides: HashMap<String, Override>) -> Registry {
        Registry {
            overrides: RwLock::new(overrides),
        }
    }

    pub fn get(&self, account: &str) -> Option<Override> {
        self.overrides.read().get(account).cloned()
    }

    pub fn set(&self, account: &str, o: Override) {
        let mut all = self.overrides.write();
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

/// Why no account was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAccount {
    /// No configured account serves the model (400 `model_not_found`).
    Unknown,
    /// Accounts serve it, but none takes turns now (503 `no_capacity`).
    Ineligible,
}

/// The account for a turn of `model`.
pub fn pick(cfg: &Config, reg: &Registry, model: &str) -> Result<AccountConfig, NoAccount> {
    let mut serving = cfg
        .accounts
        .iter()
        .filter(|a| a.serves_model(model))
        .peekable();
    if serving.peek().is_none() {
        return Err(NoAccount::Unknown);
    }
    serving
        .find_map(|a| reg.effective(a))
        .ok_or(NoAccount::Ineligible)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccountMode;

    fn cfg() -> Config {
        let mut cfg = Config::default();
        let mut a = AccountConfig::new("a", "http://127.0.0.1:1/v1", "k");
        a.models = vec!["gpt-4*".into()];
        cfg.accounts = vec![
            a,
            AccountConfig::new("b", "http://127.0.0.1:2/v1", "k"),
            AccountConfig::new("c", "http://127.0.0.1:3/v1", "k"),
        ];
        cfg
    }

    #[test]
    fn first_account_serving_the_model_wins() {
        let (mut cfg, reg) = (cfg(), Registry::default());
        let id = |r: Result<AccountConfig, NoAccount>| r.map(|a| a.id);
        assert_eq!(id(pick(&cfg, &reg, "gpt-4.1")), Ok("a".into()));
        assert_eq!(id(pick(&cfg, &reg, "gpt-5")), Ok("b".into()));
        cfg.accounts.truncate(1);
        assert_eq!(id(pick(&cfg, &reg, "gpt-5")), Err(NoAccount::Unknown));
    }

    #[test]
    fn tm3_overrides_disable_drain_and_switch_mode() {
        let (cfg, reg) = (cfg(), Registry::default());
        let set = |id: &str, mode: Option<&str>, enabled, draining| {
            let o = Override {
                mode: mode.map(str::to_string),
                enabled,
                draining,
            };
            reg.set(id, o)
        };
        set("b", None, Some(false), None);
        assert_eq!(pick(&cfg, &reg, "gpt-5").map(|a| a.id), Ok("c".into()));
        set("c", Some("http"), None, Some(true));
        assert_eq!(
            pick(&cfg, &reg, "gpt-5").map(|a| a.id),
            Err(NoAccount::Ineligible)
        );
        set("c", Some("http"), None, None);
        let c = pick(&cfg, &reg, "gpt-5").expect("c again");
        assert_eq!((c.id.as_str(), c.mode), ("c", AccountMode::Http));
        reg.set("b", Override::default());
        assert_eq!(pick(&cfg, &reg, "gpt-5").map(|a| a.id), Ok("b".into()));
    }
}
