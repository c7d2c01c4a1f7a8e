//! HTTP tests: each starts its own stand-in on 127.0.0.1:0 and talks to it with reqwest.

use std::path::PathBuf;

use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{self, AppState, CONTENT_TYPE_V1};
use crate::registry::Registry;

const V1: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"long"}]}"#;
const V1_SPACED: &str = r#"{
    "type": "record",
    "name": "T",
    "fields": [ { "name": "a", "type": "long" } ]
}"#;
const V2_WITH_DEFAULT: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"long"},{"name":"b","type":"string","default":""}]}"#;
const V2_NO_DEFAULT: &str = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"long"},{"name":"c","type":"string"}]}"#;

struct Server {
    base: String,
    client: reqwest::Client,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(state_file: Option<PathBuf>, basic_auth: Option<&str>) -> Self {
        let registry = match &state_file {
            Some(path) => Registry::load(path).expect("state file loads"),
            None => Registry::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let app = api::router(AppState::new(registry, state_file), basic_auth);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Self {
            base: format!("http://{address}"),
            client: reqwest::Client::new(),
            task,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, CONTENT_TYPE_V1)
                .body(body.to_string());
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(Method::PUT, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(Method::DELETE, path, None).await
    }

    async fn register(&self, subject: &str, schema: &str) -> (u16, Value) {
        self.post(
            &format!("/subjects/{subject}/versions"),
            json!({ "schema": schema }),
        )
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn code(body: &Value) -> Option<i64> {
    body["error_code"].as_i64()
}

#[tokio::test]
async fn register_is_idempotent_and_a_compatible_change_adds_a_version() {
    let sr = Server::start(None, None).await;

    assert_eq!(sr.register("t-value", V1).await, (200, json!({"id": 1})));
    // Same schema, different whitespace: same id, no new version.
    assert_eq!(
        sr.register("t-value", V1_SPACED).await,
        (200, json!({"id": 1}))
    );
    assert_eq!(
        sr.get("/subjects/t-value/versions").await,
        (200, json!([1]))
    );

    // Adding a field with a default is BACKWARD-compatible: version 2, new id.
    assert_eq!(
        sr.register("t-value", V2_WITH_DEFAULT).await,
        (200, json!({"id": 2}))
    );
    assert_eq!(
        sr.get("/subjects/t-value/versions").await,
        (200, json!([1, 2]))
    );
    assert_eq!(sr.get("/subjects").await, (200, json!(["t-value"])));
    // Re-registering an older version is idempotent too (any live version, not only latest).
    assert_eq!(sr.register("t-value", V1).await, (200, json!({"id": 1})));

    for latest in ["latest", "-1"] {
        let (status, body) = sr
            .get(&format!("/subjects/t-value/versions/{latest}"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["subject"], "t-value");
        assert_eq!(body["version"], 2);
        assert_eq!(body["id"], 2);
    }
    let (status, body) = sr.get("/subjects/t-value/versions/1").await;
    assert_eq!((status, body["id"].clone()), (200, json!(1)));

    // The schema text served back parses to the same schema.
    let (status, body) = sr.get("/schemas/ids/1").await;
    assert_eq!(status, 200);
    let served = apache_avro::Schema::parse_str(body["schema"].as_str().expect("schema text"))
        .expect("served schema parses");
    assert_eq!(
        served,
        apache_avro::Schema::parse_str(V1).expect("V1 parses")
    );
    assert!(body.get("schemaType").is_none());

    assert_eq!(
        sr.get("/schemas/ids/2/versions").await,
        (200, json!([{"subject": "t-value", "version": 2}]))
    );

    let response = sr
        .client
        .get(format!("{}/schemas/ids/1", sr.base))
        .send()
        .await
        .expect("request");
    assert_eq!(response.headers()[CONTENT_TYPE], CONTENT_TYPE_V1);
}

#[tokio::test]
async fn incompatible_change_is_409_until_compatibility_is_none() {
    let sr = Server::start(None, None).await;
    sr.register("t-value", V1).await;

    let (status, body) = sr.register("t-value", V2_NO_DEFAULT).await;
    assert_eq!(status, 409);
    assert_eq!(code(&body), Some(409));
    let message = body["message"].as_str().expect("message");
    assert!(
        message.starts_with(
            "Schema being registered is incompatible with an earlier schema for subject \"t-value\""
        ),
        "{message}"
    );
    assert!(message.contains("must have a default"), "{message}");

    // The verbose check says why; without verbose there are no messages.
    let (status, body) = sr
        .post(
            "/compatibility/subjects/t-value/versions/latest?verbose=true",
            json!({"schema": V2_NO_DEFAULT}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["is_compatible"], false);
    assert!(!body["messages"].as_array().expect("messages").is_empty());
    assert_eq!(
        sr.post(
            "/compatibility/subjects/t-value/versions/1",
            json!({"schema": V2_NO_DEFAULT})
        )
        .await,
        (200, json!({"is_compatible": false}))
    );
    assert_eq!(
        sr.post(
            "/compatibility/subjects/t-value/versions",
            json!({"schema": V2_WITH_DEFAULT})
        )
        .await,
        (200, json!({"is_compatible": true}))
    );

    // The subject's level wins over the global one.
    assert_eq!(
        sr.put("/config/t-value", json!({"compatibility": "NONE"}))
            .await,
        (200, json!({"compatibility": "NONE"}))
    );
    assert_eq!(
        sr.get("/config/t-value").await,
        (200, json!({"compatibilityLevel": "NONE"}))
    );
    assert_eq!(
        sr.register("t-value", V2_NO_DEFAULT).await,
        (200, json!({"id": 2}))
    );
    assert_eq!(
        sr.get("/subjects/t-value/versions").await,
        (200, json!([1, 2]))
    );

    assert_eq!(
        sr.delete("/config/t-value").await,
        (200, json!({"compatibilityLevel": "NONE"}))
    );
    let (status, body) = sr.get("/config/t-value").await;
    assert_eq!((status, code(&body)), (404, Some(40408)));
    assert_eq!(
        sr.get("/config/t-value?defaultToGlobal=true").await,
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );
    let (status, body) = sr.delete("/config/t-value").await;
    assert_eq!((status, code(&body)), (404, Some(40401)));
}

#[tokio::test]
async fn transitive_levels_check_every_version() {
    let sr = Server::start(None, None).await;
    let v1 = r#"{"type":"record","name":"T","fields":[{"name":"a","type":"int"}]}"#;
    // Drops `a`, adds `b` with a default: reads v1 data.
    let v2 = r#"{"type":"record","name":"T","fields":[{"name":"b","type":"string","default":""}]}"#;
    // Brings `a` back as a string: reads v2 data (default) but not v1 data (int into string).
    let v3 = r#"{"type":"record","name":"T","fields":[{"name":"b","type":"string","default":""},{"name":"a","type":"string","default":""}]}"#;
    assert_eq!(sr.register("t-value", v1).await.0, 200);
    assert_eq!(sr.register("t-value", v2).await.0, 200);

    sr.put(
        "/config/t-value",
        json!({"compatibility": "backward_transitive"}),
    )
    .await;
    let (status, body) = sr.register("t-value", v3).await;
    assert_eq!((status, code(&body)), (409, Some(409)), "{body}");
    let check = |path: &'static str| {
        let sr = &sr;
        async move { sr.post(path, json!({"schema": v3})).await.1["is_compatible"].clone() }
    };
    // A version-specific check looks at that version only, even under a transitive level.
    assert_eq!(
        check("/compatibility/subjects/t-value/versions/latest").await,
        true
    );
    assert_eq!(
        check("/compatibility/subjects/t-value/versions/1").await,
        false
    );
    assert_eq!(
        check("/compatibility/subjects/t-value/versions").await,
        false
    );

    sr.put("/config/t-value", json!({"compatibility": "BACKWARD"}))
        .await;
    assert_eq!(sr.register("t-value", v3).await, (200, json!({"id": 3})));
}

#[tokio::test]
async fn one_schema_in_two_subjects_has_one_id_and_lookup_finds_it() {
    let sr = Server::start(None, None).await;
    assert_eq!(sr.register("a-value", V1).await, (200, json!({"id": 1})));
    assert_eq!(
        sr.register("b-value", V2_WITH_DEFAULT).await,
        (200, json!({"id": 2}))
    );
    assert_eq!(
        sr.register("b-value", V1_SPACED).await,
        (200, json!({"id": 1}))
    );
    assert_eq!(
        sr.get("/subjects/b-value/versions").await,
        (200, json!([1, 2]))
    );
    assert_eq!(
        sr.get("/schemas/ids/1/versions").await,
        (
            200,
            json!([{"subject": "a-value", "version": 1}, {"subject": "b-value", "version": 2}])
        )
    );

    let (status, body) = sr
        .post(
            "/subjects/b-value?normalize=false&deleted=true",
            json!({"schema": V1}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            body["subject"].clone(),
            body["version"].clone(),
            body["id"].clone()
        ),
        (json!("b-value"), json!(2), json!(1))
    );
    let (status, body) = sr
        .post("/subjects/a-value", json!({"schema": V2_WITH_DEFAULT}))
        .await;
    assert_eq!((status, code(&body)), (404, Some(40403)));
    let (status, body) = sr.post("/subjects/nope", json!({"schema": V1})).await;
    assert_eq!((status, code(&body)), (404, Some(40401)));
}

#[tokio::test]
async fn soft_and_permanent_deletes() {
    let sr = Server::start(None, None).await;
    sr.register("t-value", V1).await;
    sr.register("t-value", V2_WITH_DEFAULT).await;

    assert_eq!(
        sr.delete("/subjects/t-value/versions/2").await,
        (200, json!(2))
    );
    assert_eq!(
        sr.get("/subjects/t-value/versions").await,
        (200, json!([1]))
    );
    assert_eq!(
        sr.get("/subjects/t-value/versions?deleted=true").await,
        (200, json!([1, 2]))
    );
    let (status, body) = sr.delete("/subjects/t-value/versions/2").await;
    assert_eq!((status, code(&body)), (404, Some(40406)));
    let (status, body) = sr
        .delete("/subjects/t-value/versions/1?permanent=true")
        .await;
    assert_eq!((status, code(&body)), (404, Some(40407)));
    let (status, body) = sr.delete("/subjects/t-value?permanent=true").await;
    assert_eq!((status, code(&body)), (404, Some(40405)));

    assert_eq!(sr.delete("/subjects/t-value").await, (200, json!([1])));
    for path in [
        "/subjects/t-value/versions",
        "/subjects/t-value/versions/latest",
    ] {
        let (status, body) = sr.get(path).await;
        assert_eq!((status, code(&body)), (404, Some(40401)), "{path}");
    }
    assert_eq!(sr.get("/subjects").await, (200, json!([])));
    assert_eq!(
        sr.get("/subjects?deleted=true").await,
        (200, json!(["t-value"]))
    );
    // Soft-deleted versions keep their ids decodable.
    assert_eq!(sr.get("/schemas/ids/2").await.0, 200);
    let (status, body) = sr.delete("/subjects/t-value").await;
    assert_eq!((status, code(&body)), (404, Some(40404)));

    assert_eq!(
        sr.delete("/subjects/t-value?permanent=true").await,
        (200, json!([1, 2]))
    );
    let (status, body) = sr.get("/schemas/ids/2").await;
    assert_eq!((status, code(&body)), (404, Some(40403)));
    let (status, body) = sr.delete("/subjects/t-value").await;
    assert_eq!((status, code(&body)), (404, Some(40401)));

    // Ids are never reused: a new schema after the wipe gets id 3, version 1.
    let v3 = r#"{"type":"record","name":"U","fields":[]}"#;
    assert_eq!(sr.register("t-value", v3).await, (200, json!({"id": 3})));
    assert_eq!(
        sr.get("/subjects/t-value/versions").await,
        (200, json!([1]))
    );
}

#[tokio::test]
async fn re_registering_a_soft_deleted_schema_reuses_its_id_in_a_new_version() {
    let sr = Server::start(None, None).await;
    sr.register("t-value", V1).await;
    sr.delete("/subjects/t-value/versions/1").await;
    assert_eq!(sr.register("t-value", V1).await, (200, json!({"id": 1})));
    assert_eq!(
        sr.get("/subjects/t-value/versions").await,
        (200, json!([2]))
    );
}

#[tokio::test]
async fn bad_versions_ids_and_paths() {
    let sr = Server::start(None, None).await;
    sr.register("t-value", V1).await;

    for bad in ["0", "-2", "abc", "2147483648"] {
        let (status, body) = sr.get(&format!("/subjects/t-value/versions/{bad}")).await;
        assert_eq!((status, code(&body)), (422, Some(42202)), "{bad}");
    }
    let (status, body) = sr.get("/subjects/t-value/versions/9").await;
    assert_eq!((status, code(&body)), (404, Some(40402)));
    assert_eq!(body["message"], "Version 9 not found.");
    for id in ["99", "x"] {
        let (status, body) = sr.get(&format!("/schemas/ids/{id}")).await;
        assert_eq!((status, code(&body)), (404, Some(40403)), "{id}");
    }
    let (status, body) = sr
        .post(
            "/compatibility/subjects/t-value/versions/9",
            json!({"schema": V1}),
        )
        .await;
    assert_eq!((status, code(&body)), (404, Some(40402)));
    assert_eq!(
        sr.post(
            "/compatibility/subjects/missing/versions/latest",
            json!({"schema": V1})
        )
        .await,
        (200, json!({"is_compatible": true}))
    );
    let (status, body) = sr.get("/no/such/route").await;
    assert_eq!((status, code(&body)), (404, Some(404)));
    assert_eq!(sr.get("/mode").await, (200, json!({"mode": "READWRITE"})));
}

#[tokio::test]
async fn malformed_schema_is_42201() {
    let sr = Server::start(None, None).await;
    let unknown_type =
        r#"{"type":"record","name":"T","fields":[{"name":"a","type":"nosuchtype"}]}"#;
    let bad_default =
        r#"{"type":"record","name":"T","fields":[{"name":"a","type":"int","default":"x"}]}"#;
    for schema in [unknown_type, bad_default, "{", ""] {
        let (status, body) = sr.register("t-value", schema).await;
        assert_eq!(
            (status, code(&body)),
            (422, Some(42201)),
            "{schema}: {body}"
        );
    }
    let (status, body) = sr
        .post(
            "/subjects/t-value/versions",
            json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"}),
        )
        .await;
    assert_eq!((status, code(&body)), (422, Some(42201)));
    assert!(body["message"].as_str().is_some_and(|m| m.contains("AVRO")));

    // The compatibility check reports a bad schema as incompatible when verbose.
    let path = "/compatibility/subjects/t-value/versions/latest";
    let (status, body) = sr
        .post(
            &format!("{path}?verbose=true"),
            json!({"schema": unknown_type}),
        )
        .await;
    assert_eq!((status, body["is_compatible"].clone()), (200, json!(false)));
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(1));
    let (status, body) = sr.post(path, json!({"schema": unknown_type})).await;
    assert_eq!((status, code(&body)), (422, Some(42201)));

    // A body that is not JSON at all is a 400.
    let response = sr
        .client
        .post(format!("{}/subjects/t-value/versions", sr.base))
        .body("not json")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(sr.get("/subjects").await, (200, json!([])));
}

#[tokio::test]
async fn any_content_type_unknown_fields_and_encoded_subjects_are_accepted() {
    let sr = Server::start(None, None).await;
    let body = json!({"schema": V1, "schemaType": "AVRO", "metadata": null, "future": 1});
    for content_type in [
        "application/octet-stream",
        "application/json",
        "application/vnd.schemaregistry+json",
    ] {
        let response = sr
            .client
            .post(format!(
                "{}/subjects/db%2Fpublic.orders-value/versions?normalize=false&x=y",
                sr.base
            ))
            .header(CONTENT_TYPE, content_type)
            .body(body.to_string())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 200, "{content_type}");
    }
    assert_eq!(
        sr.get("/subjects").await,
        (200, json!(["db/public.orders-value"]))
    );
    assert_eq!(
        sr.get("/subjects/db%2Fpublic.orders-value/versions").await,
        (200, json!([1]))
    );
}

#[tokio::test]
async fn global_config_round_trips_and_rejects_bad_levels() {
    let sr = Server::start(None, None).await;
    assert_eq!(
        sr.get("/config").await,
        (200, json!({"compatibilityLevel": "BACKWARD"}))
    );
    assert_eq!(
        sr.put("/config", json!({"compatibility": "full"})).await,
        (200, json!({"compatibility": "full"}))
    );
    assert_eq!(
        sr.get("/config").await,
        (200, json!({"compatibilityLevel": "FULL"}))
    );
    let (status, body) = sr
        .put("/config", json!({"compatibility": "SIDEWAYS"}))
        .await;
    assert_eq!((status, code(&body)), (422, Some(42203)));

    // FULL: adding a field without a default fails (the new schema cannot read old data).
    sr.register("t-value", V1).await;
    assert_eq!(sr.register("t-value", V2_NO_DEFAULT).await.0, 409);
    assert_eq!(sr.register("t-value", V2_WITH_DEFAULT).await.0, 200);
}

#[tokio::test]
async fn basic_auth_answers_401_without_the_right_credentials() {
    let sr = Server::start(None, Some("unilog:s3cret")).await;
    let url = format!("{}/subjects", sr.base);

    let response = sr.client.get(&url).send().await.expect("request");
    assert_eq!(response.status().as_u16(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    let body: Value = response.json().await.expect("json body");
    assert_eq!(code(&body), Some(401));

    let wrong = sr
        .client
        .get(&url)
        .basic_auth("unilog", Some("nope"))
        .send();
    assert_eq!(wrong.await.expect("request").status().as_u16(), 401);
    let right = sr
        .client
        .get(&url)
        .basic_auth("unilog", Some("s3cret"))
        .send();
    assert_eq!(right.await.expect("request").status().as_u16(), 200);
}

#[tokio::test]
async fn state_file_keeps_ids_versions_configs_and_deletes_across_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("registry.json");

    let sr = Server::start(Some(path.clone()), None).await;
    assert_eq!(sr.register("t-value", V1).await, (200, json!({"id": 1})));
    assert_eq!(
        sr.register("t-value", V2_WITH_DEFAULT).await,
        (200, json!({"id": 2}))
    );
    sr.register("gone-value", r#""string""#).await;
    sr.delete("/subjects/gone-value").await;
    sr.put("/config/t-value", json!({"compatibility": "NONE"}))
        .await;
    sr.put("/config", json!({"compatibility": "FORWARD"})).await;
    drop(sr);
    assert!(!dir.path().join("registry.json.tmp").exists());

    let sr = Server::start(Some(path.clone()), None).await;
    assert_eq!(sr.get("/subjects").await, (200, json!(["t-value"])));
    assert_eq!(
        sr.get("/subjects/t-value/versions").await,
        (200, json!([1, 2]))
    );
    assert_eq!(sr.get("/schemas/ids/3").await.0, 200);
    assert_eq!(
        sr.get("/config/t-value").await,
        (200, json!({"compatibilityLevel": "NONE"}))
    );
    assert_eq!(
        sr.get("/config").await,
        (200, json!({"compatibilityLevel": "FORWARD"}))
    );
    // Same schema, same id, no new version; a new schema continues the id sequence.
    assert_eq!(
        sr.register("t-value", V1_SPACED).await,
        (200, json!({"id": 1}))
    );
    assert_eq!(
        sr.register("t-value", V2_NO_DEFAULT).await,
        (200, json!({"id": 4}))
    );
    drop(sr);

    let sr = Server::start(Some(path), None).await;
    assert_eq!(sr.get("/subjects/t-value/versions/latest").await.1["id"], 4);
}
