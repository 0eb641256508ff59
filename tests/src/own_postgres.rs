//! A PostgreSQL server of a test's own (for tests that restart it or hold
//! it back, which would disturb the other tests on the shared server).
//! Needs `OUTFLOW_PG_BIN`, which `scripts/test.sh` sets; as root it runs the
//! server as `OUTFLOW_PG_SERVICE_USER` (default `postgres`).

use std::path::PathBuf;
use std::process::Command;

/// A PostgreSQL server of this test's own, so restarting it disturbs no
/// other test. Stopped (by its data directory's postmaster) when dropped.
pub struct OwnPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn service_user() -> String {
    std::env::var("OUTFLOW_PG_SERVICE_USER").unwrap_or_else(|_| "postgres".to_owned())
}

impl OwnPostgres {
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", &service_user(), "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
        );
    }

    /// Initializes and starts a new cluster on a free port.
    pub fn start_new() -> OwnPostgres {
        let bin = PathBuf::from(std::env::var("OUTFLOW_PG_BIN").expect(
            "OUTFLOW_PG_BIN is not set: run the tests with scripts/test.sh, which finds PostgreSQL",
        ));
        let dir = std::env::temp_dir().join(format!(
            "outflow-restart-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the server");
        if is_root() {
            let status = Command::new("chown")
                .arg(service_user())
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the server's directory");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server = OwnPostgres { bin, dir, port };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "outflow",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
        );
        server.pg_ctl("start");
        server
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Runs `pg_ctl <action>` on the cluster (`restart`, `stop`, ...).
    pub fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        let data = self.data();
        let mut args: Vec<&str> = vec!["-D", &data, "-l", &log, "-w", "-t", "60", "-o", &options];
        if action == "restart" {
            args.extend(["-m", "fast"]);
        }
        args.push(action);
        self.run("pg_ctl", &args);
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`: no
    /// checkpoint, no flush of what is not flushed yet), then starts it
    /// again; it recovers from its WAL.
    pub fn crash_and_start(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        self.pg_ctl("start");
    }

    /// The cluster's connection URL.
    pub fn url(&self) -> String {
        format!(
            "postgres://outflow@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Connects a store to `url`, retrying (10 s at most) while the server
/// starts.
pub async fn connect(url: &str) -> outflow::PostgresStore {
    for _ in 0..100 {
        if let Ok(store) = outflow::PostgresStore::connect(url).await {
            return store;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("cannot connect to the test's own server at {url}");
}
