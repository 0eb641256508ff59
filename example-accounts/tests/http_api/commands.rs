//! Commands and queries, bad input, and the sign-up helper the hostile
//! scenarios share.

use super::*;

// ---------------------------------------------------------------- scenarios

pub(super) async fn commands_and_queries(backend: Backend) {
    let (_db, server) = start(backend, "http_commands", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);

    let email = unique_email("ada");
    let user = api.sign_up("Ada", &email).await;
    let alice = api.open(&user).await;
    let bob = api.open(&user).await;
    assert_ne!(alice, bob, "two accounts got the same id");

    let deposited = api.deposit(&alice, 1000).await;
    let withdrawn = api.withdraw(&alice, 250).await;
    let bob_deposited = api.deposit(&bob, 200).await;
    assert!(
        position(&deposited) < position(&withdrawn)
            && position(&withdrawn) < position(&bob_deposited),
        "log positions do not grow: {deposited} {withdrawn} {bob_deposited}"
    );
    assert!(
        version(&deposited) < version(&withdrawn),
        "the account's version did not grow: {deposited} {withdrawn}"
    );

    // Strong reads see the writes at once.
    let account = api.account(&alice).await;
    assert_eq!(
        account["balance"], 750,
        "balance after the withdrawal: {account}"
    );
    assert_eq!(account["owner"], user.as_str(), "owner: {account}");
    assert_eq!(account["closed"], false, "closed: {account}");
    assert_eq!(api.balance(&bob).await, 200, "bob's balance");

    let list = api.expect(
        &api.get(&strong("/api/accounts")).await,
        200,
        "GET accounts",
    );
    let list = list.as_array().expect("the account list is an array");
    for (id, balance) in [(&alice, 750), (&bob, 200)] {
        let found: Vec<_> = list
            .iter()
            .filter(|a| a["account_id"] == id.as_str())
            .collect();
        assert_eq!(found.len(), 1, "account {id} in the list: {list:?}");
        assert_eq!(found[0]["balance"], balance, "account {id} in the list");
        assert_eq!(found[0]["owner"], user.as_str(), "account {id} in the list");
        assert_eq!(found[0]["closed"], false, "account {id} in the list");
    }

    let movements: Vec<_> = api.movements(&alice).await.iter().map(movement).collect();
    assert_eq!(
        movements,
        vec![
            expected("deposit", 1000, 1000, None),
            expected("withdrawal", 250, 750, None),
        ],
        "alice's statement before the transfer"
    );

    let users = api.users_with(&email).await;
    assert_eq!(
        users.len(),
        1,
        "the directory lists {email} once: {users:?}"
    );
    assert_eq!(users[0]["user_id"], user.as_str(), "the user's id");
    assert_eq!(users[0]["name"], "Ada", "the user's name");

    // The welcome e-mail, sent by a projection effect, eventually.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut emails = api.emails_to(&email).await;
    while emails.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        emails = api.emails_to(&email).await;
    }
    assert_eq!(
        emails.len(),
        1,
        "exactly one welcome e-mail to {email} within 10 s: {emails:?}\nserver log:\n{}",
        server.log()
    );
    assert!(
        emails[0]["key"].as_str().is_some_and(|k| !k.is_empty())
            && emails[0]["subject"].as_str().is_some_and(|s| !s.is_empty()),
        "the e-mail has a key and a subject: {}",
        emails[0]
    );

    // A transfer, run by the process manager.
    let reply = api
        .post_json(
            "/api/transfers",
            json!({ "from": alice, "to": bob, "amount": 300 }),
        )
        .await;
    let accepted = api.expect(&reply, 202, "transfer");
    assert!(
        accepted["position"].is_u64(),
        "transfer: no position in {accepted}"
    );
    let transfer = accepted["transfer_id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("no transfer_id in {accepted}"))
        .to_owned();
    let done = api
        .transfer_ending(
            &transfer,
            &["completed", "compensated", "failed"],
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(
        done["status"],
        "completed",
        "the transfer: {done}\n{}",
        server.log()
    );
    assert_eq!(
        done["transfer_id"],
        transfer.as_str(),
        "the transfer: {done}"
    );
    assert_eq!(done["from"], alice.as_str(), "the transfer: {done}");
    assert_eq!(done["to"], bob.as_str(), "the transfer: {done}");
    assert_eq!(done["amount"], 300, "the transfer: {done}");
    let listed = api.expect(
        &api.get(&strong("/api/transfers")).await,
        200,
        "GET transfers",
    );
    assert!(
        listed
            .as_array()
            .expect("the transfer list is an array")
            .iter()
            .any(|t| t["transfer_id"] == transfer.as_str() && t["status"] == "completed"),
        "the completed transfer in the list: {listed}"
    );

    assert_eq!(api.balance(&alice).await, 450, "alice after the transfer");
    assert_eq!(api.balance(&bob).await, 500, "bob after the transfer");
    let movements: Vec<_> = api.movements(&alice).await.iter().map(movement).collect();
    assert_eq!(
        movements,
        vec![
            expected("deposit", 1000, 1000, None),
            expected("withdrawal", 250, 750, None),
            expected("transfer out", 300, 450, Some(&transfer)),
        ],
        "alice's statement"
    );
    let movements: Vec<_> = api.movements(&bob).await.iter().map(movement).collect();
    assert_eq!(
        movements,
        vec![
            expected("deposit", 200, 200, None),
            expected("transfer in", 300, 500, Some(&transfer)),
        ],
        "bob's statement"
    );

    // Closing: refused while money is left, accepted once emptied; a
    // closed account refuses deposits.
    let refused = api
        .post_empty(&format!("/api/accounts/{bob}/close"), None)
        .await;
    api.expect_error(&refused, 422, "close an account holding money");
    api.withdraw(&bob, 500).await;
    let closed = api
        .post_empty(&format!("/api/accounts/{bob}/close"), None)
        .await;
    let closed = api.expect(&closed, 200, "close the emptied account");
    assert_eq!(closed["account_id"], bob.as_str(), "close: {closed}");
    assert!(
        closed["version"].is_u64() && closed["position"].is_u64(),
        "close: {closed}"
    );
    let account = api.account(&bob).await;
    assert_eq!(account["closed"], true, "bob after closing: {account}");
    assert_eq!(account["balance"], 0, "bob after closing: {account}");
    let refused = api
        .post_json(
            &format!("/api/accounts/{bob}/deposits"),
            json!({ "amount": 10 }),
        )
        .await;
    api.expect_error(&refused, 422, "deposit on a closed account");
    assert_eq!(
        api.balance(&bob).await,
        0,
        "the refused deposit wrote nothing"
    );

    // Still exactly one welcome e-mail.
    assert_eq!(
        api.emails_to(&email).await.len(),
        1,
        "welcome e-mails at the end"
    );
}

pub(super) async fn bad_input(backend: Backend) {
    let (_db, server) = start(backend, "http_bad_input", &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]).await;
    let api = Api::new(&server);
    let account = api.open("Grace").await;
    api.deposit(&account, 500).await;
    let deposits = format!("/api/accounts/{account}/deposits");
    let withdrawals = format!("/api/accounts/{account}/withdrawals");

    // Bodies that are not JSON, lack a field or have a wrong type: 400.
    let reply = api.post_raw(&deposits, "{\"amount\": ").await;
    api.expect_error(&reply, 400, "malformed JSON deposit");
    let reply = api.post_raw("/api/users", "not json at all").await;
    api.expect_error(&reply, 400, "malformed JSON sign-up");
    let reply = api
        .post_json("/api/users", json!({ "name": "Grace" }))
        .await;
    api.expect_error(&reply, 400, "sign-up without an e-mail");
    let reply = api.post_json(&deposits, json!({})).await;
    api.expect_error(&reply, 400, "deposit without an amount");
    let reply = api
        .post_json("/api/transfers", json!({ "from": account, "amount": 5 }))
        .await;
    api.expect_error(&reply, 400, "transfer without a target");
    let reply = api.post_json(&deposits, json!({ "amount": "100" })).await;
    api.expect_error(&reply, 400, "an amount as a string");

    // Unknown accounts: 404.
    let unknown = format!("acc-unknown-{}", uuid::Uuid::new_v4().simple());
    let reply = api
        .post_json(
            &format!("/api/accounts/{unknown}/deposits"),
            json!({ "amount": 10 }),
        )
        .await;
    api.expect_error(&reply, 404, "deposit on an unknown account");
    let reply = api
        .post_json(
            &format!("/api/accounts/{unknown}/withdrawals"),
            json!({ "amount": 10 }),
        )
        .await;
    api.expect_error(&reply, 404, "withdrawal from an unknown account");
    let reply = api.get(&format!("/api/accounts/{unknown}")).await;
    api.expect_error(&reply, 404, "GET an unknown account");
    let reply = api.get(&strong(&format!("/api/accounts/{unknown}"))).await;
    api.expect_error(&reply, 404, "GET an unknown account, strongly");

    // Broken rules: 422.
    for amount in [0, -5] {
        let reply = api.post_json(&deposits, json!({ "amount": amount })).await;
        api.expect_error(&reply, 422, &format!("deposit of {amount}"));
        let reply = api
            .post_json(&withdrawals, json!({ "amount": amount }))
            .await;
        api.expect_error(&reply, 422, &format!("withdrawal of {amount}"));
    }
    let reply = api.post_json(&withdrawals, json!({ "amount": 501 })).await;
    api.expect_error(&reply, 422, "overdraw");

    // A refused command writes nothing.
    assert_eq!(
        api.balance(&account).await,
        500,
        "the balance after the refusals"
    );
    let movements: Vec<_> = api.movements(&account).await.iter().map(movement).collect();
    assert_eq!(
        movements,
        vec![expected("deposit", 500, 500, None)],
        "the statement after the refusals"
    );

    // A duplicate address: 409, and the directory keeps one user.
    let email = unique_email("grace");
    let first = api.sign_up("Grace", &email).await;
    let reply = api
        .post_json(
            "/api/users",
            json!({ "name": "Other Grace", "email": email }),
        )
        .await;
    api.expect_error(&reply, 409, "sign-up with a taken address");
    let users = api.users_with(&email).await;
    assert_eq!(
        users.len(),
        1,
        "the directory lists {email} once: {users:?}"
    );
    assert_eq!(
        users[0]["user_id"],
        first.as_str(),
        "the first sign-up keeps the address"
    );

    // A transfer to an unknown account: refused at once, or accepted and
    // then undone; either way no money is lost.
    let reply = api
        .post_json(
            "/api/transfers",
            json!({ "from": account, "to": unknown, "amount": 100 }),
        )
        .await;
    match reply.status {
        404 | 422 => {
            api.expect_error(&reply, reply.status, "transfer to an unknown account");
        }
        202 => {
            let transfer = reply.json["transfer_id"]
                .as_str()
                .unwrap_or_else(|| panic!("no transfer_id in {}", reply.text))
                .to_owned();
            let ended = api
                .transfer_ending(
                    &transfer,
                    &["completed", "compensated", "failed"],
                    Duration::from_secs(15),
                )
                .await;
            assert!(
                ended["status"] == "compensated" || ended["status"] == "failed",
                "a transfer to an unknown account ended {ended}\n{}",
                server.log()
            );
        }
        other => panic!(
            "transfer to an unknown account: {other} {}\nserver log:\n{}",
            reply.text,
            server.log()
        ),
    }
    assert_eq!(
        api.balance(&account).await,
        500,
        "the source after the transfer to nowhere"
    );
    let last = api.movements(&account).await.last().map(movement);
    assert_eq!(
        last.map(|m| m.2),
        Some(500),
        "the statement's final balance"
    );
    let reply = api.get(&strong(&format!("/api/accounts/{unknown}"))).await;
    api.expect_error(&reply, 404, "the unknown account stays unknown");
}

/// Appends a user's sign-up straight to the store, past the HTTP edge's
/// checks (as another program sharing the database could).
pub(super) async fn append_sign_up(db: &Database, user_id: &str, name: &str, email: &str) {
    use outflow::{AppendRequest, EventStore, NewEvent};
    let event = NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "UserSignedUp".into(),
        event_version: "1.0".into(),
        payload: json!({ "UserSignedUp": { "name": name, "email": email } }),
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    };
    let request = AppendRequest {
        aggregate_type: "user".into(),
        aggregate_id: user_id.into(),
        expected_version: 0,
        events: vec![event],
    };
    match db.url.strip_prefix("sqlite:") {
        Some(path) => {
            let store = outflow::SqliteStore::open(path)
                .await
                .expect("open the file");
            store.append(request).await.expect("append");
            store.close().await;
        }
        None => {
            let store = outflow::PostgresStore::connect(&db.url)
                .await
                .expect("connect");
            store.append(request).await.expect("append");
        }
    }
}
