//! A JetStream cluster of a test's own (for tests that kill and restart its
//! nodes, which would disturb the other tests on a shared cluster). Needs
//! `OUTFLOW_NATS_BIN`, which `scripts/test.sh` sets.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The cluster's name, shared by every node's configuration.
pub const CLUSTER_NAME: &str = "outflow";

/// How long a node may take to accept client connections after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The `nats-server` binary. A missing `OUTFLOW_NATS_BIN` fails the test
/// (run the suite through `scripts/test.sh`, which provides it).
fn nats_bin() -> String {
    std::env::var("OUTFLOW_NATS_BIN").expect(
        "OUTFLOW_NATS_BIN is not set: run the tests with scripts/test.sh, which finds nats-server",
    )
}

/// One node of the cluster: its fixed name, ports and directory, and the
/// process while it runs.
struct Node {
    /// The server name, `n1`, `n2`, ...
    name: String,
    /// The port it listens on for clients.
    client_port: u16,
    /// The port it listens on for routes from the other nodes.
    route_port: u16,
    /// Its configuration file, store directory and logs.
    dir: PathBuf,
    /// The running server, if any.
    child: Option<Child>,
    /// How many times it was started (numbers its log files).
    starts: u32,
}

impl Node {
    /// The configuration file.
    fn config(&self) -> PathBuf {
        self.dir.join("server.conf")
    }

    /// The log of its latest start.
    fn log(&self) -> PathBuf {
        self.dir.join(format!("server-{}.log", self.starts))
    }

    /// The last lines of its latest log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!(
            "--- {} (127.0.0.1:{}, start {}):\n{tail}",
            self.name, self.client_port, self.starts
        )
    }

    /// Whether it accepts client connections now.
    fn accepts(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.client_port)).is_ok()
    }
}

/// A JetStream cluster of a test's own: nodes `n1`..`nN` of cluster
/// [`CLUSTER_NAME`], each on fixed loopback ports with its own store
/// directory, so a node can be killed and started again as the same server.
/// Every node is killed, and the directory removed, when dropped.
pub struct OwnCluster {
    /// The `nats-server` binary.
    bin: String,
    /// The directory holding every node's directory.
    dir: PathBuf,
    /// The nodes, `n1` first.
    nodes: Vec<Node>,
}

impl OwnCluster {
    /// Starts a cluster of `nodes` nodes (3 in practice: JetStream needs a
    /// majority of them to elect leaders) and waits until every node
    /// accepts client connections. JetStream may not be usable yet: see
    /// [`OwnCluster::wait_for_meta_leader`].
    pub fn start(nodes: usize) -> OwnCluster {
        assert!(nodes > 0, "a cluster needs at least one node");
        let bin = nats_bin();
        let dir = std::env::temp_dir().join(format!(
            "outflow-nats-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        // Every port at once, all held until all are chosen, so none is
        // handed out twice.
        let listeners: Vec<TcpListener> = (0..nodes * 2)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("the address of a bound port").port())
            .collect();
        drop(listeners);
        let nodes: Vec<Node> = (0..nodes)
            .map(|i| Node {
                name: format!("n{}", i + 1),
                client_port: ports[2 * i],
                route_port: ports[2 * i + 1],
                dir: dir.join(format!("n{}", i + 1)),
                child: None,
                starts: 0,
            })
            .collect();
        for node in &nodes {
            std::fs::create_dir_all(&node.dir).expect("create a node's directory");
            let routes: Vec<String> = nodes
                .iter()
                .filter(|other| other.name != node.name)
                .map(|other| format!("    nats-route://127.0.0.1:{}", other.route_port))
                .collect();
            let config = format!(
                "server_name: {name}\n\
                 listen: 127.0.0.1:{client}\n\
                 jetstream {{\n  store_dir: {store:?}\n}}\n\
                 cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{route}\n  routes: [\n{routes}\n  ]\n}}\n",
                name = node.name,
                client = node.client_port,
                store = node.dir.join("store").display().to_string(),
                route = node.route_port,
                routes = routes.join("\n"),
            );
            std::fs::write(node.config(), config).expect("write a node's configuration");
        }
        let mut cluster = OwnCluster { bin, dir, nodes };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_accepting(i);
        }
        cluster
    }

    /// How many nodes the cluster has.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The client URLs of every node, comma-separated (as `NATS_CLUSTER_URL`
    /// from `scripts/services.sh`). `async_nats::connect` takes one address
    /// per item: pass it [`OwnCluster::url_list`], or this split on commas.
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// The client URLs of every node, `n1` first; `async_nats::connect`
    /// takes this list as it is.
    pub fn url_list(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The client URL of node `i` (0-based: node 0 is `n1`).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// The server name of node `i` (`n1` for node 0).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node whose server name is `server_name` (as
    /// JetStream reports leaders and replicas: `n1` is 0).
    pub fn node_index(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == server_name)
    }

    /// Whether node `i` was started and not killed since.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Kills node `i` with SIGKILL (by its own PID) and waits for it to
    /// exit: no shutdown, no goodbye to the other nodes. Does nothing if it
    /// is not running.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill().expect("SIGKILL a nats-server node");
            child.wait().expect("reap a killed nats-server node");
        }
    }

    /// Stops node `i` with SIGSTOP (by its own PID): its connections stay
    /// open and nothing answers, as a server stalled by the machine. Undo
    /// with [`resume`](Self::resume).
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Lets a paused node `i` run again (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Some(child) = &self.nodes[i].child {
            let status = std::process::Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal} node {i}");
        }
    }

    /// Starts node `i` again (it must not be running) with the same name,
    /// ports and store directory, and waits until it accepts client
    /// connections.
    pub fn start_node(&mut self, i: usize) {
        self.spawn(i);
        self.wait_accepting(i);
    }

    /// Waits until every running node answers a JetStream account info
    /// request (`$JS.API.INFO`) without an error, which needs a JetStream
    /// meta leader that the node knows. Panics after `timeout`, with the
    /// last answer seen and the nodes' logs.
    pub async fn wait_for_meta_leader(&self, timeout: Duration) {
        let started = Instant::now();
        let mut last = String::from("no node is running");
        loop {
            let mut all = true;
            let mut any = false;
            for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
                any = true;
                if let Err(error) = self.account_info(i).await {
                    last = format!("{}: {error}", self.nodes[i].name);
                    all = false;
                    break;
                }
            }
            if all && any {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the JetStream cluster had no meta leader known to every running node within \
                 {timeout:?}; last answer: {last}\n{}",
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks node `i` alone for the account's JetStream information (two
    /// seconds at most). A raw request rather than `query_account`: the
    /// client's account type expects fields that nats-server 2.9 does not
    /// send.
    async fn account_info(&self, i: usize) -> Result<(), String> {
        let attempt = async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(1))
                .connect(self.url(i))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let reply = client
                .request("$JS.API.INFO", "".into())
                .await
                .map_err(|e| format!("request: {e}"))?;
            let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
                .map_err(|e| format!("answer is not JSON ({e}): {:?}", reply.payload))?;
            match answer.get("error") {
                Some(error) => Err(format!("JetStream error: {error}")),
                None => Ok(()),
            }
        };
        tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .unwrap_or_else(|_| Err("no answer within 2 s".to_owned()))
    }

    /// The last lines of every node's latest log, for failure messages.
    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(Node::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts node `i`'s process, its stderr going to a new log file.
    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is already running", node.name);
        node.starts += 1;
        let log = std::fs::File::create(node.log()).expect("create a node's log file");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(node.config())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a nats-server node");
        node.child = Some(child);
    }

    /// Waits until node `i` accepts client connections; panics with the
    /// logs after [`START_TIMEOUT`] or if it exits.
    fn wait_accepting(&mut self, i: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.nodes[i].accepts() {
                return;
            }
            let exited = self.nodes[i]
                .child
                .as_mut()
                .map(|child| child.try_wait().expect("check a nats-server node's status"))
                .unwrap_or(None);
            if let Some(status) = exited {
                self.nodes[i].child = None;
                panic!(
                    "nats-server {} exited ({status}) before accepting connections\n{}",
                    self.nodes[i].name,
                    self.log_tails()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not accept connections within {START_TIMEOUT:?}\n{}",
                self.nodes[i].name,
                self.log_tails()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
