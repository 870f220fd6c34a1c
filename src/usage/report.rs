//! `switchyard usage`: totals of the usage records in the store over a time window, grouped
//! by key, account or model, as an aligned table, as JSON, or the raw records as JSONL.
//!
//! The store is opened read-only, so the command can run next to a live relay (WAL readers
//! never block the writer) and a mistyped path is an error rather than a new empty database.
//! Exit codes: 0 done, 1 the store could not be read, 2 bad arguments or config.

use std::io::{self, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::store::{GroupBy, Query, Store, StoreError, SummaryRow};
use crate::config::Config;

const EXAMPLES: &str = "\
TIME is YYYY-MM-DD (UTC midnight), an RFC 3339 time in UTC (2025-01-31T12:00:00Z), or a
duration before now (90m, 24h, 7d). --since is inclusive, --until exclusive.

The store is --store, else store.path from --config (relative paths are taken from the current
directory, as the relay does), else ./switchyard.db.

Examples:
  switchyard usage --since 7d --by key
  switchyard usage --config relay.yaml --since 2025-01-01 --until 2025-02-01 --by model --json
  switchyard usage --store /var/lib/switchyard/switchyard.db --since 24h --records";

/// The `switchyard usage` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct UsageArgs {
    /// Config file whose `store.path` names the store.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The store file; wins over --config.
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Only records created at or after TIME.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records created before TIME.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// One row per key, account or model instead of one total.
    #[arg(long, value_name = "key|account|model", value_parser = group_by_arg)]
    pub by: Option<GroupBy>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print every record as one JSON object per line instead of a summary.
    #[arg(long, conflicts_with = "by")]
    pub records: bool,
}

fn group_by_arg(text: &str) -> Result<GroupBy, String> {
    GroupBy::parse(text).ok_or_else(|| "expected key, account or model".to_string())
}

/// What `switchyard usage` prints (as JSON with `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The window's start as RFC 3339 (UTC); none when unbounded.
    pub since: Option<String>,
    pub until: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub by: Option<GroupBy>,
    pub rows: Vec<SummaryRow>,
    /// The sum of `rows`, `group` none.
    pub total: SummaryRow,
}

/// Why a command that got past argument checks still failed.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the output: {0}")]
    Io(#[from] io::Error),
}

/// Runs `switchyard usage`; returns the process exit code.
pub fn run(args: &UsageArgs) -> ExitCode {
    let query = match query_from(args, super::now_ms()) {
        Ok(q) => q,
        Err(msg) => {
            eprintln!("switchyard usage: {msg}");
            return ExitCode::from(2);
        }
    };
    let path = match store_path(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    match print(args, &path, &query) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`| head`) is not a failure of ours.
        Err(RunError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard usage: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print(args: &UsageArgs, path: &Path, query: &Query) -> Result<(), RunError> {
    let store = Store::open_read_only(path)?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    if args.records {
        write_records(&store, query, &mut out)?;
    } else {
        let report = summarise(&store, query, args.by)?;
        if args.json {
            serde_json::to_writer_pretty(&mut out, &report).map_err(io::Error::from)?;
            writeln!(out)?;
        } else {
            write_text(&report, path, &mut out)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The window from `--since`/`--until`, both read against the same `now_ms`.
fn query_from(args: &UsageArgs, now_ms: i64) -> Result<Query, String> {
    let read = |flag: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|text| parse_time(text, now_ms).map_err(|e| format!("{flag}: {e}")))
            .transpose()
    };
    let query = Query {
        since_ms: read("--since", &args.since)?,
        until_ms: read("--until", &args.until)?,
    };
    if let (Some(since), Some(until)) = (query.since_ms, query.until_ms) {
        if since >= until {
            return Err(format!(
                "--since ({}) must be before --until ({})",
                format_ms(since),
                format_ms(until)
            ));
        }
    }
    Ok(query)
}

/// Reads a time argument as Unix milliseconds: `YYYY-MM-DD` (UTC midnight), an RFC 3339 time
/// in UTC, or a duration (`90m`, `24h`, `7d`) meaning that long before `now_ms`.
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    let text = text.trim();
    let bytes = text.as_bytes();
    let looks_like_date = bytes.len() >= 10
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4] == b'-'
        && bytes[7] == b'-';
    if looks_like_date {
        return parse_date_time(text);
    }
    match humantime::parse_duration(text) {
        Ok(ago) => {
            let ago_ms = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
            Ok(now_ms.saturating_sub(ago_ms).max(0))
        }
        Err(e) => Err(format!(
            "cannot read {text:?}: expected YYYY-MM-DD, an RFC 3339 time in UTC \
             (2025-01-31T12:00:00Z) or a duration before now (90m, 24h, 7d); as a duration: {e}"
        )),
    }
}

fn parse_date_time(text: &str) -> Result<i64, String> {
    // humantime ignores a non-UTC offset after fractional seconds; refuse it rather than
    // silently reading local time as UTC.
    if let Some(at) = text.rfind('+') {
        if &text[at..] != "+00:00" {
            return Err(format!(
                "{text:?}: only UTC times are accepted (Z or +00:00)"
            ));
        }
    }
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    let at = humantime::parse_rfc3339_weak(&full)
        .map_err(|e| format!("{text:?} is not a valid date or RFC 3339 time in UTC: {e}"))?;
    let since_epoch = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?;
    i64::try_from(since_epoch.as_millis()).map_err(|_| format!("{text:?} is out of range"))
}

/// Unix milliseconds as RFC 3339 (seconds precision when whole); raw for pre-1970 values,
/// which no relay writes.
pub fn format_ms(ms: i64) -> String {
    let Ok(unsigned) = u64::try_from(ms) else {
        return format!("{ms}ms");
    };
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(unsigned);
    if ms % 1000 == 0 {
        humantime::format_rfc3339_seconds(at).to_string()
    } else {
        humantime::format_rfc3339_millis(at).to_string()
    }
}

/// `--store`, else the config's `store.path`, else the default; a bad config prints its
/// errors like `check-config` and ends the command with exit code 2.
fn store_path(args: &UsageArgs) -> Result<PathBuf, ExitCode> {
    if let Some(path) = &args.store {
        return Ok(path.clone());
    }
    let Some(file) = &args.config else {
        return Ok(crate::config::StoreConfig::default().path);
    };
    match Config::load(file) {
        Ok(cfg) => Ok(cfg.store.path),
        Err(errors) => {
            eprintln!("{}: {} error(s)", file.display(), errors.len());
            for e in errors.iter() {
                eprintln!("  {e}");
            }
            Err(ExitCode::from(2))
        }
    }
}

/// The summary of the window, with its total.
pub fn summarise(store: &Store, q: &Query, by: Option<GroupBy>) -> Result<Report, StoreError> {
    let rows = store.summary(q, by)?;
    let mut total = SummaryRow::default();
    for row in &rows {
        total.add(row);
    }
    Ok(Report {
        since: q.since_ms.map(format_ms),
        until: q.until_ms.map(format_ms),
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        by,
        rows,
        total,
    })
}

fn write_records(store: &Store, q: &Query, out: &mut impl Write) -> Result<(), RunError> {
    let mut failed = None;
    store.for_each_record(q, |record| {
        let line = serde_json::to_writer(&mut *out, &record)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out));
        match line {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    match failed {
        Some(e) => Err(RunError::Io(e)),
        None => Ok(()),
    }
}

const HEADERS: [&str; 10] = [
    "", // the group column, named after --by
    "requests",
    "input",
    "cached",
    "output",
    "reasoning",
    "cost_usd",
    "estimated",
    "unpriced",
    "statuses",
];

/// The aligned table: a window line, a header, one line per group, and the total.
fn write_text(report: &Report, store: &Path, out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "usage in {} from {} until {}",
        store.display(),
        report.since.as_deref().unwrap_or("the first record"),
        report.until.as_deref().unwrap_or("now"),
    )?;
    let mut header: Vec<String> = HEADERS.iter().map(|h| h.to_string()).collect();
    header[0] = report.by.map_or("", GroupBy::as_str).to_string();
    let mut lines = vec![header];
    if report.by.is_some() {
        lines.extend(report.rows.iter().map(table_cells));
    }
    let mut total = table_cells(&report.total);
    total[0] = "total".to_string();
    lines.push(total);
    for line in align(&lines) {
        writeln!(out, "{line}")?;
    }
    if report.total.unpriced > 0 {
        writeln!(
            out,
            "{} request(s) have no cost (no model, or one the price table lacks); cost_usd leaves them out",
            report.total.unpriced
        )?;
    }
    Ok(())
}

fn table_cells(row: &SummaryRow) -> Vec<String> {
    let statuses: Vec<String> = row
        .by_status
        .iter()
        .map(|(status, n)| format!("{status}={n}"))
        .collect();
    vec![
        row.group.clone().unwrap_or_else(|| "(none)".to_string()),
        row.requests.to_string(),
        row.input.to_string(),
        row.cached_input.to_string(),
        row.output.to_string(),
        row.reasoning.to_string(),
        format!("{:.6}", row.cost_usd),
        row.estimated.to_string(),
        row.unpriced.to_string(),
        statuses.join(" "),
    ]
}

/// Pads the cells into columns: the first left-aligned, the numbers right-aligned, the last
/// (free text) unpadded.
fn align(lines: &[Vec<String>]) -> Vec<String> {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .filter_map(|l| l.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    lines
        .iter()
        .map(|cells| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, cell)| match c {
                    0 => format!("{cell:<w$}", w = widths[c]),
                    c if c + 1 == columns => cell.clone(),
                    _ => format!("{cell:>w$}", w = widths[c]),
                })
                .collect();
            padded.join("  ").trim_end().to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_750_000_000_000;

    #[test]
    fn dates_are_utc_midnight() {
        assert_eq!(parse_time("2025-01-31", NOW), Ok(1_738_281_600_000));
        assert_eq!(parse_time("1970-01-01", NOW), Ok(0));
    }

    #[test]
    fn rfc3339_times_are_utc() {
        let want = Ok(1_738_281_600_000 + 12 * 3_600_000 + 500);
        assert_eq!(parse_time("2025-01-31T12:00:00.5Z", NOW), want);
        assert_eq!(parse_time("2025-01-31 12:00:00.5", NOW), want);
        assert_eq!(
            parse_time("2025-01-31T12:00:00+00:00", NOW),
            Ok(1_738_281_600_000 + 12 * 3_600_000)
        );
        assert!(parse_time("2025-01-31T12:00:00.5+02:00", NOW).is_err());
        assert!(parse_time("2025-01-31T12:00:00+02:00", NOW).is_err());
    }

    #[test]
    fn durations_count_back_from_now() {
        assert_eq!(parse_time("90m", NOW), Ok(NOW - 90 * 60_000));
        assert_eq!(parse_time("24h", NOW), Ok(NOW - 86_400_000));
        assert_eq!(parse_time("7d", NOW), Ok(NOW - 7 * 86_400_000));
        assert_eq!(parse_time("100000000d", NOW), Ok(0));
    }

    #[test]
    fn bad_times_say_what_is_accepted() {
        for bad in [
            "yesterday",
            "",
            "5",
            "2025-13-01",
            "2025-02-30",
            "2025-01-31T25:00:00Z",
        ] {
            let err = parse_time(bad, NOW).err().unwrap_or_default();
            assert!(!err.is_empty(), "{bad:?} was accepted");
        }
        let err = parse_time("yesterday", NOW).err().unwrap_or_default();
        assert!(err.contains("YYYY-MM-DD") && err.contains("24h"), "{err}");
    }

    #[test]
    fn format_ms_round_trips() {
        assert_eq!(format_ms(1_738_281_600_000), "2025-01-31T00:00:00Z");
        assert_eq!(format_ms(1_738_281_600_250), "2025-01-31T00:00:00.250Z");
        assert_eq!(format_ms(-1), "-1ms");
        let text = format_ms(1_738_281_600_250);
        assert_eq!(parse_time(&text, NOW), Ok(1_738_281_600_250));
    }

    #[test]
    fn the_window_must_not_be_empty() {
        let args = UsageArgs {
            config: None,
            store: None,
            since: Some("2025-02-01".to_string()),
            until: Some("2025-01-01".to_string()),
            by: None,
            json: false,
            records: false,
        };
        let err = query_from(&args, NOW).err().unwrap_or_default();
        assert!(err.contains("must be before"), "{err}");
    }

    #[test]
    fn the_table_is_aligned_with_a_total() {
        let mut row = SummaryRow {
            group: Some("key-long-name".to_string()),
            requests: 12,
            cost_usd: 0.5,
            ..SummaryRow::default()
        };
        row.by_status.insert("completed".to_string(), 12);
        let report = Report {
            since: None,
            until: None,
            since_ms: None,
            until_ms: None,
            by: Some(GroupBy::Key),
            rows: vec![row.clone()],
            total: SummaryRow { group: None, ..row },
        };
        let mut out = Vec::new();
        write_text(&report, Path::new("x.db"), &mut out).expect("write");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "usage in x.db from the first record until now");
        assert!(lines[1].starts_with("key  "), "{text}");
        assert!(lines[3].starts_with("total                12  "), "{text}");
        assert!(lines[3].contains("0.500000"), "{text}");
        assert!(lines[3].ends_with("completed=12"), "{text}");
        let end_of_requests = |l: &str| l.find("requests").map(|i| i + "requests".len());
        let header_end = end_of_requests(lines[1]).expect("header");
        assert_eq!(lines[2].find(" 12").map(|i| i + 3), Some(header_end));
    }
}
