//! The live page works in a real browser, on both backends: headless
//! Chromium, driven through ChromeDriver's W3C WebDriver HTTP API, opens
//! `/`, shows an account's balance from `GET /api/accounts`, then — after a
//! deposit made through the API — shows the `Deposited` event in the live
//! feed (server-sent events from `/api/events`) and the new balance, without
//! a reload. A screenshot of the page is kept in `target/test-artifacts/`.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's
//! `chromium` and `chromium-driver`, which `scripts/test.sh` installs); the
//! test fails, rather than skips, without them.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Backend, Database, Server};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long the page gets to show what the test waits for.
const PAGE_WAIT: Duration = Duration::from_secs(20);
/// Where the screenshots (and ChromeDriver's log) go.
const ARTIFACTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-artifacts");
/// The first bytes of every PNG file.
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// What a step reports when it fails; the test adds the server's log.
type Outcome<T> = Result<T, String>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_balances_and_the_feed_in_a_browser_on_sqlite() {
    live_page(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_balances_and_the_feed_in_a_browser_on_postgres() {
    live_page(Backend::Postgres).await;
}

/// The whole scenario on `backend`; panics with the server's log on failure.
async fn live_page(backend: Backend) {
    for binary in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: install Debian's `chromium` and `chromium-driver` \
             (scripts/test.sh does, when run as root with apt-get)"
        );
    }
    let db = Database::new(backend, "browser").await;
    let server = Server::start(&db.url, &[("OUTFLOW_ADMIN_TOKEN", "secret")]);
    let name = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    if let Err(error) = scenario(&server, name).await {
        panic!("{error}\n\n--- the server's log ---\n{}", server.log());
    }
}

async fn scenario(server: &Server, name: &str) -> Outcome<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("build the HTTP client: {e}"))?;

    // An account with 10.00 in it, made through the API.
    let opened = api(
        &http,
        server,
        "/api/accounts",
        json!({ "owner": "Browser" }),
        StatusCode::CREATED,
    )
    .await?;
    let account = opened["account_id"]
        .as_str()
        .ok_or_else(|| format!("no account_id in {opened}"))?
        .to_owned();
    let deposits = format!("/api/accounts/{account}/deposits");
    api(
        &http,
        server,
        &deposits,
        json!({ "amount": 1000 }),
        StatusCode::OK,
    )
    .await?;

    std::fs::create_dir_all(ARTIFACTS).map_err(|e| format!("create {ARTIFACTS}: {e}"))?;
    let driver = ChromeDriver::start(
        &http,
        &Path::new(ARTIFACTS).join(format!("chromedriver-{name}.log")),
    )
    .await?;
    let browser = driver.new_session(&http).await?;
    // Whatever happens on the page, end the session so that Chromium exits.
    let outcome = on_the_page(&browser, server, &http, &account, &deposits, name).await;
    let ended = browser.delete().await;
    outcome.and(ended)
}

/// Steps 4 to 6: open the page, watch a deposit arrive, take a screenshot.
async fn on_the_page(
    browser: &Session<'_>,
    server: &Server,
    http: &reqwest::Client,
    account: &str,
    deposits: &str,
    name: &str,
) -> Outcome<()> {
    browser
        .post("url", json!({ "url": server.url("/") }))
        .await?;
    // The balance from the first read, and a feed that is listening: an
    // event committed before the feed connects would never be shown.
    browser
        .wait_for("the balance 1000 and a connected feed", account, |page| {
            page.cents == Some(1000) && page.feed_state == "open"
        })
        .await?;

    api(
        http,
        server,
        deposits,
        json!({ "amount": 234 }),
        StatusCode::OK,
    )
    .await?;
    browser
        .wait_for(
            "the deposit in the feed and the balance 1234",
            account,
            |page| {
                page.cents == Some(1234)
                    && page
                        .feed
                        .iter()
                        .any(|item| item.contains(account) && item.contains("Deposited"))
            },
        )
        .await?;

    let png = decode_base64(
        browser
            .get("screenshot")
            .await?
            .as_str()
            .ok_or("the screenshot is not a string")?,
    )?;
    let file = PathBuf::from(ARTIFACTS).join(format!("live-page-{name}.png"));
    std::fs::write(&file, &png).map_err(|e| format!("write {}: {e}", file.display()))?;
    if !png.starts_with(PNG_SIGNATURE) || png.len() <= 1000 {
        return Err(format!(
            "the screenshot ({} bytes, in {}) is not a PNG of a page",
            png.len(),
            file.display()
        ));
    }
    Ok(())
}

/// POSTs `body` to the example server's `path`, expects `status`, returns the JSON answer.
async fn api(
    http: &reqwest::Client,
    server: &Server,
    path: &str,
    body: Value,
    status: StatusCode,
) -> Outcome<Value> {
    let response = http
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("POST {path}: {e}"))?;
    let got = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("POST {path}: {e}"))?;
    if got != status {
        return Err(format!(
            "POST {path} {body}: expected {status}, got {got}: {text}"
        ));
    }
    serde_json::from_str(&text).map_err(|e| format!("POST {path}: not JSON ({e}): {text}"))
}

// ------------------------------------------------------------ WebDriver

/// A ChromeDriver process on a free loopback port, killed when dropped.
struct ChromeDriver {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    base: String,
    /// The `TMPDIR` given to ChromeDriver and so to Chromium, whose profile
    /// directories would otherwise be left behind in the system's.
    scratch: PathBuf,
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

impl ChromeDriver {
    /// Starts ChromeDriver, logging to `log`, and waits until it is ready.
    async fn start(http: &reqwest::Client, log: &Path) -> Outcome<ChromeDriver> {
        // A port the system just handed out, free again once the listener drops.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|e| format!("find a free port: {e}"))?
            .port();
        let scratch =
            std::env::temp_dir().join(format!("outflow-browser-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&scratch)
            .map_err(|e| format!("create {}: {e}", scratch.display()))?;
        let child = Command::new(CHROMEDRIVER)
            .env("TMPDIR", &scratch)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&scratch);
                format!("start {CHROMEDRIVER}: {e}")
            })?;
        let mut driver = ChromeDriver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            scratch,
        };
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            let status = http.get(format!("{}/status", driver.base)).send().await;
            if let Ok(response) = status {
                if let Ok(body) = response.json::<Value>().await {
                    if body["value"]["ready"] == true {
                        return Ok(driver);
                    }
                }
            }
            if let Ok(Some(exit)) = driver.child.try_wait() {
                return Err(format!(
                    "{CHROMEDRIVER} exited ({exit}); see {}",
                    log.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{CHROMEDRIVER} was not ready within {PAGE_WAIT:?}; see {}",
                    log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens a headless Chromium.
    async fn new_session<'a>(&self, http: &'a reqwest::Client) -> Outcome<Session<'a>> {
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            },
        }}});
        let created = command(
            http,
            Method::POST,
            &format!("{}/session", self.base),
            Some(capabilities),
        )
        .await?;
        let id = created["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no sessionId in {created}"))?;
        Ok(Session {
            http,
            url: format!("{}/session/{id}", self.base),
        })
    }
}

/// One browser session.
struct Session<'a> {
    http: &'a reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    url: String,
}

/// What the page shows about one account, read by [`Session::look`].
struct Page {
    /// The balance cell's `data-cents`, if the account's row is there.
    cents: Option<i64>,
    /// The feed's items, newest first.
    feed: Vec<String>,
    /// `#feed-status`: "connected", "missed N events", "disconnected, retrying"…
    feed_status: String,
    /// Its `data-state`: "open" once the feed listens.
    feed_state: String,
    /// `#load-status`: when the tables were last read, or why they could not be.
    load_status: String,
}

impl std::fmt::Display for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "balance (data-cents): {:?}", self.cents)?;
        writeln!(f, "tables: {}", self.load_status)?;
        writeln!(f, "feed: {} ({})", self.feed_status, self.feed_state)?;
        for item in &self.feed {
            writeln!(f, "  {item}")?;
        }
        Ok(())
    }
}

/// Reads the page; `arguments[0]` is the account id.
const LOOK: &str = r##"
const text = id => (document.getElementById(id) || {}).textContent || "";
const balance = document.querySelector(`tr[data-account="${CSS.escape(arguments[0])}"] .balance`);
const status = document.getElementById("feed-status");
return {
  cents: balance ? balance.dataset.cents : null,
  feed: Array.from(document.querySelectorAll("#feed li"), li => li.textContent),
  feed_status: text("feed-status"),
  feed_state: status ? status.dataset.state : "",
  load_status: text("load-status"),
};
"##;

impl Session<'_> {
    async fn get(&self, path: &str) -> Outcome<Value> {
        command(
            self.http,
            Method::GET,
            &format!("{}/{path}", self.url),
            None,
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> Outcome<Value> {
        command(
            self.http,
            Method::POST,
            &format!("{}/{path}", self.url),
            Some(body),
        )
        .await
    }

    /// Ends the session, which closes Chromium.
    async fn delete(&self) -> Outcome<()> {
        command(self.http, Method::DELETE, &self.url, None)
            .await
            .map(drop)
    }

    /// What the page shows about `account` right now.
    async fn look(&self, account: &str) -> Outcome<Page> {
        let seen = self
            .post("execute/sync", json!({ "script": LOOK, "args": [account] }))
            .await?;
        let text = |key: &str| seen[key].as_str().unwrap_or_default().to_owned();
        Ok(Page {
            cents: seen["cents"].as_str().and_then(|cents| cents.parse().ok()),
            feed: seen["feed"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            feed_status: text("feed_status"),
            feed_state: text("feed_state"),
            load_status: text("load_status"),
        })
    }

    /// Looks at the page until `done` holds, for up to [`PAGE_WAIT`].
    async fn wait_for(
        &self,
        what: &str,
        account: &str,
        done: impl Fn(&Page) -> bool,
    ) -> Outcome<Page> {
        let deadline = Instant::now() + PAGE_WAIT;
        loop {
            let page = self.look(account).await?;
            if done(&page) {
                return Ok(page);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the page did not show {what} within {PAGE_WAIT:?} (account {account}); it shows\n{page}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Sends one WebDriver command and returns its `value`; a WebDriver error
/// (`{"value": {"error", "message"}}`) becomes the outcome's error.
async fn command(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<Value>,
) -> Outcome<Value> {
    let mut request = http.request(method.clone(), url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("WebDriver {method} {url}: {e}"))?;
    let status = response.status();
    let mut answer: Value = response
        .json()
        .await
        .map_err(|e| format!("WebDriver {method} {url}: {status}, not JSON: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "WebDriver {method} {url}: {status} {}: {}",
            answer["value"]["error"], answer["value"]["message"]
        ));
    }
    Ok(answer["value"].take())
}

// ------------------------------------------------------------ base64

/// Decodes standard base64 (`A-Z a-z 0-9 + /`, `=` padding), the encoding
/// of WebDriver's screenshots.
fn decode_base64(text: &str) -> Outcome<Vec<u8>> {
    let mut bytes = Vec::with_capacity(text.len() / 4 * 3);
    // Bits read but not yet written out, and how many there are (< 8).
    let (mut pending, mut count) = (0u32, 0u32);
    for symbol in text.bytes().filter(|b| !b.is_ascii_whitespace()) {
        let value = match symbol {
            b'A'..=b'Z' => symbol - b'A',
            b'a'..=b'z' => symbol - b'a' + 26,
            b'0'..=b'9' => symbol - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return Err(format!("not base64: byte {symbol:#04x}")),
        };
        pending = (pending << 6) | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            bytes.push((pending >> count) as u8);
            pending &= (1 << count) - 1;
        }
    }
    Ok(bytes)
}

#[test]
fn base64_decodes_with_and_without_padding() {
    assert_eq!(decode_base64("aGVsbG8=").as_deref(), Ok(&b"hello"[..]));
    assert_eq!(decode_base64("aGVsbG8h").as_deref(), Ok(&b"hello!"[..]));
    assert_eq!(decode_base64("aA==").as_deref(), Ok(&b"h"[..]));
    assert!(decode_base64("a*").is_err());
}
