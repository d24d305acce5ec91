//! The embedded stack's ClickHouse endpoint (chdb-http) with the `clickhouse`
//! crate at its default settings: lz4-compressed inserts (`decompress=1`,
//! ClickHouse's compressed blocks with CityHash128 checksums), schema
//! validation of typed rows (`RowBinaryWithNamesAndTypes`), server-side
//! parameters sent as `multipart/form-data`. Python's clickhouse-connect has
//! its own tests in compose/chdb-server/test_clients.py.

use clickhouse::{Client, Row};
use conformance::{Stack, StackOptions};
use serde::{Deserialize, Serialize};

fn client(stack: &Stack) -> Client {
    let endpoints = stack.endpoints();
    Client::default()
        .with_url(&endpoints.clickhouse_url)
        .with_user(&endpoints.clickhouse_user)
        .with_password(&endpoints.clickhouse_password)
}

#[derive(Debug, PartialEq, Row, Serialize, Deserialize)]
struct Event {
    id: u64,
    name: String,
    at_ns: i64,
    tags: Vec<String>,
    attributes: Vec<(String, String)>,
    score: Option<f64>,
}

fn event(id: u64) -> Event {
    Event {
        id,
        name: format!("event {id}"),
        at_ns: 1_780_000_000_123_456_789 + id as i64,
        tags: vec!["a".into(), format!("t{id}")],
        attributes: vec![("k".into(), format!("v{id}"))],
        score: id.is_multiple_of(2).then_some(id as f64 / 2.0),
    }
}

const CREATE_EVENTS: &str = "CREATE TABLE {table} (id UInt64, name String, \
     at_ns DateTime64(9), tags Array(LowCardinality(String)), \
     attributes Map(LowCardinality(String), String), score Nullable(Float64)) \
     ENGINE = MergeTree ORDER BY id";

async fn create(client: &Client, table: &str) {
    client
        .query(&CREATE_EVENTS.replace("{table}", table))
        .execute()
        .await
        .unwrap();
}

async fn insert_events(client: &Client, table: &str, ids: std::ops::Range<u64>) {
    let mut insert = client.insert::<Event>(table).await.unwrap();
    for id in ids {
        insert.write(&event(id)).await.unwrap();
    }
    insert.end().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn typed_rows_go_in_and_come_out_with_and_without_validation() {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let validating = client(&stack);
    let plain = client(&stack).with_validation(false);
    create(&validating, "events").await;

    insert_events(&validating, "events", 0..3).await;
    insert_events(&plain, "events", 3..5).await;

    for client in [&validating, &plain] {
        let rows = client
            .query("SELECT ?fields FROM events ORDER BY id")
            .fetch_all::<Event>()
            .await
            .unwrap();
        assert_eq!(rows, (0..5).map(event).collect::<Vec<_>>());
    }

    // Validation catches a row type that does not match the table.
    #[derive(Debug, Row, Serialize, Deserialize)]
    struct WrongType {
        id: String,
    }
    let error = validating
        .query("SELECT ?fields FROM events")
        .fetch_all::<WrongType>()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("id"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_parameters_and_compressed_answers() {
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let client = client(&stack);
    // `.param()` is sent as multipart/form-data fields.
    let (sum, text) = client
        .query("SELECT {x:UInt32} + 1, concat({s:String}, '!')")
        .param("x", 41)
        .param("s", "it's")
        .fetch_one::<(u64, String)>()
        .await
        .unwrap();
    assert_eq!((sum, text.as_str()), (42, "it's!"));

    // With the server's response compression on, the answer comes back as
    // `Content-Encoding: lz4` (the client asks for it by default).
    let compressed = client.clone().with_setting("enable_http_compression", "1");
    let numbers = compressed
        .query("SELECT number FROM system.numbers LIMIT 100000")
        .fetch_all::<u64>()
        .await
        .unwrap();
    assert_eq!(numbers, (0..100_000).collect::<Vec<_>>());

    // Errors keep ClickHouse's code and message.
    let error = client
        .query("SELECT * FROM no_such_table")
        .fetch_all::<u64>()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("UNKNOWN_TABLE"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_rows_in_one_insert() {
    #[derive(Row, Serialize)]
    struct Small {
        id: u64,
        label: String,
    }
    let stack = Stack::start(StackOptions::isolated()).unwrap();
    let client = client(&stack);
    client
        .query("CREATE TABLE large (id UInt64, label String) ENGINE = MergeTree ORDER BY id")
        .execute()
        .await
        .unwrap();
    const ROWS: u64 = 1_000_000;
    let mut insert = client.insert::<Small>("large").await.unwrap();
    for id in 0..ROWS {
        let label = format!("row-{}", id % 1000);
        insert.write(&Small { id, label }).await.unwrap();
    }
    insert.end().await.unwrap();

    // The harness's own facade, called from async code.
    let clickhouse = stack.clickhouse();
    let counted = clickhouse
        .count("SELECT count() FROM default.large")
        .unwrap();
    let summed = clickhouse
        .count("SELECT sum(id) FROM default.large")
        .unwrap();
    assert_eq!((counted, summed), (ROWS, ROWS * (ROWS - 1) / 2));
}
