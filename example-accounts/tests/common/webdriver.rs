//! A small client of ChromeDriver's W3C WebDriver HTTP API, driving a
//! headless Chromium for the page tests: start the driver on a free
//! loopback port, open a session, run commands and scripts, decode the
//! screenshots.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a page gets to show what a test waits for.
pub const PAGE_WAIT: Duration = Duration::from_secs(20);
/// Where the screenshots (and ChromeDriver's log) go.
pub const ARTIFACTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-artifacts");
/// The first bytes of every PNG file.
pub const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// What a step reports when it fails; the test adds the server's log.
pub type Outcome<T> = Result<T, String>;

/// A ChromeDriver process on a free loopback port, killed when dropped.
pub struct ChromeDriver {
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
    pub async fn start(http: &reqwest::Client, log: &Path) -> Outcome<ChromeDriver> {
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
    pub async fn new_session<'a>(&self, http: &'a reqwest::Client) -> Outcome<Session<'a>> {
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
pub struct Session<'a> {
    http: &'a reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    url: String,
}

impl Session<'_> {
    pub async fn get(&self, path: &str) -> Outcome<Value> {
        command(
            self.http,
            Method::GET,
            &format!("{}/{path}", self.url),
            None,
        )
        .await
    }

    pub async fn post(&self, path: &str, body: Value) -> Outcome<Value> {
        command(
            self.http,
            Method::POST,
            &format!("{}/{path}", self.url),
            Some(body),
        )
        .await
    }

    /// Ends the session, which closes Chromium.
    pub async fn delete(&self) -> Outcome<()> {
        command(self.http, Method::DELETE, &self.url, None)
            .await
            .map(drop)
    }

    /// Runs `script` in the page (`arguments[i]` are `args`) and returns
    /// what it returns.
    pub async fn script(&self, script: &str, args: Value) -> Outcome<Value> {
        self.post("execute/sync", json!({ "script": script, "args": args }))
            .await
    }
}

/// Sends one WebDriver command and returns its `value`; a WebDriver error
/// (`{"value": {"error", "message"}}`) becomes the outcome's error.
pub async fn command(
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
pub fn decode_base64(text: &str) -> Outcome<Vec<u8>> {
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

/// POSTs `body` to the example server's `path`, expects `status`, returns the JSON answer.
pub async fn api(
    http: &reqwest::Client,
    server: &super::Server,
    path: &str,
    body: Value,
    status: reqwest::StatusCode,
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
