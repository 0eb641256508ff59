//! Operator endpoints, racing withdrawals, strong reads, metrics and
//! projections, graceful shutdown.

use super::*;

pub(super) async fn operator_endpoints(backend: Backend) {
    let (_db, server) = start(backend, "http_operator", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    let account = api.open("Operator").await;
    api.deposit(&account, 100).await;
    let right = format!("Bearer {TOKEN}");

    // The operators' parts are the framework's console at /admin; the
    // example's own operator routes are gone.
    for path in [
        "/api/projections/balances/rebuild",
        "/api/dead-letters/1/retry",
    ] {
        let reply = api.post_empty(path, Some(right.as_str())).await;
        api.expect_error(&reply, 404, &format!("the old route {path}"));
    }

    let rebuild = "/admin/api/projections/balances/rebuild";
    let retry = "/admin/api/projections/welcome_emails/dead-letters/1/retry";
    for path in [rebuild, retry] {
        let reply = api.post_empty(path, None).await;
        let kind = api.expect_error(&reply, 401, &format!("{path} without a token"));
        assert_eq!(kind, "unauthorized", "{path} without a token");
        let reply = api.post_empty(path, Some("Bearer wrong")).await;
        api.expect_error(&reply, 401, &format!("{path} with a wrong token"));
    }
    let reply = api.post_empty(rebuild, Some(right.as_str())).await;
    assert!(
        (200..300).contains(&reply.status),
        "{rebuild} with the token: {} {}\nserver log:\n{}",
        reply.status,
        reply.text,
        server.log()
    );
    let reply = api.post_empty(retry, Some(right.as_str())).await;
    api.expect_error(&reply, 404, "retrying an unknown dead letter");

    // The rebuilt projection catches up again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = api.get(&format!("/api/accounts/{account}")).await;
        if reply.status == 200 && reply.json["balance"] == 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the balance after the rebuild: {} {}\nserver log:\n{}",
            reply.status,
            reply.text,
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A server without OUTFLOW_ADMIN_TOKEN: the console is off, whatever
    // the token.
    let (_disabled_db, disabled) = start(backend, "http_operator_disabled", &[]).await;
    let api = Api::new(&disabled);
    for path in [rebuild, retry] {
        for authorization in [Some(right.as_str()), Some("Bearer wrong"), None] {
            let reply = api.post_empty(path, authorization).await;
            let kind = api.expect_error(
                &reply,
                403,
                &format!("{path} ({authorization:?}) on a server without a token"),
            );
            assert_eq!(
                kind, "disabled",
                "{path} ({authorization:?}): {}",
                reply.text
            );
        }
    }
}

pub(super) async fn concurrent_withdrawals(backend: Backend) {
    let (_db, server) = start(
        backend,
        "http_concurrent",
        &[("OUTFLOW_ADMIN_TOKEN", TOKEN)],
    )
    .await;
    let api = Api::new(&server);
    let account = api.open("Racer").await;
    api.deposit(&account, 1000).await;

    let path = format!("/api/accounts/{account}/withdrawals");
    let replies =
        futures::future::join_all((0..50).map(|_| api.post_json(&path, json!({ "amount": 30 }))))
            .await;
    let (mut accepted, mut refused, mut conflicts) = (0i64, 0i64, 0i64);
    for reply in &replies {
        match reply.status {
            200 => accepted += 1,
            422 => {
                api.json_error(reply, "a refused withdrawal");
                refused += 1;
            }
            409 => {
                api.json_error(reply, "a conflicting withdrawal");
                conflicts += 1;
            }
            other => panic!(
                "a concurrent withdrawal answered {other} {}\nserver log:\n{}",
                reply.text,
                server.log()
            ),
        }
    }
    let counts = format!("{accepted} accepted, {refused} refused, {conflicts} conflicts");
    assert_eq!(accepted + refused + conflicts, 50, "{counts}");
    assert!(accepted <= 33, "overdrawn: {counts}");
    // A refusal means less than 30 was left, which only 33 withdrawals do.
    if refused > 0 {
        assert_eq!(accepted, 33, "refused while money was left: {counts}");
    }

    let balance = api.balance(&account).await;
    assert_eq!(
        balance,
        1000 - 30 * accepted,
        "the final balance ({counts})"
    );
    assert!(balance >= 0, "a negative balance ({counts})");
    let movements = api.movements(&account).await;
    let withdrawals = movements
        .iter()
        .filter(|m| m["kind"] == "withdrawal")
        .count();
    assert_eq!(
        withdrawals as i64, accepted,
        "withdrawals in the statement ({counts})"
    );
    assert_eq!(
        movements.last().map(|m| movement(m).2),
        Some(balance),
        "the statement's final balance ({counts})"
    );
}

pub(super) async fn strong_consistency(backend: Backend) {
    let (_db, server) = start(backend, "http_strong", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    let account = api.open("Reader").await;
    for round in 1..=20 {
        api.deposit(&account, 10).await;
        assert_eq!(
            api.balance(&account).await,
            10 * round,
            "a strong read right after deposit {round}\nserver log:\n{}",
            server.log()
        );
    }
}

pub(super) async fn metrics_and_projections(backend: Backend) {
    let (_db, server) = start(
        backend,
        "http_metrics",
        &[
            ("OUTFLOW_ADMIN_TOKEN", TOKEN),
            ("OUTFLOW_REFUSE_MAIL", "refused.example"),
            ("OUTFLOW_STATUS_METRICS_MS", "200"),
        ],
    )
    .await;
    let api = Api::new(&server);
    // A command, so that the command counter has a series.
    let account = api.open("Counter").await;
    api.deposit(&account, 10).await;
    // A welcome e-mail the mail server refuses: parked.
    api.sign_up("Mallory", "mallory@refused.example").await;

    // What the console shows is exported too: the parked e-mail, each
    // projection's lag and (no rebuild running) a progress of 1.
    let metric = |text: &str, name: &str, projection: &str| -> Option<f64> {
        text.lines()
            .find(|line| {
                line.starts_with(&format!("{name}{{"))
                    && line.contains(&format!("projection=\"{projection}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = api.get("/metrics").await.text;
        let parked = metric(&text, "outflow_projection_dead_letters", "welcome_emails");
        let lag = metric(&text, "outflow_projection_lag_events", "balances");
        let progress = metric(&text, "outflow_projection_rebuild_progress", "balances");
        if parked == Some(1.0) && lag == Some(0.0) && progress == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the status gauges never showed the parked e-mail, no lag and no rebuild \
             (parked {parked:?}, lag {lag:?}, progress {progress:?}):\n{text}\nserver log:\n{}",
            server.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let reply = api.get("/metrics").await;
    api.expect(&reply, 200, "GET /metrics");
    assert!(
        reply.content_type.starts_with("text/plain"),
        "/metrics content type `{}`",
        reply.content_type
    );
    assert!(
        reply
            .text
            .lines()
            .any(|line| line.starts_with("outflow_commands_total")
                && line.contains("aggregate_type=\"account\"")
                && line.contains("outcome=\"committed\"")),
        "no committed account commands in /metrics:\n{}",
        reply.text
    );

    let projections = api.expect(&api.get("/api/projections").await, 200, "GET projections");
    let projections = projections
        .as_array()
        .unwrap_or_else(|| panic!("projections: not an array: {projections}"));
    assert!(!projections.is_empty(), "no projections listed");
    for item in projections {
        assert!(
            item["projection"].as_str().is_some_and(|p| !p.is_empty()),
            "a projection without a name: {item}"
        );
        assert!(
            item["state"].as_str().is_some_and(|s| !s.is_empty()),
            "no state: {item}"
        );
        assert!(item["lag_events"].is_u64(), "no lag_events: {item}");
        let fields = item.as_object().expect("a projection is an object");
        for key in ["partition", "position", "held_back_by", "last_error"] {
            assert!(fields.contains_key(key), "no `{key}` in {item}");
        }
    }
}

pub(super) async fn graceful_shutdown(backend: Backend) {
    let (_db, mut server) =
        start(backend, "http_shutdown", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    let account = api.open("Leaver").await;
    api.deposit(&account, 10).await;

    // A live feed held open must not keep the server from stopping.
    let feed = api
        .client
        .get(server.url("/api/events"))
        .header(ACCEPT, "text/event-stream")
        .send()
        .await
        .expect("open the live feed");
    assert_eq!(feed.status().as_u16(), 200, "the live feed");
    let client = api.client.clone();
    let url = server.url("/api/accounts");
    drop(api);

    let stopped = tokio::task::block_in_place(|| server.terminate(Duration::from_secs(10)));
    assert!(
        stopped,
        "the server did not exit cleanly within 10 s of SIGTERM\nserver log:\n{}",
        server.log()
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), feed.bytes()).await;
    assert!(
        ended.is_ok(),
        "the live feed stayed open after the server stopped"
    );
    assert!(
        client.get(&url).send().await.is_err(),
        "the server still answers after stopping"
    );
}
