//! The price table and the cost formula (US-2). Prices are USD per 1M tokens. The built-in
//! table is data the operator maintains: it is dated ([`BUILTIN_AS_OF`]) and is replaced by
//! `usage.prices`, which is read again on SIGHUP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Deserialize;

use super::Tokens;

/// When the built-in figures were taken from OpenAI's published prices.
pub const BUILTIN_AS_OF: &str = "2026-06-30";

/// USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

impl Price {
    /// (input − cached)·price_in + cached·price_cached_in + output·price_out, per 1M tokens.
    /// Reasoning tokens are part of `output` and are not charged again.
    pub fn cost(&self, t: &Tokens) -> f64 {
        let uncached = t.input.saturating_sub(t.cached_input) as f64;
        (uncached * self.input
            + t.cached_input as f64 * self.cached_input
            + t.output as f64 * self.output)
            / 1_000_000.0
    }
}

/// Model names (exact, or a prefix ending in `*`) and their prices.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    entries: Vec<(String, Price)>,
    /// `built-in (as of …)` or the file it was read from, for logs and `switchyard usage`.
    pub source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    models: BTreeMap<String, Price>,
}

const BUILTIN: &[(&str, f64, f64, f64)] = &[
    ("gpt-5.5*", 5.00, 0.50, 30.00),
    ("gpt-5.5-pro*", 30.00, 30.00, 180.00),
    ("gpt-5.4*", 2.50, 0.25, 15.00),
    ("gpt-5.4-mini*", 0.75, 0.075, 4.50),
    ("gpt-5.4-nano*", 0.20, 0.02, 1.25),
    ("gpt-5.4-pro*", 30.00, 30.00, 180.00),
    ("gpt-5.2*", 1.75, 0.175, 14.00),
    ("gpt-5.1*", 1.25, 0.125, 10.00),
    ("gpt-5*", 1.25, 0.125, 10.00),
    ("gpt-5-mini*", 0.25, 0.025, 2.00),
    ("gpt-5-nano*", 0.05, 0.005, 0.40),
    ("gpt-4.1*", 2.00, 0.50, 8.00),
    ("gpt-4.1-mini*", 0.40, 0.10, 1.60),
    ("gpt-4.1-nano*", 0.10, 0.025, 0.40),
    ("gpt-4o*", 2.50, 1.25, 10.00),
    ("gpt-4o-mini*", 0.15, 0.075, 0.60),
    ("o3*", 2.00, 0.50, 8.00),
    ("o4-mini*", 1.10, 0.275, 4.40),
];

impl PriceTable {
    /// The table compiled into the relay.
    pub fn builtin() -> PriceTable {
        let entries = BUILTIN
            .iter()
            .map(|&(name, input, cached_input, output)| {
                let p = Price {
                    input,
                    cached_input,
                    output,
                };
                (name.to_string(), p)
            })
            .collect();
        PriceTable {
            entries,
            source: format!("built-in (as of {BUILTIN_AS_OF})"),
        }
    }

    /// Reads a YAML table `{models: {<name or prefix*>: {input, cached_input, output}}}`.
    pub fn load(path: &Path) -> Result<PriceTable, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut t =
            PriceTable::from_yaml_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        t.source = path.display().to_string();
        Ok(t)
    }

    pub fn from_yaml_str(text: &str) -> Result<PriceTable, String> {
        let file: PriceFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut entries = Vec::with_capacity(file.models.len());
        for (name, p) in file.models {
            let name = name.trim().to_string();
            if name.is_empty() {
                return Err("a model name is empty".into());
            }
            for (what, v) in [
                ("input", p.input),
                ("cached_input", p.cached_input),
                ("output", p.output),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(format!(
                        "models.{name}.{what}: must be a price of 0 or more"
                    ));
                }
            }
            entries.push((name, p));
        }
        Ok(PriceTable {
            entries,
            source: "inline".into(),
        })
    }

    /// The price of `model`: the longest matching name wins, and an exact name beats a prefix
    /// of the same length.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        let mut best: Option<(usize, bool, &Price)> = None;
        for (name, price) in &self.entries {
            let (len, exact) = match name.strip_suffix('*') {
                Some(prefix) if model.starts_with(prefix) => (prefix.len(), false),
                None if name == model => (name.len(), true),
                _ => continue,
            };
            let better = match best {
                None => true,
                Some((l, e, _)) => len > l || (len == l && exact && !e),
            };
            if better {
                best = Some((len, exact, price));
            }
        }
        best.map(|(_, _, p)| p)
    }

    /// US-2's cost; `None` for a model the table does not price.
    pub fn cost(&self, model: &str, tokens: &Tokens) -> Option<f64> {
        self.lookup(model).map(|p| p.cost(tokens))
    }
}

/// The table in force, swapped whole on reload so a record is priced by one table.
pub struct Prices {
    path: Option<PathBuf>,
    current: RwLock<Arc<PriceTable>>,
}

impl Prices {
    /// The table from `path`, or the built-in one.
    pub fn new(path: Option<PathBuf>) -> Result<Prices, String> {
        let table = match path.as_deref() {
            Some(p) => PriceTable::load(p)?,
            None => PriceTable::builtin(),
        };
        Ok(Prices {
            path,
            current: RwLock::new(Arc::new(table)),
        })
    }

    pub fn get(&self) -> Arc<PriceTable> {
        self.current.read().clone()
    }

    /// Reads `usage.prices` again; on an error the table in force stays.
    pub fn reload(&self) -> Result<(), String> {
        let Some(path) = self.path.as_deref() else {
            return Ok(());
        };
        let table = PriceTable::load(path)?;
        *self.current.write() = Arc::new(table);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(input: u64, cached_input: u64, output: u64) -> Tokens {
        Tokens {
            input,
            cached_input,
            output,
            reasoning: 0,
        }
    }

    #[test]
    fn us2_cost_formula() {
        let t =
            PriceTable::from_yaml_str("models: {m: {input: 2.0, cached_input: 0.5, output: 8.0}}")
                .unwrap();
        // (1000 − 400)·2 + 400·0.5 + 250·8 = 1200 + 200 + 2000 = 3400 per 1M.
        let cost = t.cost("m", &tokens(1000, 400, 250)).unwrap();
        assert!((cost - 0.0034).abs() < 1e-12, "{cost}");
        assert_eq!(t.cost("other", &tokens(1, 0, 1)), None);
    }

    #[test]
    fn us2_longest_matching_name_wins() {
        let t = PriceTable::from_yaml_str(
            "models:\n  gpt-5*: {input: 1, cached_input: 0, output: 1}\n  gpt-5-mini*: {input: 2, cached_input: 0, output: 2}\n  gpt-5-mini: {input: 3, cached_input: 0, output: 3}\n  gpt-5-mini-2*: {input: 4, cached_input: 0, output: 4}\n",
        )
        .unwrap();
        let price = |m: &str| t.lookup(m).map(|p| p.input);
        assert_eq!(price("gpt-5"), Some(1.0));
        assert_eq!(price("gpt-5-2026-01-01"), Some(1.0));
        assert_eq!(price("gpt-5-mini"), Some(3.0), "exact beats a prefix");
        assert_eq!(price("gpt-5-mini-1"), Some(2.0));
        assert_eq!(price("gpt-5-mini-2026"), Some(4.0));
        assert_eq!(price("gpt-4o"), None);
    }

    #[test]
    fn us2_builtin_table_prices_the_current_models() {
        let t = PriceTable::builtin();
        assert!(t.source.contains(BUILTIN_AS_OF));
        for m in [
            "gpt-5.5",
            "gpt-5.5-2026-04-23",
            "gpt-5-codex",
            "gpt-5-mini",
            "o3",
        ] {
            assert!(t.lookup(m).is_some(), "{m}");
        }
        assert_eq!(t.lookup("gpt-5-mini").map(|p| p.output), Some(2.0));
        assert_eq!(t.lookup("text-embedding-3-large"), None);
    }

    #[test]
    fn us2_bad_tables_are_refused() {
        for bad in [
            "models: {m: {input: -1, cached_input: 0, output: 1}}",
            "models: {m: {input: 1, output: 1}}",
            "models: {m: {input: 1, cached_input: 0, output: 1, extra: 2}}",
            "prices: {}",
            "models: {'': {input: 1, cached_input: 0, output: 1}}",
        ] {
            assert!(PriceTable::from_yaml_str(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn us2_reload_swaps_the_table_and_keeps_it_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prices.yaml");
        std::fs::write(&path, "models: {m: {input: 1, cached_input: 0, output: 1}}").unwrap();
        let prices = Prices::new(Some(path.clone())).unwrap();
        assert_eq!(prices.get().lookup("m").map(|p| p.input), Some(1.0));
        std::fs::write(&path, "models: {m: {input: 7, cached_input: 0, output: 1}}").unwrap();
        prices.reload().unwrap();
        assert_eq!(prices.get().lookup("m").map(|p| p.input), Some(7.0));
        std::fs::write(&path, "models: [").unwrap();
        assert!(prices.reload().is_err());
        assert_eq!(prices.get().lookup("m").map(|p| p.input), Some(7.0));
    }
}
