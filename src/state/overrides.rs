//! Operators' run-time account overrides (TM-3): a mode, enabled, draining — each only when
//! set, the config file's value otherwise. They live in the embedded store so they survive a
//! restart, and win over the config file until cleared.

use std::collections::HashMap;

use rusqlite::params;
use serde::{Deserialize, Serialize};

use crate::config::AccountMode;
use crate::usage::store::{Store, StoreError};

/// What an operator changed about one account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining: Option<bool>,
}

impl Override {
    /// The overridden mode, when it names one this build knows.
    pub fn mode(&self) -> Option<AccountMode> {
        self.mode.as_deref().and_then(AccountMode::parse)
    }

    pub fn is_empty(&self) -> bool {
        self.mode.is_none() && self.enabled.is_none() && self.draining.is_none()
    }
}

/// Every stored override.
pub fn load(store: &mut Store) -> Result<HashMap<String, Override>, StoreError> {
    store.with_conn("read the account overrides", |conn| {
        let mut stmt =
            conn.prepare("SELECT account_id, mode, enabled, draining FROM account_overrides")?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                Override {
                    mode: row.get(1)?,
                    enabled: row.get(2)?,
                    draining: row.get(3)?,
                },
            ))
        })?;
        rows.collect()
    })
}

/// Stores `o` for `account` (replacing what was there).
pub fn save(store: &mut Store, account: &str, o: &Override) -> Result<(), StoreError> {
    let now = crate::usage::now_ms();
    store.with_conn("write an account override", |conn| {
        conn.execute(
            "INSERT INTO account_overrides (account_id, mode, enabled, draining, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(account_id) DO UPDATE SET mode = ?2, enabled = ?3, draining = ?4,
                updated_ms = ?5",
            params![account, o.mode, o.enabled, o.draining, now],
        )
        .map(|_| ())
    })
}

/// Forgets `account`'s override.
pub fn clear(store: &mut Store, account: &str) -> Result<(), StoreError> {
    store.with_conn("clear an account override", |conn| {
        conn.execute(
            "DELETE FROM account_overrides WHERE account_id = ?1",
            params![account],
        )
        .map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tm3_overrides_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut store = Store::open(&path).unwrap();
        let o = Override {
            mode: Some("http".into()),
            enabled: Some(false),
            draining: None,
        };
        save(&mut store, "a", &o).unwrap();
        save(&mut store, "b", &Override::default()).unwrap();
        drop(store);
        let mut store = Store::open(&path).unwrap();
        let all = load(&mut store).unwrap();
        assert_eq!(all["a"], o);
        assert_eq!(all["a"].mode(), Some(AccountMode::Http));
        clear(&mut store, "a").unwrap();
        assert!(!load(&mut store).unwrap().contains_key("a"));
    }
}
