//! `/metrics` read back as numbers: the Prometheus text format parsed line by line, so tests
//! check series by name and labels rather than by searching text.

use std::collections::BTreeMap;

/// Every sample of one scrape: `name{label="v",...}` (labels sorted) → value.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: BTreeMap<String, f64>,
    /// `# TYPE` lines: metric name → counter, gauge, histogram...
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                s.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value of {line:?}")),
            };
            s.samples.insert(canonical(series), value);
        }
        s
    }

    /// The sample of `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.get(&key(name, labels)).copied()
    }

    /// As `get`, 0 when the series is absent (a counter never incremented).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum over every series of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| series_name(k) == name)
            .filter(|(k, _)| {
                labels
                    .iter()
                    .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
            })
            .map(|(_, v)| *v)
            .sum()
    }

    /// A histogram's (count, sum), checking that it is one: typed so, with a `+Inf` bucket
    /// equal to its count and buckets that never decrease.
    pub fn histogram(&self, name: &str) -> (f64, f64) {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some("histogram"),
            "{name} is a histogram"
        );
        let count = self.value(&format!("{name}_count"), &[]);
        let sum = self.value(&format!("{name}_sum"), &[]);
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(k, _)| series_name(k) == format!("{name}_bucket"))
            .map(|(k, v)| {
                let le = k.split("le=\"").nth(1).expect("le").trim_end_matches("\"}");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le value")
                };
                (le, *v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(!buckets.is_empty(), "{name} has buckets");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}'s buckets are cumulative: {buckets:?}"
        );
        assert_eq!(
            buckets.last().map(|b| b.1),
            Some(count),
            "{name} +Inf = count"
        );
        (count, sum)
    }
}

fn series_name(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    l.sort();
    format!("{name}{{{}}}", l.join(","))
}

/// `name{b="2",a="1"}` as `name{a="1",b="2"}` (label values here hold no commas).
fn canonical(series: &str) -> String {
    match series.split_once('{') {
        None => series.to_string(),
        Some((name, rest)) => {
            let inner = rest.trim_end_matches('}');
            let mut l: Vec<&str> = inner.split(',').filter(|p| !p.is_empty()).collect();
            l.sort();
            format!("{name}{{{}}}", l.join(","))
        }
    }
}

/// Scrapes `http://{addr}/metrics`.
pub async fn scrape(addr: &str) -> Scrape {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    Scrape::parse(&text)
}
