//! A user forgotten, proven by a byte search of the whole database: users
//! sign up, get their welcome e-mail and move money; an operator forgets
//! one (`DELETE /api/users/{id}`); every projection is rebuilt; then the
//! whole database — `pg_dump` on PostgreSQL, the SQLite file and its
//! write-ahead log byte for byte — holds none of that user's name or
//! address, while the other users' data and every balance read as before.
//! The address can then be signed up with again, and the user stays
//! forgotten across a restart.

mod common;

use std::time::{Duration, Instant};

use common::client::{balance, client, deposit, get, open_with, post, strong_get};
use common::{Backend, Database, Server};
use serde_json::{json, Value};

const TOKEN: &str = "operator-secret";

fn marker() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// Every byte the database holds, as text where it can be read.
async fn dump(backend: Backend, db: &Database) -> Vec<u8> {
    match backend {
        Backend::Postgres => {
            let bin = std::env::var("OUTFLOW_PG_BIN")
                .expect("OUTFLOW_PG_BIN is not set: run the tests with scripts/test.sh");
            let output = std::process::Command::new(format!("{bin}/pg_dump"))
                .arg("--dbname")
                .arg(&db.url)
                .output()
                .expect("run pg_dump");
            assert!(
                output.status.success(),
                "pg_dump: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        }
        Backend::Sqlite => {
            let path = db.url.trim_start_matches("sqlite:").to_owned();
            let mut bytes = Vec::new();
            for file in [path.clone(), format!("{path}-wal"), format!("{path}-shm")] {
                if let Ok(content) = std::fs::read(&file) {
                    bytes.extend_from_slice(&content);
                }
            }
            assert!(bytes.len() > 4096, "the SQLite file is there");
            bytes
        }
    }
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    let needle = needle.as_bytes();
    haystack
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

async fn users(client: &reqwest::Client, server: &Server) -> Vec<Value> {
    strong_get(client, server, "/api/users?consistency=strong")
        .await
        .as_array()
        .expect("the users")
        .clone()
}

fn entry<'a>(users: &'a [Value], id: &str) -> &'a Value {
    users
        .iter()
        .find(|u| u["user_id"] == id)
        .unwrap_or_else(|| panic!("user {id} in {users:?}"))
}

async fn delete(client: &reqwest::Client, server: &Server, id: &str, token: Option<&str>) -> u16 {
    let mut request = client.delete(server.url(&format!("/api/users/{id}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request
        .send()
        .await
        .expect("send the delete")
        .status()
        .as_u16()
}

/// Rebuilds every projection through the console and waits until each has
/// replayed the whole log again.
async fn rebuild_everything(client: &reqwest::Client, server: &Server) {
    let (_, projections) = get(client, server, "/api/projections").await;
    let mut names: Vec<String> = projections
        .as_array()
        .expect("the projections")
        .iter()
        .filter_map(|p| p["projection"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 5, "{names:?}");
    for name in &names {
        let response = client
            .post(server.url(&format!("/admin/api/projections/{name}/rebuild")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("ask for a rebuild");
        assert!(
            response.status().is_success(),
            "rebuild {name}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, projections) = get(client, server, "/api/projections").await;
        let done = projections
            .as_array()
            .expect("the projections")
            .iter()
            .all(|p| p["rebuild"].is_null() && p["lag_events"] == 0 && p["state"] == "live");
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rebuilds did not finish: {projections}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn forgets_a_user(backend: Backend) {
    let db = Database::new(backend, "forget_user").await;
    let mut server = Server::start(&db.url, &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]);
    let client = client();
    let run = marker();
    // Three users; the second will be forgotten.
    let people: Vec<(String, String)> = ["Keeper", "Forgotten", "Other"]
        .iter()
        .map(|who| {
            (
                format!("{who} Person{run}"),
                format!("{}.{run}@example.com", who.to_lowercase()),
            )
        })
        .collect();
    let mut ids = Vec::new();
    for (name, email) in &people {
        let done = post(
            &client,
            &server,
            "/api/users",
            json!({ "name": name, "email": email }),
        )
        .await;
        ids.push(done["user_id"].as_str().expect("a user id").to_owned());
    }
    // Money moves between accounts (their owners are labels, not users).
    let a = open_with(&client, &server, &format!("owner-a-{run}"), 10_000).await;
    let b = open_with(&client, &server, &format!("owner-b-{run}"), 5_000).await;
    post(
        &client,
        &server,
        "/api/transfers",
        json!({ "from": a, "to": b, "amount": 2_500 }),
    )
    .await;
    deposit(&client, &server, &b, 1).await;
    // The welcome e-mails went out (the mail server's copies).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, sent) = get(&client, &server, "/api/emails").await;
        let sent = sent.as_array().expect("the e-mails").clone();
        if people
            .iter()
            .all(|(_, email)| sent.iter().any(|m| m["to"] == email.as_str()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no welcome e-mails: {sent:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Only an operator forgets, and only a user who exists.
    let forgotten = &ids[1];
    assert_eq!(delete(&client, &server, forgotten, None).await, 401);
    assert_eq!(delete(&client, &server, forgotten, Some("nope")).await, 403);
    assert_eq!(
        delete(&client, &server, "user-nobody", Some(TOKEN)).await,
        404
    );
    assert_eq!(delete(&client, &server, forgotten, Some(TOKEN)).await, 200);
    // Forgetting again changes nothing.
    assert_eq!(delete(&client, &server, forgotten, Some(TOKEN)).await, 200);

    let listed = users(&client, &server).await;
    assert!(entry(&listed, forgotten)["name"].is_null(), "{listed:?}");
    assert!(entry(&listed, forgotten)["email"].is_null(), "{listed:?}");

    rebuild_everything(&client, &server).await;
    let listed = users(&client, &server).await;
    for (i, (name, email)) in people.iter().enumerate() {
        let user = entry(&listed, &ids[i]);
        if i == 1 {
            assert!(user["name"].is_null() && user["email"].is_null(), "{user}");
        } else {
            assert_eq!(user["name"], name.as_str(), "{user}");
            assert_eq!(user["email"], email.as_str(), "{user}");
        }
    }
    assert_eq!(balance(&client, &server, &a).await, 7_500);
    assert_eq!(balance(&client, &server, &b).await, 7_501);

    // The byte search: nothing of the forgotten user anywhere.
    let bytes = dump(backend, &db).await;
    let (name, email) = &people[1];
    assert!(
        !holds(&bytes, name),
        "the forgotten name is in the database"
    );
    assert!(
        !holds(&bytes, email),
        "the forgotten address is in the database"
    );
    assert!(!holds(&bytes, "Forgotten Person"), "a part of the name");
    // The search sees the data: plain columns and the others' e-mails (the
    // mail server's copies, kept as sent) are found.
    assert!(
        holds(&bytes, &format!("owner-a-{run}")),
        "the search reads the tables"
    );
    assert!(holds(&bytes, &people[0].1), "the other users' mail is kept");

    // The address is free again.
    let again = post(
        &client,
        &server,
        "/api/users",
        json!({ "name": "New Owner", "email": email }),
    )
    .await;
    assert_ne!(again["user_id"], forgotten.as_str());

    // Forgotten for good: across a restart.
    assert!(
        server.terminate(Duration::from_secs(30)),
        "{}",
        server.log()
    );
    let server = Server::start(&db.url, &[("OUTFLOW_ADMIN_TOKEN", TOKEN)]);
    let listed = users(&client, &server).await;
    assert!(entry(&listed, forgotten)["name"].is_null(), "{listed:?}");
    assert_eq!(entry(&listed, &ids[0])["name"], people[0].0.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_user_is_nowhere_in_sqlite() {
    forgets_a_user(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_user_is_nowhere_in_postgres() {
    forgets_a_user(Backend::Postgres).await;
}
