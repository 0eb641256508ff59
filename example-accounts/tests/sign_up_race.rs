//! One address, one user, with sign-ups racing through two server
//! processes on one database: each round eight clients (four per server)
//! sign up with the same address, in different letter case; exactly one
//! gets 201 and the seven others 409, and the directory lists the address
//! once. The rule is a decision enforced by the event store, so it holds
//! across processes without a table of reservations.

mod common;

use std::time::Duration;

use common::client::{client, strong_get};
use common::{Backend, Database, Server};
use serde_json::{json, Value};

async fn one_address_one_user(backend: Backend) {
    let db = Database::new(backend, "sign_up_race").await;
    let servers = [Server::start(&db.url, &[]), Server::start(&db.url, &[])];
    let client = client();
    let rounds: usize = std::env::var("OUTFLOW_SIGN_UP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for round in 0..rounds {
        let address = format!("racer-{round}@example.com");
        let mut racers = Vec::new();
        for racer in 0..8 {
            let url = servers[racer % 2].url("/api/users");
            let client = client.clone();
            // The same address, spelled differently by each racer.
            let email = if racer % 3 == 0 {
                address.to_uppercase()
            } else {
                address.clone()
            };
            racers.push(tokio::spawn(async move {
                let response = client
                    .post(url)
                    .json(&json!({ "name": format!("Racer {racer}"), "email": email }))
                    .send()
                    .await
                    .expect("send the sign-up");
                let status = response.status().as_u16();
                let body: Value = response.json().await.expect("a JSON answer");
                (status, body)
            }));
        }
        let mut created = 0;
        for racer in racers {
            let (status, body) = racer.await.expect("a racer panicked");
            match status {
                201 => created += 1,
                409 => assert!(
                    body["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("already taken")),
                    "{body}"
                ),
                other => panic!(
                    "round {round}: {other} {body}\n{}\n{}",
                    servers[0].log(),
                    servers[1].log()
                ),
            }
        }
        assert_eq!(created, 1, "round {round}: one sign-up per address");
    }
    // The directory (a projection, read strongly) lists each address once.
    let users = strong_get(&client, &servers[0], "/api/users?consistency=strong").await;
    let users = users.as_array().expect("users");
    for round in 0..rounds {
        let address = format!("racer-{round}@example.com");
        let holders = users.iter().filter(|u| u["email"] == address).count();
        assert_eq!(holders, 1, "{address}: {users:?}");
    }
    for mut server in servers {
        assert!(
            server.terminate(Duration::from_secs(30)),
            "{}",
            server.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_sign_ups_on_sqlite() {
    one_address_one_user(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_sign_ups_on_postgres() {
    one_address_one_user(Backend::Postgres).await;
}
