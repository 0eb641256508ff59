//! Runs the example application as a real server process for the tests: on
//! a fresh SQLite file or a fresh PostgreSQL database (from `DATABASE_URL`,
//! which `scripts/test.sh` provides), bound to a free loopback port, killed
//! when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub mod client;
pub mod webdriver;

use outflow::sqlx::postgres::PgConnectOptions;
use outflow::sqlx::{ConnectOptions, Connection};

/// Where a test's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database of `backend` for one test, named after `label`.
pub struct Database {
    /// What to pass as `--database-url`.
    pub url: String,
    /// The directory holding the SQLite file (removed on drop).
    dir: Option<PathBuf>,
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn unique(label: &str) -> String {
    format!(
        "{}_{}",
        label
            .to_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

impl Database {
    pub async fn new(backend: Backend, label: &str) -> Database {
        let name = unique(label);
        match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("outflow-example-{name}"));
                std::fs::create_dir_all(&dir).expect("a directory for the SQLite file");
                Database {
                    url: format!("sqlite:{}", dir.join("accounts.db").display()),
                    dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let server = std::env::var("DATABASE_URL").expect(
                    "DATABASE_URL is not set: run the tests with scripts/test.sh, which starts PostgreSQL",
                );
                let admin: PgConnectOptions = server.parse().expect("DATABASE_URL is a valid URL");
                let mut conn = admin.connect().await.expect("connect to the test server");
                outflow::sqlx::query(&format!("CREATE DATABASE \"t_{name}\""))
                    .execute(&mut conn)
                    .await
                    .expect("create the test database");
                conn.close().await.expect("close the admin connection");
                let mut url = url_with_database(&server, &format!("t_{name}"));
                if !url.contains("sslmode=") {
                    url.push_str(if url.contains('?') { "&" } else { "?" });
                    url.push_str("sslmode=disable");
                }
                Database { url, dir: None }
            }
        }
    }
}

/// `server` (a `postgres://` URL) with its database replaced by `database`.
fn url_with_database(server: &str, database: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut url = format!("{}/{database}", &base[..host_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// The example application serving HTTP on a free loopback port.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Standard error lines, collected as the server runs.
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Standard output lines after the `listening on` one.
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `example-accounts --database-url URL serve --bind 127.0.0.1:0`
    /// with `env` set, and waits until it listens.
    pub fn start(database_url: &str, env: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_example-accounts"));
        command
            .args([
                "--database-url",
                database_url,
                "serve",
                "--bind",
                "127.0.0.1:0",
            ])
            .env_remove("OUTFLOW_ADMIN_TOKEN")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start the example server");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        std::thread::spawn({
            let lines = lines.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines.lock().expect("stderr lines").push(line);
                }
            }
        });
        let (found, listening) = mpsc::channel();
        let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        std::thread::spawn({
            let printed = printed.clone();
            move || {
                let mut found = Some(found);
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    match line.strip_prefix("listening on ") {
                        Some(rest) if found.is_some() => {
                            if let Some(found) = found.take() {
                                let _ = found.send(rest.trim().to_owned());
                            }
                        }
                        _ => printed.lock().expect("stdout lines").push(line),
                    }
                }
            }
        });
        let base = match listening.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not start within 60 s; its log:\n{}",
                    lines.lock().expect("stderr lines").join("\n")
                );
            }
        };
        Server {
            child,
            base,
            stderr: lines,
            stdout: printed,
        }
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a line of standard output containing
    /// `text`; returns whether it came.
    pub fn wait_for_output(&self, text: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self
                .stdout
                .lock()
                .expect("stdout lines")
                .iter()
                .any(|line| line.contains(text))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// What the server wrote to standard error so far.
    pub fn log(&self) -> String {
        self.stderr.lock().expect("stderr lines").join("\n")
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns
    /// whether the process exited successfully in time.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
