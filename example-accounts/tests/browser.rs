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

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use common::webdriver::*;
use common::{Backend, Database, Server};
use reqwest::StatusCode;
use serde_json::json;

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
