//! The embedded SQLite store: the relay's only on-disk state (usage records now, admin
//! overrides later). The API is synchronous; async callers go through `spawn_blocking`.
//!
//! Durability: the database runs in WAL mode with `synchronous=NORMAL`. A committed
//! transaction survives the process being killed (`kill -9`), because the commit is in the WAL
//! file before `insert` returns; only a power loss or OS crash can roll back the last few
//! commits. WAL also lets `switchyard usage` read while the relay writes: readers see the last
//! committed snapshot and never block the writer.
//!
//! Schema changes go through [`MIGRATIONS`], counted by `PRAGMA user_version`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{params, Connection, OpenFlags, Row, TransactionBehavior};
use serde::{Deserialize, Serialize};

use super::{Record, Status, TimingsMs, Tokens};

/// How long a statement waits for another connection's lock before failing: long enough for
/// any relay flush to finish, short enough that a wedged store is reported.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema steps; step `i` takes the store from version `i` to `i + 1`. Append, never edit.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS usage_records (
        request_id TEXT PRIMARY KEY NOT NULL,
        created_ms INTEGER NOT NULL,
        response_id TEXT,
        key_id TEXT NOT NULL,
        account_id TEXT,
        session TEXT NOT NULL,
        seq INTEGER NOT NULL,
        model TEXT,
        transport TEXT NOT NULL,
        warm_up INTEGER NOT NULL,
        status TEXT NOT NULL,
        input_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cost_usd REAL,
        estimated INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        admission_wait_ms REAL,
        upstream_write_ms REAL,
        first_event_ms REAL,
        first_token_ms REAL,
        total_ms REAL,
        error_class TEXT,
        error_side TEXT
    );
    CREATE INDEX IF NOT EXISTS usage_records_created_ms ON usage_records (created_ms);",
    // Operators' run-time account overrides (TM-3); a NULL column leaves the config's value.
    "CREATE TABLE IF NOT EXISTS account_overrides (
        account_id TEXT PRIMARY KEY NOT NULL,
        mode TEXT,
        enabled INTEGER,
        draining INTEGER,
        updated_ms INTEGER NOT NULL
    );",
];

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const INSERT: &str = "INSERT OR IGNORE INTO usage_records (
        request_id, created_ms, response_id, key_id, account_id, session, seq, model,
        transport, warm_up, status, input_tokens, cached_input_tokens, output_tokens,
        reasoning_tokens, cost_usd, estimated, attempts, admission_wait_ms, upstream_write_ms,
        first_event_ms, first_token_ms, total_ms, error_class, error_side)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
        ?19, ?20, ?21, ?22, ?23, ?24, ?25)";

const SELECT: &str = "SELECT request_id, created_ms, response_id, key_id, account_id, session,
        seq, model, transport, warm_up, status, input_tokens, cached_input_tokens,
        output_tokens, reasoning_tokens, cost_usd, estimated, attempts, admission_wait_ms,
        upstream_write_ms, first_event_ms, first_token_ms, total_ms, error_class, error_side
    FROM usage_records";

/// Why the store could not be opened, written or read; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {path}: directory {dir} does not exist")]
    MissingDir { path: PathBuf, dir: PathBuf },
    #[error("no store at {path}")]
    Missing { path: PathBuf },
    #[error("store {path}: cannot {action}: {source}")]
    Sqlite {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store {path} has schema version {found}; this build knows up to {known}")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("store {path}: cannot use WAL mode (the file system gave {mode:?}); use a local disk")]
    NoWal { path: PathBuf, mode: String },
    #[error("{path} is not a switchyard store (no schema)")]
    NotAStore { path: PathBuf },
}

/// A time window over `created_ms`: `since` inclusive, `until` exclusive, both optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Query {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl Query {
    /// The `WHERE` clause (empty when unbounded) and its parameters, index-friendly.
    fn filter(&self) -> (String, Vec<i64>) {
        let mut clauses = Vec::new();
        let mut values = Vec::new();
        if let Some(since) = self.since_ms {
            clauses.push("created_ms >= ?");
            values.push(since);
        }
        if let Some(until) = self.until_ms {
            clauses.push("created_ms < ?");
            values.push(until);
        }
        if clauses.is_empty() {
            return (String::new(), values);
        }
        (format!(" WHERE {}", clauses.join(" AND ")), values)
    }
}

/// What a summary is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Key,
    Account,
    Model,
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Key => "key",
            GroupBy::Account => "account",
            GroupBy::Model => "model",
        }
    }

    pub fn parse(text: &str) -> Option<GroupBy> {
        [GroupBy::Key, GroupBy::Account, GroupBy::Model]
            .into_iter()
            .find(|g| g.as_str() == text)
    }

    fn column(self) -> &'static str {
        match self {
            GroupBy::Key => "key_id",
            GroupBy::Account => "account_id",
            GroupBy::Model => "model",
        }
    }
}

/// Totals of one group (or of everything when ungrouped).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    /// The key, account or model; none for the ungrouped total and for records without one.
    pub group: Option<String>,
    pub requests: u64,
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub reasoning: u64,
    /// The sum of the known costs; see `unpriced` for how many were unknown.
    pub cost_usd: f64,
    /// Records whose cost is null (no model, or one the price table lacks).
    pub unpriced: u64,
    /// Records whose token counts are (partly) estimated.
    pub estimated: u64,
    /// Requests per status (`completed`, `failed`, ...); absent statuses are left out.
    pub by_status: BTreeMap<String, u64>,
}

impl SummaryRow {
    /// Adds `other`'s counts to this row (the group stays).
    pub fn add(&mut self, other: &SummaryRow) {
        self.requests += other.requests;
        self.input += other.input;
        self.cached_input += other.cached_input;
        self.output += other.output;
        self.reasoning += other.reasoning;
        self.cost_usd += other.cost_usd;
        self.unpriced += other.unpriced;
        self.estimated += other.estimated;
        for (status, n) in &other.by_status {
            *self.by_status.entry(status.clone()).or_default() += n;
        }
    }
}

/// The embedded store: one SQLite connection.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens the store at `path` for reading and writing, creating the file (not its
    /// directory) and the schema when missing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(StoreError::MissingDir {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut store = Store::connect(path, flags)?;
        store.set_wal()?;
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing store for reading only: never creates a file or changes the schema,
    /// so a mistyped path is reported instead of leaving an empty database behind.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let store = Store::connect(path, flags)?;
        match store.schema_version()? {
            0 => Err(StoreError::NotAStore {
                path: path.to_path_buf(),
            }),
            v if v > SCHEMA_VERSION => Err(store.newer_schema(v)),
            _ => Ok(store),
        }
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection, its error reported as `action` on this store's file (for
    /// the other tables of the store, e.g. `state::overrides`).
    pub fn with_conn<T>(
        &mut self,
        action: &'static str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        f(&mut self.conn).map_err(sql_err(&path, action))
    }

    fn connect(path: &Path, flags: OpenFlags) -> Result<Store, StoreError> {
        let sqlite = |source| sql_err(path, "open the database")(source);
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, action: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        sql_err(&self.path, action)
    }

    fn newer_schema(&self, found: i64) -> StoreError {
        StoreError::NewerSchema {
            path: self.path.clone(),
            found,
            known: SCHEMA_VERSION,
        }
    }

    /// WAL is a property of the file, so it is set once by the writer; see the module doc.
    fn set_wal(&self) -> Result<(), StoreError> {
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(self.err("switch to WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal {
                path: self.path.clone(),
                mode,
            });
        }
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(self.err("set synchronous=NORMAL"))
    }

    fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err("read the schema version"))
    }

    /// Applies the missing schema steps in one immediate transaction, so two processes
    /// opening a new file at once cannot both migrate it.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql_err(&path, "start the schema migration"))?;
        let found: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql_err(&path, "read the schema version"))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path,
                found,
                known: SCHEMA_VERSION,
            });
        }
        for step in MIGRATIONS.iter().skip(usize::try_from(found).unwrap_or(0)) {
            tx.execute_batch(step)
                .map_err(sql_err(&path, "migrate the schema"))?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql_err(&path, "record the schema version"))?;
        tx.commit()
            .map_err(sql_err(&path, "commit the schema migration"))
    }

    /// Writes `records` in one transaction and returns how many were new. A record whose
    /// `request_id` is already stored is skipped, so a batch flushed twice is not doubled.
    pub fn insert(&mut self, records: &[Record]) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let sqlite = |source| sql_err(&path, "insert usage records")(source);
        let tx = self.conn.transaction().map_err(sqlite)?;
        let mut added = 0;
        {
            let mut stmt = tx.prepare_cached(INSERT).map_err(sqlite)?;
            for r in records {
                added += insert_one(&mut stmt, r).map_err(sqlite)?;
            }
        }
        tx.commit().map_err(sqlite)?;
        Ok(added)
    }

    /// The records in the window, by `created_ms`, then session and sequence.
    pub fn records(&self, q: &Query) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        self.for_each_record(q, |r| {
            out.push(r);
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// Streams the records of [`Store::records`] to `f` without holding them all; `f` may
    /// stop early.
    pub fn for_each_record<F>(&self, q: &Query, mut f: F) -> Result<(), StoreError>
    where
        F: FnMut(Record) -> ControlFlow<()>,
    {
        let (filter, values) = q.filter();
        let sql = format!("{SELECT}{filter} ORDER BY created_ms, session, seq");
        let mut stmt = self.conn.prepare(&sql).map_err(self.err("read records"))?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(values))
            .map_err(self.err("read records"))?;
        while let Some(row) = rows.next().map_err(self.err("read records"))? {
            let record = record_from_row(row).map_err(self.err("read records"))?;
            if f(record).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Totals per group over the window, ordered by group (records without one first).
    /// Ungrouped, the answer is always one row, zeros when the window is empty.
    pub fn summary(&self, q: &Query, by: Option<GroupBy>) -> Result<Vec<SummaryRow>, StoreError> {
        // One read transaction, so the totals and the status counts see the same snapshot.
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.err("read the summary"))?;
        let mut rows = self.totals(q, by)?;
        let statuses = self.status_counts(q, by)?;
        tx.finish().map_err(self.err("read the summary"))?;
        for row in &mut rows {
            if let Some(counts) = statuses.get(&row.group) {
                row.by_status = counts.clone();
            }
        }
        if rows.is_empty() && by.is_none() {
            rows.push(SummaryRow::default());
        }
        Ok(rows)
    }

    fn totals(&self, q: &Query, by: Option<GroupBy>) -> Result<Vec<SummaryRow>, StoreError> {
        let (filter, values) = q.filter();
        let group = by.map_or("NULL", GroupBy::column);
        let sql = format!(
            "SELECT {group} AS grp, COUNT(*), COALESCE(SUM(input_tokens), 0),
                COALESCE(SUM(cached_input_tokens), 0), COALESCE(SUM(output_tokens), 0),
                COALESCE(SUM(reasoning_tokens), 0), TOTAL(cost_usd),
                COALESCE(SUM(cost_usd IS NULL), 0), COALESCE(SUM(estimated), 0)
            FROM usage_records{filter} GROUP BY grp ORDER BY grp"
        );
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(self.err("read the summary"))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), |r| {
                Ok(SummaryRow {
                    group: r.get(0)?,
                    requests: r.get(1)?,
                    input: r.get(2)?,
                    cached_input: r.get(3)?,
                    output: r.get(4)?,
                    reasoning: r.get(5)?,
                    cost_usd: r.get(6)?,
                    unpriced: r.get(7)?,
                    estimated: r.get(8)?,
                    by_status: BTreeMap::new(),
                })
            })
            .map_err(self.err("read the summary"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.err("read the summary"))
    }

    fn status_counts(
        &self,
        q: &Query,
        by: Option<GroupBy>,
    ) -> Result<BTreeMap<Option<String>, BTreeMap<String, u64>>, StoreError> {
        let (filter, values) = q.filter();
        let group = by.map_or("NULL", GroupBy::column);
        let sql = format!(
            "SELECT {group} AS grp, status, COUNT(*) FROM usage_records{filter}
            GROUP BY grp, status"
        );
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(self.err("read the summary"))?;
        let mut rows = stmt
            .query(rusqlite::params_from_iter(values))
            .map_err(self.err("read the summary"))?;
        let mut out: BTreeMap<Option<String>, BTreeMap<String, u64>> = BTreeMap::new();
        while let Some(row) = rows.next().map_err(self.err("read the summary"))? {
            let read = |row: &Row| -> rusqlite::Result<(Option<String>, String, u64)> {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            };
            let (group, status, n) = read(row).map_err(self.err("read the summary"))?;
            out.entry(group).or_default().insert(status, n);
        }
        Ok(out)
    }
}

/// Wraps an SQLite error with the file and what was being done.
fn sql_err(path: &Path, action: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Sqlite {
        path,
        action,
        source,
    }
}

/// Runs `INSERT` for one record; the 25 values in its column order.
fn insert_one(stmt: &mut rusqlite::CachedStatement<'_>, r: &Record) -> rusqlite::Result<usize> {
    let t = &r.timings;
    stmt.execute(params![
        r.request_id,
        r.created_ms,
        r.response_id,
        r.key_id,
        r.account_id,
        r.session,
        r.seq,
        r.model,
        r.transport,
        r.warm_up,
        r.status.as_str(),
        r.tokens.input,
        r.tokens.cached_input,
        r.tokens.output,
        r.tokens.reasoning,
        r.cost_usd,
        r.estimated,
        r.attempts,
        t.admission_wait,
        t.upstream_write,
        t.first_event,
        t.first_token,
        t.total,
        r.error_class,
        r.error_side,
    ])
}

/// A status text this build does not know (a newer relay wrote it, or the row was edited).
#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
struct UnknownStatus(String);

/// One `SELECT` row back into a record; columns in `SELECT`'s order.
fn record_from_row(row: &Row) -> rusqlite::Result<Record> {
    let status_text: String = row.get(10)?;
    let status = Status::parse(&status_text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            10,
            Type::Text,
            Box::new(UnknownStatus(status_text)),
        )
    })?;
    Ok(Record {
        request_id: row.get(0)?,
        created_ms: row.get(1)?,
        response_id: row.get(2)?,
        key_id: row.get(3)?,
        account_id: row.get(4)?,
        session: row.get(5)?,
        seq: row.get(6)?,
        model: row.get(7)?,
        transport: row.get(8)?,
        warm_up: row.get(9)?,
        status,
        tokens: Tokens {
            input: row.get(11)?,
            cached_input: row.get(12)?,
            output: row.get(13)?,
            reasoning: row.get(14)?,
        },
        cost_usd: row.get(15)?,
        estimated: row.get(16)?,
        attempts: row.get(17)?,
        timings: TimingsMs {
            admission_wait: row.get(18)?,
            upstream_write: row.get(19)?,
            first_event: row.get(20)?,
            first_token: row.get(21)?,
            total: row.get(22)?,
        },
        error_class: row.get(23)?,
        error_side: row.get(24)?,
    })
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
