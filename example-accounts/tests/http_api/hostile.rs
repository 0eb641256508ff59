//! Hostile input: what a client may send on purpose, and that none of it gets a
//! 5xx or wraps a balance.

use super::*;

/// What a hostile client sends: amounts at the edge of `i64`, NUL bytes and
/// control characters, huge strings, wrong methods, bad path and query
/// parameters. Every answer is a JSON 4xx, the same on both backends, and
/// nothing is half-written; a sign-up the database cannot store parks one
/// event and the later ones get their e-mail.
pub(super) async fn hostile_input(backend: Backend) {
    let (db, server) = start(backend, "http_hostile", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);

    // Amounts: the balance never wraps.
    let rich = api.open("Rich").await;
    api.deposit(&rich, i64::MAX).await;
    let reply = api
        .post_json(
            &format!("/api/accounts/{rich}/deposits"),
            json!({ "amount": 1 }),
        )
        .await;
    let kind = api.expect_error(&reply, 422, "a deposit past i64::MAX");
    assert_eq!(kind, "refused");
    assert_eq!(api.balance(&rich).await, i64::MAX);
    let holder = api.open("Holder").await;
    api.deposit(&holder, 1).await;
    let reply = api
        .post_json(
            "/api/transfers",
            json!({ "from": rich, "to": holder, "amount": i64::MAX }),
        )
        .await;
    let transfer = api.expect(&reply, 202, "a transfer of i64::MAX")["transfer_id"]
        .as_str()
        .expect("a transfer id")
        .to_owned();
    let ended = api
        .transfer_ending(
            &transfer,
            &["completed", "compensated", "failed"],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(ended["status"], "compensated", "{ended}");
    assert_eq!(api.balance(&rich).await, i64::MAX);
    assert_eq!(api.balance(&holder).await, 1);
    for amount in [i64::MIN, -1] {
        let reply = api
            .post_json(
                &format!("/api/accounts/{holder}/withdrawals"),
                json!({ "amount": amount }),
            )
            .await;
        api.expect_error(&reply, 422, &format!("a withdrawal of {amount}"));
    }
    let reply = api
        .post_raw(
            &format!("/api/accounts/{holder}/deposits"),
            "{\"amount\": 9223372036854775808}",
        )
        .await;
    api.expect_error(&reply, 400, "an amount past i64");

    // NUL bytes and control characters: refused alike on both backends.
    let nul = "a\u{0}b";
    let reply = api.get(&format!("/api/accounts/acc%00{holder}")).await;
    api.expect_error(&reply, 400, "a NUL in an account id");
    let reply = api
        .post_json("/api/accounts/a%00b/deposits", json!({ "amount": 1 }))
        .await;
    api.expect_error(&reply, 400, "a NUL in a deposit's account id");
    let reply = api.get("/api/transfers/tr%00x").await;
    api.expect_error(&reply, 400, "a NUL in a transfer id");
    let reply = api
        .post_json(
            "/api/transfers",
            json!({ "from": nul, "to": holder, "amount": 1 }),
        )
        .await;
    api.expect_error(&reply, 400, "a NUL in a transfer's source");
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": "Nul", "email": format!("n{nul}@example.com") }),
        )
        .await;
    api.expect_error(&reply, 422, "a NUL in an e-mail");
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": nul, "email": unique_email("nul") }),
        )
        .await;
    api.expect_error(&reply, 422, "a NUL in a name");
    let reply = api
        .post_json("/api/accounts", json!({ "owner": "bell\u{7}" }))
        .await;
    api.expect_error(&reply, 422, "a control character in an owner");
    let reply = api
        .post_json("/api/accounts", json!({ "owner": "  " }))
        .await;
    api.expect_error(&reply, 422, "a blank owner");

    // Huge strings: a 60 kB e-mail is refused by the rules, a 1 MB body by
    // the size limit.
    let long = "x".repeat(60_000);
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": "Long", "email": format!("{long}@example.com") }),
        )
        .await;
    api.expect_error(&reply, 422, "a 60 kB e-mail");
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": "x".repeat(201), "email": unique_email("long") }),
        )
        .await;
    api.expect_error(&reply, 422, "a 201-character name");
    // (On a client of its own: the server answers before reading the
    // body and closes that connection.)
    let huge = "y".repeat(1 << 20);
    let once = Api::new(&server);
    let reply = once
        .post_json(
            "/api/users",
            json!({ "name": "Huge", "email": format!("{huge}@example.com") }),
        )
        .await;
    once.expect_error(&reply, 413, "a 1 MB body");
    let reply = api.get(&format!("/api/accounts/{}", "a".repeat(65))).await;
    api.expect_error(&reply, 400, "a 65-character id");

    // Wrong methods, bad query and path parameters.
    let reply = api
        .send(
            api.client.delete(server.url("/api/accounts")),
            "DELETE /api/accounts",
        )
        .await;
    api.expect_error(&reply, 405, "DELETE /api/accounts");
    let reply = api
        .send(
            api.client
                .get(server.url(&format!("/api/accounts/{holder}/deposits"))),
            "GET deposits",
        )
        .await;
    api.expect_error(&reply, 405, "GET on the deposits route");
    let reply = api
        .send(api.client.put(server.url("/api/users")), "PUT /api/users")
        .await;
    api.expect_error(&reply, 405, "PUT /api/users");
    let reply = api
        .get("/api/accounts?consistency=strong&consistency=eventual")
        .await;
    api.expect_error(&reply, 400, "a repeated query parameter");
    let reply = api.get("/api/accounts?consistency=sometimes").await;
    api.expect_error(&reply, 400, "an unknown consistency");

    // The console's routes: authorization before anything is parsed.
    let letters = "/admin/api/projections/welcome_emails/dead-letters";
    let reply = api.post_empty(&format!("{letters}/abc/retry"), None).await;
    api.expect_error(&reply, 401, "a bad dead-letter id without a token");
    let reply = api
        .post_empty(&format!("{letters}/abc/discard"), Some("Bearer wrong"))
        .await;
    api.expect_error(&reply, 401, "a bad dead-letter id with a wrong token");
    let authorized = format!("Bearer {TOKEN}");
    let reply = api
        .post_empty(&format!("{letters}/abc/retry"), Some(&authorized))
        .await;
    api.expect_error(&reply, 400, "a non-numeric dead-letter id");
    let reply = api
        .post_empty(
            &format!("{letters}/99999999999999999999999/discard"),
            Some(&authorized),
        )
        .await;
    api.expect_error(&reply, 400, "a dead-letter id past u64");
    let reply = api
        .post_empty("/admin/api/projections/nope/rebuild", Some(&authorized))
        .await;
    api.expect_error(&reply, 404, "an unknown projection");

    // Nothing was half-written: the accounts hold what they held, no user
    // was created by a refused sign-up.
    assert_eq!(api.balance(&holder).await, 1);
    let reply = api.get(&strong("/api/users")).await;
    let users = api.expect(&reply, 200, "the users");
    let names: Vec<&str> = users
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|u| u["name"].as_str())
        .collect();
    assert!(names.is_empty(), "refused sign-ups left users: {names:?}");

    // A sign-up the database cannot store in text (written past the edge):
    // on PostgreSQL its welcome e-mail is parked as the data's fault, and
    // the next user still gets theirs; on SQLite it is sent.
    append_sign_up(&db, "user-raw-nul", "Bad\u{0}Name", &unique_email("raw")).await;
    let after = unique_email("after");
    api.sign_up("After", &after).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.emails_to(&after).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the welcome e-mail after a bad event was not sent\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if matches!(backend, Backend::Postgres) {
        let reply = api
            .send(
                api.client
                    .get(server.url(letters))
                    .header(AUTHORIZATION, &authorized),
                "dead letters",
            )
            .await;
        let letters = api.expect(&reply, 200, "dead letters");
        let parked: Vec<&Value> = letters
            .as_array()
            .expect("a list")
            .iter()
            .filter(|l| l["aggregate_id"] == "user-raw-nul")
            .collect();
        assert!(
            !parked.is_empty(),
            "the bad sign-up's welcome e-mail was not parked: {letters}"
        );
    }
}
