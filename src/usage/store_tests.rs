//! Unit tests of the embedded store (US-1's persistence, the queries behind `switchyard usage`).

use super::*;

fn record(id: &str, created_ms: i64) -> Record {
    Record {
        request_id: id.to_string(),
        created_ms,
        response_id: None,
        key_id: "k1".to_string(),
        account_id: Some("a1".to_string()),
        session: "s1".to_string(),
        seq: 1,
        model: Some("gpt-5".to_string()),
        transport: "ctx_pool".to_string(),
        warm_up: false,
        status: Status::Completed,
        tokens: Tokens {
            input: 100,
            cached_input: 40,
            output: 20,
            reasoning: 5,
        },
        cost_usd: Some(0.001),
        estimated: false,
        attempts: 1,
        timings: TimingsMs::default(),
        error_class: None,
        error_side: None,
    }
}

/// Every field set, with values that would expose a swapped or truncated column.
fn full_record() -> Record {
    Record {
        request_id: "req_full".to_string(),
        created_ms: 1_700_000_000_123,
        response_id: Some("resp_1".to_string()),
        key_id: "key-a".to_string(),
        account_id: Some("acct-b".to_string()),
        session: "sess-c".to_string(),
        seq: u64::try_from(i64::MAX).expect("fits"),
        model: Some("gpt-5-mini".to_string()),
        transport: "passthrough".to_string(),
        warm_up: true,
        status: Status::UpstreamLost,
        tokens: Tokens {
            input: 11,
            cached_input: 7,
            output: 13,
            reasoning: 3,
        },
        cost_usd: Some(0.125_5),
        estimated: true,
        attempts: 3,
        timings: TimingsMs {
            admission_wait: Some(0.5),
            upstream_write: Some(1.25),
            first_event: Some(10.0),
            first_token: Some(12.75),
            total: Some(99.5),
        },
        error_class: Some("close_1012".to_string()),
        error_side: Some("upstream_io".to_string()),
    }
}

fn empty_record() -> Record {
    Record {
        request_id: "req_empty".to_string(),
        created_ms: -5,
        response_id: None,
        key_id: String::new(),
        account_id: None,
        session: String::new(),
        seq: 0,
        model: None,
        transport: "none".to_string(),
        warm_up: false,
        status: Status::Rejected,
        tokens: Tokens::default(),
        cost_usd: None,
        estimated: false,
        attempts: 0,
        timings: TimingsMs::default(),
        error_class: None,
        error_side: None,
    }
}

fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("usage.db")).expect("open");
    (dir, store)
}

fn window(since_ms: Option<i64>, until_ms: Option<i64>) -> Query {
    Query { since_ms, until_ms }
}

#[test]
fn round_trip_keeps_every_field() {
    let (_dir, mut store) = open_temp();
    let mut all = vec![empty_record(), full_record()];
    for status in Status::ALL {
        let mut r = record(&format!("req_{}", status.as_str()), 10);
        r.status = status;
        all.push(r);
    }
    assert_eq!(store.insert(&all).expect("insert"), all.len());
    let back = store.records(&Query::default()).expect("records");
    assert_eq!(back.len(), all.len());
    for r in &all {
        let found = back.iter().find(|b| b.request_id == r.request_id);
        assert_eq!(found, Some(r), "{}", r.request_id);
    }
}

#[test]
fn reinserting_a_batch_adds_nothing() {
    let (_dir, mut store) = open_temp();
    let batch = vec![record("req_1", 1), record("req_2", 2)];
    assert_eq!(store.insert(&batch).expect("first"), 2);
    let mut again = batch.clone();
    again.push(record("req_3", 3));
    assert_eq!(store.insert(&again).expect("second"), 1);
    assert_eq!(store.insert(&again).expect("third"), 0);
    let ids: Vec<String> = store
        .records(&Query::default())
        .expect("records")
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    assert_eq!(ids, ["req_1", "req_2", "req_3"]);
}

#[test]
fn records_are_ordered_by_time_then_session_then_seq() {
    let (_dir, mut store) = open_temp();
    let mut later = record("req_later", 20);
    later.session = "a".to_string();
    let mut b2 = record("req_b2", 10);
    b2.session = "b".to_string();
    b2.seq = 2;
    let mut b1 = record("req_b1", 10);
    b1.session = "b".to_string();
    b1.seq = 1;
    let mut a9 = record("req_a9", 10);
    a9.session = "a".to_string();
    a9.seq = 9;
    store.insert(&[later, b2, b1, a9]).expect("insert");
    let ids: Vec<String> = store
        .records(&Query::default())
        .expect("records")
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    assert_eq!(ids, ["req_a9", "req_b1", "req_b2", "req_later"]);
}

#[test]
fn since_is_inclusive_and_until_exclusive() {
    let (_dir, mut store) = open_temp();
    let batch: Vec<Record> = (0..5)
        .map(|i| record(&format!("req_{i}"), 100 + i))
        .collect();
    store.insert(&batch).expect("insert");
    let ids = |q: Query| -> Vec<i64> {
        store
            .records(&q)
            .expect("records")
            .into_iter()
            .map(|r| r.created_ms)
            .collect()
    };
    assert_eq!(ids(window(Some(101), Some(103))), [101, 102]);
    assert_eq!(ids(window(Some(104), None)), [104]);
    assert_eq!(ids(window(None, Some(101))), [100]);
    assert_eq!(ids(window(Some(103), Some(103))), Vec::<i64>::new());
    assert_eq!(ids(window(None, None)).len(), 5);
    let total = store
        .summary(&window(Some(101), Some(103)), None)
        .expect("summary");
    assert_eq!(total.len(), 1);
    assert_eq!(total[0].requests, 2);
}

fn grouped_batch() -> Vec<Record> {
    let mut a = record("req_a", 1);
    let mut b = record("req_b", 2);
    b.key_id = "k2".to_string();
    b.model = Some("unknown-model".to_string());
    b.cost_usd = None;
    b.status = Status::Failed;
    b.estimated = true;
    let mut c = record("req_c", 3);
    c.key_id = "k2".to_string();
    c.cost_usd = Some(0.5);
    c.status = Status::ClientCancelled;
    a.tokens.input = 1000;
    let mut d = record("req_d", 4);
    d.account_id = None;
    d.model = None;
    d.status = Status::Rejected;
    d.cost_usd = None;
    d.tokens = Tokens::default();
    vec![a, b, c, d]
}

#[test]
fn summary_sums_per_key() {
    let (_dir, mut store) = open_temp();
    store.insert(&grouped_batch()).expect("insert");
    let rows = store
        .summary(&Query::default(), Some(GroupBy::Key))
        .expect("summary");
    let groups: Vec<Option<&str>> = rows.iter().map(|r| r.group.as_deref()).collect();
    assert_eq!(groups, [Some("k1"), Some("k2")]);
    let (k1, k2) = (&rows[0], &rows[1]);
    assert_eq!((k1.requests, k1.input, k1.cached_input), (2, 1000, 40));
    assert_eq!((k1.output, k1.reasoning), (20, 5));
    assert!((k1.cost_usd - 0.001).abs() < 1e-12);
    assert_eq!((k1.unpriced, k1.estimated), (1, 0));
    let k1_status: Vec<(&str, u64)> = k1.by_status.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    assert_eq!(k1_status, [("completed", 1), ("rejected", 1)]);
    assert_eq!(
        (k2.requests, k2.input, k2.unpriced, k2.estimated),
        (2, 200, 1, 1)
    );
    assert!((k2.cost_usd - 0.5).abs() < 1e-12);
    assert_eq!(k2.by_status.get("failed"), Some(&1));
    assert_eq!(k2.by_status.get("client_cancelled"), Some(&1));
}

#[test]
fn summary_groups_missing_values_under_none() {
    let (_dir, mut store) = open_temp();
    store.insert(&grouped_batch()).expect("insert");
    let by_model = store
        .summary(&Query::default(), Some(GroupBy::Model))
        .expect("summary");
    let groups: Vec<Option<&str>> = by_model.iter().map(|r| r.group.as_deref()).collect();
    assert_eq!(groups, [None, Some("gpt-5"), Some("unknown-model")]);
    assert_eq!(by_model[1].requests, 2);
    let by_account = store
        .summary(&Query::default(), Some(GroupBy::Account))
        .expect("summary");
    assert_eq!(by_account[0].group, None);
    assert_eq!(by_account[0].by_status.get("rejected"), Some(&1));
    assert_eq!(by_account[1].requests, 3);
}

#[test]
fn ungrouped_summary_is_the_total_even_when_empty() {
    let (_dir, mut store) = open_temp();
    let empty = store.summary(&Query::default(), None).expect("summary");
    assert_eq!(empty, [SummaryRow::default()]);
    assert!(store
        .summary(&Query::default(), Some(GroupBy::Key))
        .expect("summary")
        .is_empty());
    store.insert(&grouped_batch()).expect("insert");
    let rows = store.summary(&Query::default(), None).expect("summary");
    let mut by_key = SummaryRow::default();
    for row in store
        .summary(&Query::default(), Some(GroupBy::Key))
        .expect("summary")
    {
        by_key.add(&row);
    }
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].requests, 4);
    assert_eq!(rows[0].by_status, by_key.by_status);
    assert_eq!(rows[0].input, by_key.input);
    assert!((rows[0].cost_usd - 0.501).abs() < 1e-12);
}

/// WAL: a reader holding a snapshot neither blocks the writer's commit nor sees it until
/// it starts a new read. In rollback-journal mode the commit would wait out the busy timeout.
#[test]
fn a_reader_and_a_writer_work_at_once() {
    let (dir, mut writer) = open_temp();
    writer.insert(&[record("req_1", 1)]).expect("insert");
    let reader = Store::open_read_only(&dir.path().join("usage.db")).expect("reader");
    writer
        .conn
        .busy_timeout(Duration::from_millis(1))
        .expect("timeout");
    let snapshot = reader.conn.unchecked_transaction().expect("read tx");
    assert_eq!(reader.records(&Query::default()).expect("read").len(), 1);
    writer
        .insert(&[record("req_2", 2)])
        .expect("commit while a reader holds a snapshot");
    assert_eq!(reader.records(&Query::default()).expect("read").len(), 1);
    snapshot.finish().expect("end read tx");
    assert_eq!(reader.records(&Query::default()).expect("read").len(), 2);
    let mode: String = reader
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
}

#[test]
fn records_survive_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.db");
    {
        let mut store = Store::open(&path).expect("open");
        store.insert(&[full_record()]).expect("insert");
    }
    let store = Store::open(&path).expect("reopen");
    assert_eq!(store.schema_version().expect("version"), SCHEMA_VERSION);
    assert_eq!(
        store.records(&Query::default()).expect("records"),
        [full_record()]
    );
    drop(store);
    let reader = Store::open_read_only(&path).expect("read only");
    assert_eq!(reader.records(&Query::default()).expect("records").len(), 1);
}

#[test]
fn opening_in_a_missing_directory_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope").join("usage.db");
    let err = Store::open(&path).err().expect("must fail");
    assert!(matches!(err, StoreError::MissingDir { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(!dir.path().join("nope").exists());
}

#[test]
fn reading_a_missing_store_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.db");
    let err = Store::open_read_only(&path).err().expect("must fail");
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(!path.exists());
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.db");
    let store = Store::open(&path).expect("open");
    store
        .conn
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .expect("bump");
    drop(store);
    let err = Store::open(&path).err().expect("writer refuses");
    assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
    let err = Store::open_read_only(&path).err().expect("reader refuses");
    assert!(matches!(err, StoreError::NewerSchema { .. }), "{err}");
}

#[test]
fn a_foreign_database_is_not_read_as_a_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.db");
    let conn = Connection::open(&path).expect("open");
    conn.execute_batch("CREATE TABLE t (x INTEGER)")
        .expect("create");
    drop(conn);
    let err = Store::open_read_only(&path).err().expect("must fail");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
}
