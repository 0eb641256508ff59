//! With an OTLP endpoint configured, the application exports its traces:
//! the demo, run against a collector on loopback (a plain HTTP listener
//! recording what is posted to `/v1/traces`), sends spans of its commands,
//! of the transfer process's steps, of projection batches and of the
//! welcome e-mails, and exits cleanly after flushing them.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::routing::post;
use axum::Router;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_exports_its_traces_to_an_otlp_collector() {
    let received: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let collector = Router::new().route(
        "/v1/traces",
        post({
            let received = received.clone();
            move |body: Bytes| async move {
                received.lock().expect("received").push(body);
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port for the collector");
    let address = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let database = common::Database::new(common::Backend::Sqlite, "otlp").await;
    let output = tokio::task::spawn_blocking({
        let url = database.url.clone();
        move || {
            Command::new(env!("CARGO_BIN_EXE_example-accounts"))
                .args(["--database-url", &url])
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{address}"))
                .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .output()
                .expect("run the demo")
        }
    })
    .await
    .expect("the demo's thread");
    assert!(
        output.status.success(),
        "exit {:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    // The spans arrive before the process exits (it flushes them).
    let bodies = received.lock().expect("received").clone();
    assert!(!bodies.is_empty(), "nothing was posted to /v1/traces");
    let all: Vec<u8> = bodies.iter().flat_map(|b| b.iter().copied()).collect();
    for name in [
        "outflow-bank",
        "outflow.command",
        "outflow.process.step",
        "outflow.projection.batch",
        "welcome_email",
    ] {
        assert!(
            contains(&all, name.as_bytes()),
            "no `{name}` in the exported traces"
        );
    }
}
