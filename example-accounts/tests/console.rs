//! The operators' console (`/admin`, from the framework) in a real browser:
//! headless Chromium, driven through ChromeDriver, signs in with the
//! operator's token, sees the projections, rebuilds `balances` and watches
//! its progress to the end, retries a parked welcome e-mail (the mail
//! stand-in still refuses it: it fails again, one more attempt counted) and
//! discards it, retries another once the mail server accepts its domain
//! again (delivered, the dead letter gone), browses an account's stream, and
//! follows a transfer's correlation id from its credit to the whole chain
//! (request, debit, credit, completion), metadata shown. A screenshot is kept in
//! `target/test-artifacts/`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::webdriver::*;
use common::{Backend, Database, Server};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_rebuilds_and_browses_in_a_browser() {
    for binary in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(binary).exists(),
            "{binary} is missing: install Debian's `chromium` and `chromium-driver` \
             (scripts/test.sh does, when run as root with apt-get)"
        );
    }
    let db = Database::new(Backend::Sqlite, "console").await;
    std::fs::create_dir_all(ARTIFACTS).expect("the artifacts directory");
    let flaky = PathBuf::from(ARTIFACTS).join(format!("refused-{}.txt", std::process::id()));
    std::fs::write(&flaky, "flaky.example\n").expect("the refusal list");
    let server = Server::start(
        &db.url,
        &[
            ("OUTFLOW_ADMIN_TOKEN", "secret"),
            ("OUTFLOW_REFUSE_MAIL", "bounce.example"),
            (
                "OUTFLOW_REFUSE_MAIL_FILE",
                flaky.to_str().expect("a UTF-8 path"),
            ),
        ],
    );
    let result = scenario(&server, &flaky).await;
    let _ = std::fs::remove_file(&flaky);
    if let Err(error) = result {
        panic!("{error}\n\n--- the server's log ---\n{}", server.log());
    }
}

async fn scenario(server: &Server, flaky: &Path) -> Outcome<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("build the HTTP client: {e}"))?;
    let opened = api(
        &http,
        server,
        "/api/accounts",
        json!({ "owner": "Console" }),
        StatusCode::CREATED,
    )
    .await?;
    let account = opened["account_id"]
        .as_str()
        .ok_or_else(|| format!("no account_id in {opened}"))?
        .to_owned();
    for amount in [100, 200] {
        api(
            &http,
            server,
            &format!("/api/accounts/{account}/deposits"),
            json!({ "amount": amount }),
            StatusCode::OK,
        )
        .await?;
    }
    // A welcome e-mail the mail stand-in refuses: parked.
    api(
        &http,
        server,
        "/api/users",
        json!({ "name": "Eve", "email": "eve@bounce.example" }),
        StatusCode::CREATED,
    )
    .await?;
    std::fs::create_dir_all(ARTIFACTS).map_err(|e| format!("create {ARTIFACTS}: {e}"))?;
    let driver = ChromeDriver::start(
        &http,
        &Path::new(ARTIFACTS).join("chromedriver-console.log"),
    )
    .await?;
    let browser = driver.new_session(&http).await?;
    let outcome = on_the_console(&browser, &http, server, &account, flaky).await;
    let ended = browser.delete().await;
    outcome.and(ended)
}

/// Runs `script` until it returns something truthy, for up to [`PAGE_WAIT`].
async fn until(browser: &Session<'_>, what: &str, script: &str) -> Outcome<Value> {
    until_with(browser, what, script, json!([])).await
}

/// [`until`], the script given `args` (`arguments[i]`).
async fn until_with(
    browser: &Session<'_>,
    what: &str,
    script: &str,
    args: Value,
) -> Outcome<Value> {
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let seen = browser.script(script, args.clone()).await?;
        if !(seen.is_null() || seen == json!(false)) {
            return Ok(seen);
        }
        if Instant::now() > deadline {
            let page = browser
                .script("return document.body.innerText", json!([]))
                .await?;
            return Err(format!(
                "the console did not show {what} within {PAGE_WAIT:?}; it shows:\n{}",
                page.as_str().unwrap_or_default()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn on_the_console(
    browser: &Session<'_>,
    http: &reqwest::Client,
    server: &Server,
    account: &str,
    flaky: &Path,
) -> Outcome<()> {
    browser
        .post("url", json!({ "url": server.url("/admin") }))
        .await?;
    browser
        .script(
            "document.getElementById('token').value = 'secret';
             document.querySelector('#login button').click();",
            json!([]),
        )
        .await?;
    until(
        browser,
        "the operator signed in and the projections listed",
        "const who = document.getElementById('who').textContent;
         const rows = document.querySelectorAll('#units tbody tr[data-projection=\"balances\"]');
         return who.includes('operator') && rows.length > 0;",
    )
    .await?;

    // A rebuild, its progress to the end.
    browser
        .script(
            "document.querySelector('tr[data-projection=\"balances\"] button[data-action=\"rebuild\"]').click();",
            json!([]),
        )
        .await?;
    let shown = until(
        browser,
        "the rebuild of balances done",
        "const row = document.getElementById('rebuild-balances');
         return row && row.dataset.done === 'true' ? row.textContent : null;",
    )
    .await?;
    let text = shown.as_str().unwrap_or_default();
    if !text.contains("done") {
        return Err(format!("the rebuild's row says {text:?}"));
    }

    // The parked e-mail: retried (refused again: one more attempt), then
    // discarded.
    let attempts = until(
        browser,
        "the parked welcome e-mail",
        "const row = document.querySelector('#letters tr.letter');
         return row ? row.textContent : null;",
    )
    .await?;
    let before = attempts.as_str().unwrap_or_default().to_owned();
    if !before.contains("welcome") && !before.contains("User") {
        return Err(format!("the dead letter is not the e-mail's: {before}"));
    }
    browser
        .script(
            "document.querySelector('#letters tr.letter button[data-action=\"retry\"]').click();",
            json!([]),
        )
        .await?;
    until_with(
        browser,
        "the retry refused again, its attempts counted",
        "const error = document.getElementById('error').textContent;
         const row = document.querySelector('#letters tr.letter');
         return error.includes('failed_again') && row && row.textContent !== arguments[0];",
        json!([before]),
    )
    .await
    .map_err(|e| {
        format!(
            "{e}
(before the retry: {before})"
        )
    })?;
    browser
        .script(
            "document.querySelector('#letters tr.letter button[data-action=\"discard\"]').click();",
            json!([]),
        )
        .await?;
    until(
        browser,
        "no dead letter left",
        "return document.querySelectorAll('#letters tr.letter').length === 0;",
    )
    .await?;

    // Another parked e-mail, to a domain the mail server refuses for a
    // while: once it accepts again, a retry from the page delivers it.
    api(
        http,
        server,
        "/api/users",
        json!({ "name": "Fay", "email": "fay@flaky.example" }),
        StatusCode::CREATED,
    )
    .await?;
    until(
        browser,
        "Fay's parked welcome e-mail",
        "return document.querySelectorAll('#letters tr.letter').length === 1;",
    )
    .await?;
    std::fs::write(flaky, "").map_err(|e| format!("empty {}: {e}", flaky.display()))?;
    browser
        .script(
            "document.getElementById('error').textContent = '';
             document.querySelector('#letters tr.letter button[data-action=\"retry\"]').click();",
            json!([]),
        )
        .await?;
    until(
        browser,
        "the retried e-mail delivered and its dead letter gone",
        "return document.querySelectorAll('#letters tr.letter').length === 0
             && !document.getElementById('error').textContent.includes('failed');",
    )
    .await?;
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let emails = http
            .get(server.url("/api/emails"))
            .send()
            .await
            .map_err(|e| format!("GET /api/emails: {e}"))?
            .text()
            .await
            .map_err(|e| format!("GET /api/emails: {e}"))?;
        if emails.contains("fay@flaky.example") {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("no e-mail to Fay after the retry: {emails}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The account's stream, with its payloads (an operator sees them).
    browser
        .script(
            "document.getElementById('q-stream').value = 'account/' + arguments[0];
             document.querySelector('#browse button[type=submit]').click();",
            json!([account]),
        )
        .await?;
    let events = until(
        browser,
        "the account's three events",
        "const events = Array.from(document.querySelectorAll('#events .event'), e => e.textContent);
         return events.length >= 3 ? events : null;",
    )
    .await?;
    let listed = events.to_string();
    for expected in ["AccountOpened", "Deposited", "\\\"amount\\\":200"] {
        if !listed.contains(expected) {
            return Err(format!("the stream lacks {expected}: {listed}"));
        }
    }

    // A transfer's whole chain from its correlation id: the request, the
    // debit and the credit the process dispatched, the completion — each
    // event with its metadata (the process that caused it).
    let second = api(
        http,
        server,
        "/api/accounts",
        json!({ "owner": "Second" }),
        StatusCode::CREATED,
    )
    .await?;
    let second = second["account_id"]
        .as_str()
        .ok_or_else(|| format!("no account_id in {second}"))?
        .to_owned();
    let transfer = api(
        http,
        server,
        "/api/transfers",
        json!({ "from": account, "to": second, "amount": 50 }),
        StatusCode::ACCEPTED,
    )
    .await?;
    let transfer = transfer["transfer_id"]
        .as_str()
        .ok_or_else(|| format!("no transfer_id in {transfer}"))?
        .to_owned();
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let status: Value = http
            .get(server.url(&format!("/api/transfers/{transfer}")))
            .send()
            .await
            .map_err(|e| format!("GET the transfer: {e}"))?
            .json()
            .await
            .unwrap_or(Value::Null);
        if status["status"] == "completed" {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the transfer did not complete: {status}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    browser
        .script(
            "document.getElementById('q-stream').value = 'account/' + arguments[0];
             document.querySelector('#browse button[type=submit]').click();",
            json!([second]),
        )
        .await?;
    let credit = until(
        browser,
        "the credit, with the process in its metadata",
        "const credit = Array.from(document.querySelectorAll('#events .event'))
             .find(e => e.textContent.includes('TransferredIn'));
         const meta = credit && credit.querySelector('pre.metadata');
         return meta && meta.textContent.includes('process: transfer_process') ? meta.textContent : null;",
    )
    .await?;
    browser
        .script(
            "Array.from(document.querySelectorAll('#events .event'))
                 .find(e => e.textContent.includes('TransferredIn'))
                 .querySelector('a').click();",
            json!([]),
        )
        .await?;
    until(
        browser,
        "the transfer's chain: request, debit, credit, completion",
        "const seen = Array.from(document.querySelectorAll('#events .event'), e => e.textContent).join(' ');
         return ['TransferRequested', 'TransferredOut', 'TransferredIn', 'TransferCompleted']
             .every(t => seen.includes(t)) && !seen.includes('AccountOpened');",
    )
    .await
    .map_err(|e| format!("{e}\n(the credit's metadata: {credit})"))?;

    let png = decode_base64(
        browser
            .get("screenshot")
            .await?
            .as_str()
            .ok_or("the screenshot is not a string")?,
    )?;
    let file = PathBuf::from(ARTIFACTS).join("console.png");
    std::fs::write(&file, &png).map_err(|e| format!("write {}: {e}", file.display()))?;
    if !png.starts_with(PNG_SIGNATURE) || png.len() <= 1000 {
        return Err(format!(
            "the screenshot ({} bytes) is not a PNG of a page",
            png.len()
        ));
    }
    Ok(())
}
