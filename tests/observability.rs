//! Metrics, health and readiness of a running pipeline, and `unilog status`,
//! against the local stack.

mod support;

use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(120);

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// The value of one metric line (exact name and labels).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_health_ready_and_status() {
    let stack = Stack::from_env();
    let db = TestDb::create(&stack).await;
    db.client
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, val bigint NOT NULL); INSERT INTO items VALUES (1, 1), (2, 2);")
        .await
        .unwrap();
    let topic = format!("it.obs.{}", suffix());
    let port = free_port();
    let mapping = format!("table: items\ntopic: {topic}\nevents: {{insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}}\n");
    let fx = Fixture::new(
        &stack,
        &db,
        &[("items.yaml", mapping)],
        &format!("http:\n  listen: 127.0.0.1:{port}\n  stall_timeout_secs: 30\n"),
    );
    let mut child = std::process::Command::new(unilog_bin())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&fx.config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    db.wait_streaming(&fx.slot, WAIT).await;
    let base = format!("http://127.0.0.1:{port}");

    let (code, body) = get(&format!("{base}/health")).await;
    assert_eq!(code, 200, "{body}");
    let start = Instant::now();
    loop {
        let (code, body) = get(&format!("{base}/ready")).await;
        if code == 200 {
            assert!(body.contains("\"phase\":\"streaming\""), "{body}");
            break;
        }
        assert!(start.elapsed() < WAIT, "never ready: {code} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    db.client
        .batch_execute("INSERT INTO items VALUES (3, 3); UPDATE items SET val = 9 WHERE id = 1; DELETE FROM items WHERE id = 2;")
        .await
        .unwrap();
    let labels = format!("{{pipeline=\"{}\",table=\"public.items\"}}", fx.name);
    let published = format!("unilog_events_published_total{labels}");
    let start = Instant::now();
    let text = loop {
        let (_, text) = get(&format!("{base}/metrics")).await;
        if metric(&text, &published) == Some(5.0) {
            break text;
        }
        assert!(
            start.elapsed() < WAIT,
            "published never reached 5 (2 snapshot + 3 changes):\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        metric(&text, &format!("unilog_events_read_total{labels}")),
        Some(5.0),
        "{text}"
    );
    let p = format!("{{pipeline=\"{}\"}}", fx.name);
    assert_eq!(
        metric(
            &text,
            &format!("unilog_end_to_end_latency_seconds_count{p}")
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("unilog_snapshot_rows_total{p}")),
        Some(2.0),
        "{text}"
    );
    assert!(
        metric(&text, &format!("unilog_sink_batch_seconds_count{p}")).unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "unilog_pipeline_phase{{phase=\"streaming\",pipeline=\"{}\"}}",
                fx.name
            )
        )
        .or_else(|| metric(
            &text,
            &format!(
                "unilog_pipeline_phase{{pipeline=\"{}\",phase=\"streaming\"}}",
                fx.name
            )
        )),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE unilog_source_lag_bytes gauge"),
        "{text}"
    );

    // `status --json` while running.
    let out = unilog_output(&["status", "--json"], &fx.config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["slot"], fx.slot.as_str());
    assert_eq!(status["slot_active"], true);
    assert_eq!(status["snapshot_complete"], true);
    assert_eq!(status["topics"][0]["topic"], topic.as_str());
    assert_eq!(status["topics"][0]["schema"]["version"], 1);
    assert!(status["retained_wal_bytes"].is_number());

    assert!(sigterm(&mut child).success());
    // The human table names the table, topic and schema version.
    let out = unilog_output(&["status"], &fx.config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("public.items") && text.contains(&topic) && text.contains("v1 / id"),
        "{text}"
    );
    assert!(text.contains("slot active         false"), "{text}");
    db.cleanup().await;
}
