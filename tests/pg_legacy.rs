//! Legacy PostgreSQL databases as they are: partitioned tables, inheritance
//! parents, keyless and unlogged tables, relations that cannot be
//! published. Every test checks that each committed change arrives (per
//! operation) and that the app's own UPDATE and DELETE on every table of
//! the database still work after unilog's setup.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value as Json;
use support::*;

const WAIT: Duration = Duration::from_secs(120);

/// Events of `topic`, decoded: (key, event) in Kafka order per partition.
async fn events(stack: &Stack, topic: &str, min: usize) -> Vec<(Option<String>, Json)> {
    let records = consume(&stack.brokers, topic, min, Duration::from_secs(2), WAIT).await;
    let mut dec = Decoder::new(&stack.registry);
    let mut out = Vec::new();
    for r in &records {
        out.push((r.key.clone(), dec.decode(&r.payload).await));
    }
    out
}

/// (op, key, source.table) of each event, sorted, for comparing sets.
fn summary(events: &[(Option<String>, Json)]) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = events
        .iter()
        .map(|(k, e)| {
            (
                e["op"].as_str().unwrap_or_default().to_string(),
                k.clone().unwrap_or_default(),
                e["source"]["table"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The app's UPDATE and DELETE work on every table of the database: each
/// is planned and started (PostgreSQL refuses them at start, before any
/// row, when a publication makes them impossible), touching no row.
async fn assert_app_writes_work(db: &TestDb) {
    let admin = connect(&with_database(&db.admin_url, &db.name)).await;
    let tables = admin
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), (SELECT format('%I', attname) FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum LIMIT 1)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'",
            &[],
        )
        .await
        .expect("list tables");
    assert!(!tables.is_empty());
    for t in tables {
        let (name, col): (String, String) = (t.get(0), t.get(1));
        for sql in [
            format!("UPDATE {name} SET {col} = {col} WHERE false"),
            format!("DELETE FROM {name} WHERE false"),
        ] {
            if let Err(e) = db.client.batch_execute(&sql).await {
                panic!("the app's `{sql}` fails after unilog's setup: {e:?}");
            }
        }
    }
}

/// Starts `fx`'s pipeline in this process and waits until it streams.
async fn streaming(fx: &Fixture, db: &TestDb) -> Running {
    let run = Running::start(fx);
    db.wait_streaming(&fx.slot, WAIT).await;
    run
}

/// `unilog check` accepts `fx`.
fn check_passes(fx: &Fixture) {
    let (code, err) = unilog("check", fx);
    assert_eq!(code, Some(0), "{err}");
}

/// Runs `unilog <cmd>` and returns (exit code, stderr).
fn unilog(cmd: &str, fx: &Fixture) -> (Option<i32>, String) {
    let out = unilog_output(&[cmd], &fx.config);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mapping(table: &str, topic: &str, extra: &str) -> String {
    format!("table: {table}\ntopic: {topic}\nevents: {{insert: Created, update: Changed, delete: Removed}}\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_table_publishes_every_partition_under_its_own_name() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE orders (id bigint NOT NULL, region text NOT NULL, amount int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
             CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
             CREATE TABLE orders_us PARTITION OF orders FOR VALUES IN ('us') PARTITION BY RANGE (id);
             CREATE TABLE orders_us_low PARTITION OF orders_us FOR VALUES FROM (0) TO (1000);
             CREATE TABLE orders_us_high PARTITION OF orders_us FOR VALUES FROM (1000) TO (MAXVALUE);
             CREATE TABLE orders_other PARTITION OF orders DEFAULT;
             INSERT INTO orders VALUES (1, 'eu', 10), (2, 'us', 20), (2000, 'us', 30), (3, 'jp', 40);",
        )
        .await
        .unwrap();
    let topic = format!("it.orders.{}", suffix());
    let fx = Fixture::new(
        &stack,
        &db,
        &[("orders.yaml", mapping("orders", &topic, ""))],
        "",
    );
    check_passes(&fx);
    let run = streaming(&fx, &db).await;
    db.client
        .batch_execute(
            "INSERT INTO orders VALUES (4, 'eu', 1), (5, 'us', 2), (6, 'br', 3);
             UPDATE orders SET amount = amount + 1 WHERE id IN (1, 2, 3);
             UPDATE orders_us_high SET amount = 0;
             DELETE FROM orders WHERE id = 4;
             -- a partition created while running, and one attached
             CREATE TABLE orders_asia PARTITION OF orders FOR VALUES IN ('cn', 'in');
             INSERT INTO orders VALUES (7, 'cn', 5);
             CREATE TABLE orders_au (LIKE orders INCLUDING ALL);
             ALTER TABLE orders ATTACH PARTITION orders_au FOR VALUES IN ('au');
             INSERT INTO orders VALUES (8, 'au', 6);
             -- a row that moves between partitions
             UPDATE orders SET region = 'eu' WHERE id = 6;
             -- detaching publishes nothing
             ALTER TABLE orders DETACH PARTITION orders_eu;
             INSERT INTO orders VALUES (9, 'in', 7);",
        )
        .await
        .unwrap();
    assert_app_writes_work(&db).await;
    let got = events(&stack, &topic, 17).await;
    let stats = run.stop().await;
    assert_eq!(
        stats.snapshot_rows, 4,
        "the snapshot copies each partition once"
    );
    let s = summary(&got);
    // Every event carries the partitioned table's name.
    assert!(s.iter().all(|(_, _, t)| t == "orders"), "{s:?}");
    let ops: BTreeMap<String, usize> = s.iter().fold(BTreeMap::new(), |mut m, (op, _, _)| {
        *m.entry(op.clone()).or_default() += 1;
        m
    });
    // snapshot 4; inserts 4,5,6,7,8,9 = 6; updates 1,2,3 + 2000 = 4;
    // the moved row: a delete and an insert (pgoutput's row movement); delete 4.
    assert_eq!(
        ops,
        BTreeMap::from([
            ("snapshot".to_string(), 4),
            ("insert".to_string(), 7),
            ("update".to_string(), 4),
            ("delete".to_string(), 2),
        ]),
        "{s:?}"
    );
    let deleted: Vec<&String> = s
        .iter()
        .filter(|(op, _, _)| op == "delete")
        .map(|(_, k, _)| k)
        .collect();
    assert_eq!(
        deleted,
        ["[\"4\",\"eu\"]", "[\"6\",\"br\"]"],
        "detach published deletes: {s:?}"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyless_table_is_refused_with_the_ways_out_and_the_app_keeps_writing() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE audit (at timestamptz NOT NULL DEFAULT now(), who text, what text);
             CREATE TABLE tags (name text NOT NULL, color text);
             CREATE UNIQUE INDEX tags_name ON tags (name);
             CREATE TABLE measures (sensor int, value float8) PARTITION BY RANGE (sensor);
             CREATE TABLE measures_low PARTITION OF measures FOR VALUES FROM (0) TO (100);
             CREATE TABLE measures_rest PARTITION OF measures DEFAULT;
             INSERT INTO audit (who, what) VALUES ('a', 'login');
             INSERT INTO tags VALUES ('red', 'ff0000');",
        )
        .await
        .unwrap();
    let (ta, tt, tm) = (
        format!("it.audit.{}", suffix()),
        format!("it.tags.{}", suffix()),
        format!("it.measures.{}", suffix()),
    );
    let mappings = [
        ("audit.yaml", mapping("audit", &ta, "key: [who]\n")),
        ("tags.yaml", mapping("tags", &tt, "key: [name]\n")),
        ("measures.yaml", mapping("measures", &tm, "key: [sensor]\n")),
    ];
    let fx = Fixture::new(&stack, &db, &mappings, "");
    for cmd in ["check", "run"] {
        let (code, err) = unilog(cmd, &fx);
        assert_eq!(code, Some(if cmd == "check" { 2 } else { 1 }), "{err}");
        for needle in [
            "3 problems found",
            "audit.yaml:1: field `table`: public.audit has no primary key and no replica identity",
            "cannot update table ... because it does not have a replica identity",
            "`ALTER TABLE \"public\".\"audit\" REPLICA IDENTITY FULL;` (every UPDATE and DELETE then also writes the whole old row",
            "`insert_only: true` in this mapping",
            "no unique index on NOT NULL columns exists today",
            "tags.yaml:1: field `table`: public.tags has no primary key",
            "`ALTER TABLE \"public\".\"tags\" REPLICA IDENTITY USING INDEX \"tags_name\";` (the unique index on NOT NULL column(s) name",
            "measures.yaml:1: field `table`: public.measures_low has no primary key",
            "the same holds for 1 more table(s) below public.measures: public.measures_rest",
            "partitions created later start without a replica identity too",
            "set_replica_identity",
        ] {
            assert!(err.contains(needle), "`{cmd}` lacks {needle:?}:\n{err}");
        }
    }
    // Nothing was set up, and the app writes as before.
    let pubs: i64 = db
        .client
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pubs, 0);
    assert_app_writes_work(&db).await;

    // The ways out: audit is insert-only; unilog sets the others' identity.
    std::fs::write(
        fx.dir.path().join("audit.yaml"),
        "table: audit\ntopic: TOPIC\ninsert_only: true\nkey: [who]\nevents: {insert: Audited}\n"
            .replace("TOPIC", &ta),
    )
    .unwrap();
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        text.replace(
            "    snapshot: initial\n",
            "    snapshot: initial\n    set_replica_identity: index_or_full\n",
        ),
    )
    .unwrap();
    let (code, out) = unilog("check", &fx);
    assert_eq!(code, Some(0), "{out}");
    let report =
        String::from_utf8_lossy(&unilog_output(&["check"], &fx.config).stdout).into_owned();
    for needle in [
        "public.audit (table): inserts only, through the insert-only publication; the app's UPDATE and DELETE keep working",
        "REPLICA IDENTITY USING INDEX \"tags_name\"",
        "ALTER TABLE \"public\".\"measures_low\" REPLICA IDENTITY FULL",
    ] {
        assert!(report.contains(needle), "check report lacks {needle:?}:\n{report}");
    }
    let run = streaming(&fx, &db).await;
    assert_app_writes_work(&db).await;
    db.client
        .batch_execute(
            "INSERT INTO audit (who, what) VALUES ('b', 'logout');
             UPDATE audit SET what = 'x';
             DELETE FROM audit WHERE who = 'a';
             INSERT INTO tags VALUES ('blue', '0000ff');
             UPDATE tags SET color = '00f' WHERE name = 'blue';
             DELETE FROM tags WHERE name = 'red';
             INSERT INTO measures VALUES (1, 1.5), (500, 2.5);
             UPDATE measures SET value = 0;
             DELETE FROM measures WHERE sensor = 1;",
        )
        .await
        .unwrap();
    let audit = summary(&events(&stack, &ta, 2).await);
    let tags = summary(&events(&stack, &tt, 4).await);
    let measures = summary(&events(&stack, &tm, 5).await);
    run.stop().await;
    assert_eq!(
        audit,
        [
            ("insert".to_string(), "b".to_string(), "audit".to_string()),
            ("snapshot".to_string(), "a".to_string(), "audit".to_string())
        ]
    );
    let ops = |s: &[(String, String, String)]| {
        s.iter()
            .map(|x| format!("{}:{}", x.0, x.1))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ops(&tags),
        ["delete:red", "insert:blue", "snapshot:red", "update:blue"]
    );
    assert_eq!(
        ops(&measures),
        [
            "delete:1",
            "insert:1",
            "insert:500",
            "update:1",
            "update:500"
        ]
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relations_that_cannot_be_replicated_are_refused_by_name() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE users (id int PRIMARY KEY, name text);
             CREATE UNLOGGED TABLE sessions (id int PRIMARY KEY, token text);
             CREATE VIEW active_users AS SELECT * FROM users;
             CREATE MATERIALIZED VIEW user_counts AS SELECT count(*) AS n FROM users;
             CREATE SEQUENCE ticket_seq;",
        )
        .await
        .unwrap();
    let s = suffix();
    let mappings = [
        ("users.yaml", mapping("users", &format!("it.u.{s}"), "")),
        (
            "sessions.yaml",
            mapping("sessions", &format!("it.s.{s}"), ""),
        ),
        (
            "active.yaml",
            mapping("active_users", &format!("it.a.{s}"), "key: [id]\n"),
        ),
        (
            "counts.yaml",
            mapping("user_counts", &format!("it.c.{s}"), "key: [n]\n"),
        ),
        (
            "seq.yaml",
            mapping("ticket_seq", &format!("it.q.{s}"), "key: [x]\n"),
        ),
        (
            "gone.yaml",
            mapping("no_such_table", &format!("it.g.{s}"), ""),
        ),
    ];
    let fx = Fixture::new(&stack, &db, &mappings, "");
    for (cmd, want) in [("check", 2), ("run", 1)] {
        let (code, err) = unilog(cmd, &fx);
        assert_eq!(code, Some(want), "{err}");
        for needle in [
            "5 problems found",
            "sessions.yaml:1: field `table`: public.sessions is an UNLOGGED table: its changes are not written to the WAL",
            "`ALTER TABLE \"public\".\"sessions\" SET LOGGED;`",
            "active.yaml:1: field `table`: public.active_users is a view",
            "map the tables it reads from instead",
            "counts.yaml:1: field `table`: public.user_counts is a materialized view",
            "seq.yaml:1: field `table`: public.ticket_seq is a sequence, not a table",
            "gone.yaml:1: field `table`: table public.no_such_table does not exist",
        ] {
            assert!(err.contains(needle), "`{cmd}` lacks {needle:?}:\n{err}");
        }
        assert!(!err.contains("users.yaml"), "{err}");
    }
    let slots: i64 = connect(&db.admin_url)
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "a refused start created a slot");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inheritance_parent_covers_its_children_and_new_ones() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    // The trigger-routed monthly tables of an older app: the parent holds
    // no rows; each month is a child with its own primary key and a column
    // of its own.
    db.client
        .batch_execute(
            "CREATE TABLE events (id bigint PRIMARY KEY, day date NOT NULL, body text);
             CREATE TABLE events_2026_11 (CHECK (day < '2026-12-01'), extra int) INHERITS (events);
             ALTER TABLE events_2026_11 ADD PRIMARY KEY (id);
             CREATE TABLE events_2026_12 (CHECK (day >= '2026-12-01')) INHERITS (events);
             ALTER TABLE events_2026_12 ADD PRIMARY KEY (id);
             CREATE FUNCTION events_route() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               EXECUTE format('INSERT INTO %I SELECT ($1).*', 'events_' || to_char(NEW.day, 'YYYY_MM')) USING NEW;
               RETURN NULL;
             END $$;
             CREATE TRIGGER events_route BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION events_route();
             INSERT INTO events VALUES (1, '2026-11-05', 'a'), (2, '2026-12-01', 'b');",
        )
        .await
        .unwrap();
    let topic = format!("it.events.{}", suffix());
    let fx = Fixture::new(
        &stack,
        &db,
        &[("events.yaml", mapping("events", &topic, ""))],
        "",
    );
    check_passes(&fx);
    let run = streaming(&fx, &db).await;
    db.client
        .batch_execute(
            "INSERT INTO events VALUES (3, '2026-11-20', 'c'), (4, '2026-12-24', 'd');
             UPDATE events SET body = 'B' WHERE id = 2;
             UPDATE events_2026_11 SET extra = 1;
             DELETE FROM events WHERE id = 3;",
        )
        .await
        .unwrap();
    // A new month, filled at once: its first rows are in the table before
    // unilog adds it to the publication.
    db.client
        .batch_execute(
            "CREATE TABLE events_2027_01 (CHECK (day >= '2027-01-01')) INHERITS (events);
             ALTER TABLE events_2027_01 ADD PRIMARY KEY (id);
             INSERT INTO events_2027_01 VALUES (5, '2027-01-01', 'e'), (6, '2027-01-02', 'f');",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    db.client
        .batch_execute(
            "INSERT INTO events_2027_01 VALUES (7, '2027-01-03', 'g');
             UPDATE events SET body = 'F' WHERE id = 6;
             DELETE FROM events WHERE id = 5;",
        )
        .await
        .unwrap();
    assert_app_writes_work(&db).await;
    let got = events(&stack, &topic, 13).await;
    let stats = run.stop().await;
    assert_eq!(stats.snapshot_rows, 2);
    let s: Vec<String> = summary(&got)
        .into_iter()
        .map(|(op, k, t)| format!("{op}:{k}:{t}"))
        .collect();
    assert_eq!(
        s,
        [
            "delete:3:events_2026_11",
            "delete:5:events_2027_01",
            "insert:3:events_2026_11",
            "insert:4:events_2026_12",
            "insert:7:events_2027_01",
            "snapshot:1:events_2026_11",
            "snapshot:2:events_2026_12",
            "snapshot:5:events_2027_01",
            "snapshot:6:events_2027_01",
            "update:1:events_2026_11",
            "update:2:events_2026_12",
            "update:3:events_2026_11",
            "update:6:events_2027_01",
        ],
        "{got:#?}"
    );
    // Events have the parent's fields only, whatever the child has more.
    let (_, ev) = &got[0];
    let fields: Vec<&String> = ev["after"]
        .as_object()
        .or_else(|| ev["before"].as_object())
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(fields, ["body", "day", "id"], "{ev}");
    db.cleanup().await;
}

/// Every kind of column a legacy schema has, in the snapshot and in the
/// stream: the two paths must give the same values.
const EVERY_TYPE_DDL: &str = "
CREATE DOMAIN positive_int AS int CHECK (VALUE > 0);
CREATE DOMAIN price AS numeric(10,2);
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE address AS (street text, zip int, tags text[]);
CREATE TABLE every_type (
    id int PRIMARY KEY,
    big_num numeric(50,10),
    any_num numeric,
    strict_num numeric(10,2),
    dom positive_int,
    dom_num price,
    moods mood[],
    grid int[][],
    addr address,
    addrs address[],
    span int4range,
    spans int4multirange,
    kv hstore,
    ci citext,
    tree ltree,
    geom geometry(Point, 4326),
    geog geography,
    cash money,
    ts_inf timestamptz,
    d_inf date,
    loc_inf timestamp,
    doubled int GENERATED ALWAYS AS (id * 2) STORED,
    ident bigint GENERATED ALWAYS AS IDENTITY,
    pt point,
    iv interval,
    bits bit varying(8),
    tsv tsvector,
    lsn pg_lsn,
    doc xml,
    mac macaddr8,
    ch \"char\",
    fixed char(3),
    uuids uuid[]
);";

const EVERY_TYPE_VALUES: &str = "
    123456789012345678901234567890123456789.1234567890, 'NaN', 1.5, 5, 12.34,
    '{sad,happy}', '{{1,2},{3,NULL}}', ROW('Main St', 12345, '{a,\"b c\"}'),
    ARRAY[ROW('x', 1, NULL)::address, NULL], '[1,10)', '{[1,3), [5,7)}',
    'a=>1, \"b c\"=>NULL', 'MiXeD', 'top.science.astronomy',
    'SRID=4326;POINT(1 2)', 'POINT(3 4)', 1234.56, 'infinity', '-infinity', 'infinity',
    '(1,2)', '1 day 02:03:04', B'101', 'a fat cat', '16/B374D848', '<a>x</a>',
    '08:00:2b:01:02:03:04:05', 'x', 'ab', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_type_decodes_the_same_in_the_snapshot_and_the_stream() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    let admin = connect(&with_database(&db.admin_url, &db.name)).await;
    admin
        .batch_execute("CREATE EXTENSION hstore; CREATE EXTENSION citext; CREATE EXTENSION ltree; CREATE EXTENSION postgis;")
        .await
        .expect("extensions (scripts/stack installs PostGIS)");
    db.client.batch_execute(EVERY_TYPE_DDL).await.unwrap();
    let cols = "id, big_num, any_num, strict_num, dom, dom_num, moods, grid, addr, addrs, span, spans, kv, ci, tree, geom, geog, cash, ts_inf, d_inf, loc_inf, pt, iv, bits, tsv, lsn, doc, mac, ch, fixed, uuids";
    db.client
        .batch_execute(&format!(
            "INSERT INTO every_type ({cols}) VALUES (1, {EVERY_TYPE_VALUES})"
        ))
        .await
        .unwrap();
    let topic = format!("it.types.{}", suffix());
    let fx = Fixture::new(
        &stack,
        &db,
        &[("types.yaml", mapping("every_type", &topic, ""))],
        "",
    );
    let out = unilog_output(&["check"], &fx.config);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(
            "generated column(s) doubled are not published (PostgreSQL 15 does not send them"
        ),
        "{report}"
    );
    let run = streaming(&fx, &db).await;
    db.client
        .batch_execute(&format!(
            "INSERT INTO every_type ({cols}) VALUES (2, {EVERY_TYPE_VALUES});
             INSERT INTO every_type (id, strict_num) VALUES (3, 'NaN');
             INSERT INTO every_type (id) VALUES (4);"
        ))
        .await
        .unwrap();
    let got = events(&stack, &topic, 3).await;
    let dead = consume(
        &stack.brokers,
        &format!("unilog.{}.dead_letter", fx.name),
        1,
        Duration::from_secs(1),
        WAIT,
    )
    .await;
    run.stop().await;
    let by_id: BTreeMap<String, &Json> = got
        .iter()
        .map(|(k, e)| (k.clone().unwrap_or_default(), e))
        .collect();
    let mut snap = by_id["1"]["after"].clone();
    let mut live = by_id["2"]["after"].clone();
    assert_eq!(by_id["1"]["op"], "snapshot");
    assert_eq!(by_id["2"]["op"], "insert");
    for row in [&mut snap, &mut live] {
        let o = row.as_object_mut().unwrap();
        o.remove("id");
        o.remove("ident");
    }
    assert_eq!(snap, live, "the snapshot and the stream disagree");
    let expect: Json = serde_json::json!({
        "big_num": "123456789012345678901234567890123456789.1234567890",
        "any_num": "NaN",
        "strict_num": "unscaled:150",
        "dom": 5,
        "dom_num": "unscaled:1234",
        "moods": ["sad", "happy"],
        "grid": [[1, 2], [3, null]],
        "addr": {"street": "Main St", "zip": 12345, "tags": ["a", "b c"]},
        "addrs": [{"street": "x", "zip": 1, "tags": null}, null],
        "span": "[1,10)",
        "spans": "{[1,3),[5,7)}",
        "kv": "{\"a\":\"1\",\"b c\":null}",
        "ci": "MiXeD",
        "tree": "top.science.astronomy",
        "cash": "$1,234.56",
        "ts_inf": i64::MAX,
        "d_inf": i32::MIN,
        "loc_inf": i64::MAX,
        "pt": "(1,2)",
        "iv": "1 day 02:03:04",
        "bits": "101",
        "tsv": "'a' 'cat' 'fat'",
        "lsn": "16/B374D848",
        "doc": "<a>x</a>",
        "mac": "08:00:2b:01:02:03:04:05",
        "ch": "x",
        "fixed": "ab ",
        "uuids": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"],
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&snap[k], v, "column {k}: {snap}");
    }
    // PostGIS values are the EWKB a client gets from ST_AsEWKB.
    let ewkb: (String, String) = db
        .client
        .query_one("SELECT encode(ST_AsEWKB(geom), 'hex'), encode(ST_AsEWKB(geog::geometry), 'hex') FROM every_type WHERE id = 1", &[])
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(snap["geom"], Json::String(ewkb.0));
    assert_eq!(snap["geog"], Json::String(ewkb.1));
    assert!(
        snap.get("doubled").is_none(),
        "a generated column was published: {snap}"
    );
    // NaN cannot be a decimal(10,2): a dead letter saying what to do; the
    // next row arrives.
    assert!(by_id.contains_key("4"), "{by_id:?}");
    assert!(!by_id.contains_key("3"));
    let dl: Json = serde_json::from_slice(&dead[0].payload).unwrap();
    let why = dl["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("column `strict_num`") && why.contains("`type: string`"),
        "{dl}"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn odd_names_get_valid_avro_names_and_a_default_topic() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE SCHEMA \"Legacy App\";
             CREATE TABLE \"Legacy App\".\"Order Items.v2\" (\"Order ID\" int PRIMARY KEY, \"naïve\" text, \"select\" int, \"a-b\" text, \"Größe\" text);
             INSERT INTO \"Legacy App\".\"Order Items.v2\" VALUES (1, 'n', 2, 'x', 'L');
             CREATE SCHEMA \"my.schema\";
             CREATE TABLE \"my.schema\".t (id int PRIMARY KEY, \"user\" text);
             CREATE TABLE clash (id int PRIMARY KEY, \"a-b\" text, a_b text);",
        )
        .await
        .unwrap();
    let mappings = [
        (
            "items.yaml",
            "table: 'Legacy App.Order Items.v2'\nevents: {insert: A, update: B, delete: C}\n"
                .to_string(),
        ),
        (
            "dotted.yaml",
            "table: '\"my.schema\".t'\nevents: {insert: A, update: B, delete: C}\n".to_string(),
        ),
        (
            "clash.yaml",
            "table: clash\nevents: {insert: A, update: B, delete: C}\n".to_string(),
        ),
    ];
    let fx = Fixture::new(&stack, &db, &mappings, "");
    let (code, err) = unilog("check", &fx);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("clash.yaml")
            && err.contains("two columns are published as `a_b`; rename one"),
        "{err}"
    );
    assert!(
        !err.contains("items.yaml") && !err.contains("dotted.yaml"),
        "{err}"
    );
    std::fs::remove_file(fx.dir.path().join("clash.yaml")).unwrap();
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(&fx.config, text.replace("  - clash.yaml\n", "")).unwrap();
    let run = streaming(&fx, &db).await;
    db.client
        .batch_execute(
            "UPDATE \"Legacy App\".\"Order Items.v2\" SET \"naïve\" = 'm';
             INSERT INTO \"my.schema\".t VALUES (1, 'u');",
        )
        .await
        .unwrap();
    // The default topics have no random part: keep this run's events.
    let ours = |v: Vec<(Option<String>, Json)>| -> Vec<(Option<String>, Json)> {
        v.into_iter()
            .filter(|(_, e)| e["source"]["database"] == db.name.as_str())
            .collect()
    };
    let mut items = Vec::new();
    let mut dotted = Vec::new();
    let start = std::time::Instant::now();
    while (items.len() < 2 || dotted.is_empty()) && start.elapsed() < WAIT {
        items = ours(events(&stack, "Legacy_App.Order_Items.v2", 2).await);
        dotted = ours(events(&stack, "my.schema.t", 1).await);
    }
    run.stop().await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(
        items[1].1["after"],
        serde_json::json!({"Order_ID": 1, "na_ve": "m", "select": 2, "a_b": "x", "Gr__e": "L"})
    );
    assert_eq!(items[1].1["source"]["schema"], "Legacy App");
    assert_eq!(items[1].1["source"]["table"], "Order Items.v2");
    assert_eq!(dotted[0].1["source"]["schema"], "my.schema");
    // The schema keeps the original names.
    let schema: Json = reqwest_json(&format!(
        "{}/subjects/Legacy_App.Order_Items.v2-value/versions/latest",
        stack.registry
    ))
    .await;
    let text = schema["schema"].as_str().unwrap_or_default();
    for original in [
        "\"unilog.column\":\"Order ID\"",
        "\"unilog.column\":\"naïve\"",
        "\"unilog.column\":\"Größe\"",
    ] {
        assert!(text.contains(original), "{text}");
    }
    db.cleanup().await;
}

async fn reqwest_json(url: &str) -> Json {
    reqwest::get(url)
        .await
        .expect("registry")
        .json()
        .await
        .unwrap_or(Json::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_would_publish_nothing_is_refused_with_the_sql() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE orders (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
             CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
             CREATE TABLE logs (id int PRIMARY KEY, day date);
             CREATE TABLE logs_2026 () INHERITS (logs);
             ALTER TABLE logs_2026 ADD PRIMARY KEY (id);
             CREATE TABLE totals (id int PRIMARY KEY, n int, twice int GENERATED ALWAYS AS (n * 2) STORED);",
        )
        .await
        .unwrap();
    let s = suffix();
    let mappings = [
        ("orders.yaml", mapping("orders", &format!("it.o.{s}"), "")),
        ("eu.yaml", mapping("orders_eu", &format!("it.e.{s}"), "")),
        ("logs.yaml", mapping("logs", &format!("it.l.{s}"), "")),
        (
            "logs2026.yaml",
            mapping("logs_2026", &format!("it.l26.{s}"), ""),
        ),
        (
            "totals.yaml",
            mapping(
                "totals",
                &format!("it.t.{s}"),
                "columns:\n  id:\n  twice:\n",
            ),
        ),
    ];
    let fx = Fixture::new(&stack, &db, &mappings, "");
    let (code, err) = unilog("check", &fx);
    assert_eq!(code, Some(2), "{err}");
    for needle in [
        "eu.yaml:1: field `table`: public.orders_eu is a partition of public.orders, which is mapped too",
        "logs.yaml:1: field `table`: public.logs_2026 is an inheritance child of public.logs, whose mapping publishes its children's rows too",
        "totals.yaml:6: field `columns.twice`: column `twice` of public.totals is a generated column",
    ] {
        assert!(err.contains(needle), "check lacks {needle:?}:\n{err}");
    }
    // A user-managed publication that would hide changes.
    let fx = Fixture::new(
        &stack,
        &db,
        &[
            ("orders.yaml", mapping("orders", &format!("it.o.{s}"), "")),
            (
                "logs.yaml",
                mapping("logs", &format!("it.l.{s}"), "children: exclude\n"),
            ),
        ],
        "",
    );
    let publication = format!("unilog_{}", fx.name);
    db.client
        .batch_execute(&format!(
            "CREATE PUBLICATION {publication} FOR TABLE orders, ONLY logs WITH (publish = 'insert, update')"
        ))
        .await
        .unwrap();
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        text.replace(
            "    snapshot: initial\n",
            "    snapshot: initial\n    manage_publication: false\n",
        ),
    )
    .unwrap();
    let (code, err) = unilog("check", &fx);
    assert_eq!(code, Some(2), "{err}");
    for needle in [
        &format!("publication `{publication}` does not publish every kind of change (insert true, update true, delete false, truncate false), so some committed changes would never reach Kafka; run `ALTER PUBLICATION \"{publication}\" SET (publish = 'insert, update, delete, truncate')`"),
        &format!("publication `{publication}` publishes the changes of a partitioned table under the names of its partitions (publish_via_partition_root is off), so the mapping of the partitioned table would see none of them; run `ALTER PUBLICATION \"{publication}\" SET (publish_via_partition_root = true)`"),
    ] {
        assert!(err.contains(needle.as_str()), "check lacks {needle:?}:\n{err}");
    }
    // Managed, unilog corrects it, and the partitions' changes arrive.
    std::fs::write(&fx.config, text).unwrap();
    let out = unilog_output(&["check"], &fx.config);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("would run ALTER PUBLICATION")
            && report.contains("publish_via_partition_root = true"),
        "{report}"
    );
    let run = streaming(&fx, &db).await;
    db.client
        .batch_execute("INSERT INTO orders VALUES (1, 'eu'); DELETE FROM orders; INSERT INTO logs_2026 VALUES (1, now()); INSERT INTO logs VALUES (2, now());")
        .await
        .unwrap();
    let orders = summary(&events(&stack, &format!("it.o.{s}"), 2).await);
    let logs = summary(&events(&stack, &format!("it.l.{s}"), 1).await);
    run.stop().await;
    assert_eq!(orders.len(), 2, "{orders:?}");
    assert!(orders.iter().all(|(_, _, t)| t == "orders"), "{orders:?}");
    // children: exclude: the parent's own row only.
    assert_eq!(
        logs,
        [("insert".to_string(), "2".to_string(), "logs".to_string())]
    );
    // A partition mapped on its own is published under its own name.
    let leaf_topic = format!("it.leaf.{s}");
    let fx = Fixture::new(
        &stack,
        &db,
        &[("eu.yaml", mapping("orders_eu", &leaf_topic, ""))],
        "",
    );
    let run = streaming(&fx, &db).await;
    db.client
        .batch_execute("INSERT INTO orders VALUES (7, 'eu'); UPDATE orders_eu SET id = 8;")
        .await
        .unwrap();
    let leaf = summary(&events(&stack, &leaf_topic, 3).await);
    run.stop().await;
    assert_eq!(
        leaf.iter()
            .map(|(op, k, t)| format!("{op}:{k}:{t}"))
            .collect::<Vec<_>>(),
        [
            "delete:[\"7\",\"eu\"]:orders_eu",
            "insert:[\"7\",\"eu\"]:orders_eu",
            "update:[\"8\",\"eu\"]:orders_eu"
        ],
        "a key-changing update: the old key's delete, then the update"
    );
    assert_app_writes_work(&db).await;
    db.cleanup().await;
}

/// Waits until `cond` holds for the process's warnings (as `/ready` reports them).
async fn wait_warnings(cond: impl Fn(&[String]) -> bool, what: &str) -> Vec<String> {
    let start = std::time::Instant::now();
    loop {
        let w = unilog::telemetry::health().warnings();
        if cond(&w) {
            return w;
        }
        assert!(start.elapsed() < Duration::from_secs(40), "{what}: {w:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_partition_without_replica_identity_is_reported_or_given_one() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE metrics (sensor int NOT NULL, v float8) PARTITION BY RANGE (sensor);
             CREATE TABLE metrics_a PARTITION OF metrics FOR VALUES FROM (0) TO (100);
             ALTER TABLE metrics_a REPLICA IDENTITY FULL;",
        )
        .await
        .unwrap();
    let topic = format!("it.metrics.{}", suffix());
    let fx = Fixture::new(
        &stack,
        &db,
        &[(
            "metrics.yaml",
            mapping("metrics", &topic, "key: [sensor]\n"),
        )],
        "",
    );
    let out = unilog_output(&["check"], &fx.config);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("WARNING: the partitioned table has no primary key, so a partition created later starts without a replica identity"), "{report}");
    let run = streaming(&fx, &db).await;
    db.client
        .batch_execute("CREATE TABLE metrics_b PARTITION OF metrics FOR VALUES FROM (100) TO (200)")
        .await
        .unwrap();
    let w = wait_warnings(
        |w| {
            w.iter().any(|x| {
                x.contains("public.metrics_b (published for the mapping of public.metrics)")
            })
        },
        "no warning about the new partition",
    )
    .await;
    assert!(
        w.iter().any(|x| x.contains("REPLICA IDENTITY FULL")),
        "{w:?}"
    );
    let status = unilog_output(&["status", "--json"], &fx.config);
    let status: Json = serde_json::from_slice(&status.stdout).unwrap_or(Json::Null);
    assert_eq!(
        status["tables_without_replica_identity"],
        serde_json::json!(["public.metrics_b"]),
        "{status}"
    );
    db.client
        .batch_execute("ALTER TABLE metrics_b REPLICA IDENTITY FULL")
        .await
        .unwrap();
    wait_warnings(
        |w| !w.iter().any(|x| x.contains("public.metrics_b")),
        "the warning stayed after the fix",
    )
    .await;
    run.stop().await;
    // With set_replica_identity, unilog gives new partitions one itself.
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        text.replace(
            "    snapshot: initial\n",
            "    snapshot: initial\n    set_replica_identity: index_or_full\n",
        ),
    )
    .unwrap();
    let run = streaming(&fx, &db).await;
    db.client
        .batch_execute("CREATE TABLE metrics_c PARTITION OF metrics FOR VALUES FROM (200) TO (300); INSERT INTO metrics VALUES (250, 1)")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let ident: String = db
            .client
            .query_one(
                "SELECT relreplident::text FROM pg_class WHERE relname = 'metrics_c'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if ident == "f" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "metrics_c got no replica identity"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    db.client
        .batch_execute(
            "UPDATE metrics SET v = 2 WHERE sensor = 250; DELETE FROM metrics WHERE sensor = 250",
        )
        .await
        .unwrap();
    assert_app_writes_work(&db).await;
    let got = summary(&events(&stack, &topic, 3).await);
    run.stop().await;
    let ops: Vec<&str> = got.iter().map(|(op, _, _)| op.as_str()).collect();
    assert_eq!(ops, ["delete", "insert", "update"], "{got:?}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn init_writes_a_pipeline_that_check_accepts_and_lists_what_needs_deciding() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE users (id bigint PRIMARY KEY, email text);
             CREATE TABLE categories (id int PRIMARY KEY, name text);
             CREATE TABLE tags (name text NOT NULL, color text);
             CREATE UNIQUE INDEX tags_name ON tags (name);
             ALTER TABLE tags REPLICA IDENTITY USING INDEX tags_name;
             CREATE TABLE audit (at timestamptz, what text);
             CREATE TABLE orders (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
             CREATE TABLE orders_eu PARTITION OF orders FOR VALUES IN ('eu');
             CREATE TABLE events (id int PRIMARY KEY, body text);
             CREATE TABLE events_1 () INHERITS (events);
             ALTER TABLE events_1 ADD PRIMARY KEY (id);
             CREATE UNLOGGED TABLE sessions (id int PRIMARY KEY);
             CREATE VIEW active_users AS SELECT * FROM users;
             CREATE TABLE \"Odd Name\" (\"Key\" int PRIMARY KEY);",
        )
        .await
        .unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(unilog_bin())
        .args(["init", "--url", &db.url, "--out"])
        .arg(out_dir.path())
        .args([
            "--name",
            "legacy",
            "--topic-prefix",
            &format!("it{}.", suffix()),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "with 6 mapping(s) ready",
        "2 partition(s) or child table(s) covered by the table above them",
        "3 table(s) need a decision",
        "  - public.audit: has no primary key and no replica identity (the ways out: mappings/public.audit.yaml)",
        "  - public.active_users: is a view (the ways out: mappings/public.active_users.yaml)",
        "  - public.sessions: is an UNLOGGED table (the ways out: mappings/public.sessions.yaml)",
    ] {
        assert!(stdout.contains(needle), "init output lacks {needle:?}:\n{stdout}");
    }
    let pipeline = std::fs::read_to_string(out_dir.path().join("pipeline.yaml")).unwrap();
    assert!(
        pipeline.contains("  # - 'mappings/public.audit.yaml'   # needs a decision"),
        "{pipeline}"
    );
    let categories =
        std::fs::read_to_string(out_dir.path().join("mappings/public.categories.yaml")).unwrap();
    assert!(
        categories.contains("insert: CategoryCreated"),
        "{categories}"
    );
    let tags = std::fs::read_to_string(out_dir.path().join("mappings/public.tags.yaml")).unwrap();
    assert!(tags.contains("key: ['name']"), "{tags}");
    // Again, without --force: refused, nothing overwritten.
    let again = std::process::Command::new(unilog_bin())
        .args(["init", "--url", &db.url, "--out"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("pass --force"));
    let check = std::process::Command::new(unilog_bin())
        .args(["check", "--config"])
        .arg(out_dir.path().join("pipeline.yaml"))
        .env("PG_URL", &db.url)
        .env("KAFKA_BROKERS", &stack.brokers)
        .env("SCHEMA_REGISTRY_URL", &stack.registry)
        .env_remove("KAFKA_REPLICATION_FACTOR")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    db.cleanup().await;
}

/// One table of the random workload: how to write it, and how its rows
/// look in the model and on the topic.
struct Shape {
    table: &'static str,
    topic: String,
    /// Names of the key columns, as the event's `after` has them.
    key: &'static [&'static str],
    insert_only: bool,
}

/// The model: per table, key -> value column.
type Model = BTreeMap<&'static str, BTreeMap<Vec<i64>, i64>>;

/// The final state of a topic: the last event of each key (a delete
/// removes it); insert-only topics keep every insert.
fn fold(shape: &Shape, events: &[(Option<String>, Json)]) -> BTreeMap<Vec<i64>, i64> {
    let mut out = BTreeMap::new();
    for (_, e) in events {
        let row = if e["op"] == "delete" {
            &e["before"]
        } else {
            &e["after"]
        };
        let key: Vec<i64> = shape
            .key
            .iter()
            .map(|k| row[*k].as_i64().unwrap_or(-1))
            .collect();
        match e["op"].as_str() {
            Some("delete") => {
                out.remove(&key);
            }
            _ => {
                out.insert(key, e["after"]["v"].as_i64().unwrap_or(-1));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_random_workload_across_partitions_children_and_keyless_tables_ends_in_the_tables_state()
{
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("UNILOG_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("model seed {seed} (UNILOG_MODEL_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE pt (id int NOT NULL, r int NOT NULL, v int, PRIMARY KEY (id, r)) PARTITION BY LIST (r);
             CREATE TABLE pt_0 PARTITION OF pt FOR VALUES IN (0);
             CREATE TABLE pt_1 PARTITION OF pt FOR VALUES IN (1);
             CREATE TABLE pt_rest PARTITION OF pt DEFAULT;
             CREATE TABLE ih (id int PRIMARY KEY, v int);
             CREATE TABLE ih_a () INHERITS (ih); ALTER TABLE ih_a ADD PRIMARY KEY (id);
             CREATE TABLE ih_b () INHERITS (ih); ALTER TABLE ih_b ADD PRIMARY KEY (id);
             CREATE TABLE kl (code int NOT NULL, v int); CREATE UNIQUE INDEX kl_code ON kl (code);
             CREATE TABLE lg (n int, v int);",
        )
        .await
        .unwrap();
    let s = suffix();
    let shapes = [
        Shape {
            table: "pt",
            topic: format!("it.m.pt.{s}"),
            key: &["id", "r"],
            insert_only: false,
        },
        Shape {
            table: "ih",
            topic: format!("it.m.ih.{s}"),
            key: &["id"],
            insert_only: false,
        },
        Shape {
            table: "kl",
            topic: format!("it.m.kl.{s}"),
            key: &["code"],
            insert_only: false,
        },
        Shape {
            table: "lg",
            topic: format!("it.m.lg.{s}"),
            key: &["n"],
            insert_only: true,
        },
    ];
    let mut model: Model = BTreeMap::new();
    let mut children = vec!["ih_a".to_string(), "ih_b".to_string()];
    let mut next_id = 0i64;
    // Random transactions of inserts, updates (partition-key moves among
    // them) and deletes, as SQL; the model follows.
    let mut workload = |rng: &mut rand::rngs::StdRng,
                        model: &mut Model,
                        children: &[String],
                        ops: usize|
     -> String {
        let mut sql = String::from("BEGIN;\n");
        for _ in 0..ops {
            let t = rng.random_range(0..4);
            let shape = &shapes[t];
            let rows = model.entry(shape.table).or_default();
            let v: i64 = rng.random_range(0..1000);
            let pick = |rng: &mut rand::rngs::StdRng, rows: &BTreeMap<Vec<i64>, i64>| {
                let keys: Vec<Vec<i64>> = rows.keys().cloned().collect();
                (!keys.is_empty()).then(|| keys[rng.random_range(0..keys.len())].clone())
            };
            let what = if shape.insert_only {
                0
            } else {
                rng.random_range(0..3)
            };
            match (shape.table, what, pick(rng, rows)) {
                (_, 0, _) | (_, _, None) => {
                    next_id += 1;
                    let id = next_id;
                    match shape.table {
                        "pt" => {
                            let r = rng.random_range(0..4);
                            sql.push_str(&format!("INSERT INTO pt VALUES ({id}, {r}, {v});\n"));
                            rows.insert(vec![id, r], v);
                        }
                        "ih" => {
                            let c = &children[rng.random_range(0..children.len())];
                            sql.push_str(&format!("INSERT INTO {c} VALUES ({id}, {v});\n"));
                            rows.insert(vec![id], v);
                        }
                        "kl" => {
                            sql.push_str(&format!("INSERT INTO kl VALUES ({id}, {v});\n"));
                            rows.insert(vec![id], v);
                        }
                        _ => {
                            sql.push_str(&format!("INSERT INTO lg VALUES ({id}, {v});\n"));
                            rows.insert(vec![id], v);
                        }
                    }
                }
                ("pt", 1, Some(k)) => {
                    // Sometimes move the row to another partition.
                    let r = if rng.random_bool(0.3) {
                        rng.random_range(0..4)
                    } else {
                        k[1]
                    };
                    sql.push_str(&format!(
                        "UPDATE pt SET v = {v}, r = {r} WHERE id = {} AND r = {};\n",
                        k[0], k[1]
                    ));
                    rows.remove(&k);
                    rows.insert(vec![k[0], r], v);
                }
                (table, 1, Some(k)) => {
                    let col = if table == "kl" { "code" } else { "id" };
                    sql.push_str(&format!(
                        "UPDATE {table} SET v = {v} WHERE {col} = {};\n",
                        k[0]
                    ));
                    rows.insert(k, v);
                }
                ("pt", _, Some(k)) => {
                    sql.push_str(&format!(
                        "DELETE FROM pt WHERE id = {} AND r = {};\n",
                        k[0], k[1]
                    ));
                    rows.remove(&k);
                }
                (table, _, Some(k)) => {
                    let col = if table == "kl" { "code" } else { "id" };
                    sql.push_str(&format!("DELETE FROM {table} WHERE {col} = {};\n", k[0]));
                    rows.remove(&k);
                }
            }
        }
        sql.push_str("COMMIT;");
        sql
    };
    // Before the start: the snapshot's rows.
    for _ in 0..20 {
        let n = rng.random_range(1..10);
        let sql = workload(&mut rng, &mut model, &children, n);
        db.client.batch_execute(&sql).await.unwrap();
    }
    let mappings: Vec<(String, String)> = shapes
        .iter()
        .map(|sh| {
            let extra = match sh.table {
                "kl" => "key: [code]\n",
                "lg" => "insert_only: true\nkey: [n]\n",
                _ => "",
            };
            let events = if sh.insert_only {
                "events: {insert: Logged}\n".to_string()
            } else {
                "events: {insert: Created, update: Changed, delete: Removed}\n".to_string()
            };
            (
                format!("{}.yaml", sh.table),
                format!("table: {}\ntopic: {}\n{extra}{events}", sh.table, sh.topic),
            )
        })
        .collect();
    let files: Vec<(&str, String)> = mappings
        .iter()
        .map(|(f, t)| (f.as_str(), t.clone()))
        .collect();
    let fx = Fixture::new(&stack, &db, &files, "");
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        text.replace(
            "    snapshot: initial\n",
            "    snapshot: initial\n    set_replica_identity: index\n",
        ),
    )
    .unwrap();
    let run = streaming(&fx, &db).await;
    for round in 0..60 {
        if round == 20 {
            // A new child and a new partition while streaming.
            db.client
                .batch_execute("CREATE TABLE ih_c () INHERITS (ih); ALTER TABLE ih_c ADD PRIMARY KEY (id); CREATE TABLE pt_9 PARTITION OF pt FOR VALUES IN (9);")
                .await
                .unwrap();
            children.push("ih_c".to_string());
        }
        let n = rng.random_range(1..10);
        let sql = workload(&mut rng, &mut model, &children, n);
        db.client.batch_execute(&sql).await.unwrap();
    }
    assert_app_writes_work(&db).await;
    // Every table's SELECT agrees with the model...
    for sh in &shapes {
        let cols = sh.key.join(", ");
        let rows = db
            .client
            .query(
                &format!("SELECT {cols}, v FROM {} ORDER BY {cols}", sh.table),
                &[],
            )
            .await
            .unwrap();
        let db_state: BTreeMap<Vec<i64>, i64> = rows
            .iter()
            .map(|r| {
                let key = (0..sh.key.len())
                    .map(|i| i64::from(r.get::<_, i32>(i)))
                    .collect();
                (
                    key,
                    i64::from(r.get::<_, Option<i32>>(sh.key.len()).unwrap_or(-1)),
                )
            })
            .collect();
        assert_eq!(
            &db_state,
            model.get(sh.table).unwrap_or(&BTreeMap::new()),
            "model of {}",
            sh.table
        );
    }
    // ...and so does the topic folded into a final state.
    for sh in &shapes {
        let want = model.get(sh.table).cloned().unwrap_or_default();
        let start = std::time::Instant::now();
        loop {
            let got = fold(sh, &events(&stack, &sh.topic, 1).await);
            if got == want {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "seed {seed}: topic of {} folds to {} rows, the table has {}: {:?}",
                sh.table,
                got.len(),
                want.len(),
                want.iter()
                    .filter(|(k, v)| got.get(*k) != Some(v))
                    .take(5)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    run.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_insert_only_mapping_on_a_slot_older_than_its_publication_is_refused() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute(
            "CREATE TABLE users (id int PRIMARY KEY); CREATE TABLE audit (who text, what text);",
        )
        .await
        .unwrap();
    let s = suffix();
    let fx = Fixture::new(
        &stack,
        &db,
        &[("users.yaml", mapping("users", &format!("it.u.{s}"), ""))],
        "",
    );
    let run = streaming(&fx, &db).await;
    run.stop().await;
    // The slot reads both publications, which exist from the first start.
    let state_path = fx.dir.path().join(format!("state/{}.json", fx.name));
    let mut state: Json =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(
        state["publications"],
        serde_json::json!([
            format!("unilog_{}", fx.name),
            format!("unilog_{}_inserts", fx.name)
        ]),
        "{state}"
    );
    // A checkpoint of an earlier version, whose slot reads the main publication only.
    state.as_object_mut().unwrap().remove("publications");
    std::fs::write(&state_path, state.to_string()).unwrap();
    std::fs::write(
        fx.dir.path().join("audit.yaml"),
        format!("table: audit\ntopic: it.a.{s}\ninsert_only: true\nkey: [who]\nevents: {{insert: Audited}}\n"),
    )
    .unwrap();
    let text = std::fs::read_to_string(&fx.config).unwrap();
    std::fs::write(
        &fx.config,
        text.replace("  - users.yaml\n", "  - users.yaml\n  - audit.yaml\n"),
    )
    .unwrap();
    for (cmd, want) in [("check", 2), ("run", 1)] {
        let (code, err) = unilog(cmd, &fx);
        assert_eq!(code, Some(want), "{err}");
        assert!(
            err.contains("public.audit is mapped `insert_only`, but replication slot")
                && err.contains("map the table in a pipeline of its own"),
            "{cmd}: {err}"
        );
    }
    db.cleanup().await;
}
