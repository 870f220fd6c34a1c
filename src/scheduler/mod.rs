//! Account choice. For now the stopgap rule: the first account in config order that serves the
//! model, re-checked every turn (SPEC SC-2's full rule replaces it).

use crate::config::{AccountConfig, Config};

/// The account for a turn of `model`, or `None` when no account serves it.
pub fn pick<'a>(cfg: &'a Config, model: &str) -> Option<&'a AccountConfig> {
    cfg.accounts.iter().find(|a| a.serves_model(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_account_serving_the_model_wins() {
        let mut cfg = Config::default();
        let mut a = AccountConfig::new("a", "http://127.0.0.1:1/v1", "k");
        a.models = vec!["gpt-4*".into()];
        cfg.accounts = vec![
            a,
            AccountConfig::new("b", "http://127.0.0.1:2/v1", "k"),
            AccountConfig::new("c", "http://127.0.0.1:3/v1", "k"),
        ];
        assert_eq!(pick(&cfg, "gpt-4.1").map(|a| a.id.as_str()), Some("a"));
        assert_eq!(pick(&cfg, "gpt-5").map(|a| a.id.as_str()), Some("b"));
        cfg.accounts.truncate(1);
        assert!(pick(&cfg, "gpt-5").is_none());
    }
}
