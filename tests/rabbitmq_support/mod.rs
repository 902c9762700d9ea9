//! RabbitMQ nodes of a test's own, beside the shared server on 5672.
//!
//! A node gets its own name, free ports and a data directory under the temporary directory,
//! and runs from the local RabbitMQ installation (the `rabbitmq-server` that scripts/brokers
//! installs; `RABBITMQ_SERVER` names another one). A node that cannot start fails the test.
//!
//! A [`Node`] is stopped and its directory removed when it is dropped. A node shared by a
//! whole test binary ([`Node::shared`]) is never dropped, so every node also gets a watchdog
//! process that stops it and removes its directory once the test process is gone, however
//! that process ended.

#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a node may take to start or stop.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// How a node takes clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Plain AMQP.
    Plain,
    /// AMQP over TLS only, with the certificates of `testdata/tls`: the server's for
    /// localhost and 127.0.0.1, and client certificates checked against `ca.pem`.
    Tls {
        /// Whether a client without a certificate is turned away.
        client_certificate_required: bool,
    },
}

/// A RabbitMQ node of a test's own; stopped and its data removed when dropped.
pub struct Node {
    child: Option<Child>,
    name: String,
    pub listener: Listener,
    pub port: u16,
    dist_port: u16,
    pub dir: PathBuf,
    server: PathBuf,
}

impl Node {
    /// Starts a node, failing the test if it cannot.
    pub fn start(listener: Listener) -> Node {
        let server = server().unwrap_or_else(|| {
            panic!("rabbitmq-server is not installed here; scripts/brokers installs it")
        });
        let id = uuid::Uuid::now_v7().simple().to_string();
        let dir = std::env::temp_dir().join(format!("broker-rabbitmq-{id}"));
        std::fs::create_dir_all(&dir).expect("a data directory");
        let mut node = Node {
            child: None,
            name: format!("broker-test-{}@localhost", &id[id.len() - 12..]),
            listener,
            port: free_port(),
            dist_port: free_port(),
            dir,
            server,
        };
        std::fs::write(node.dir.join("rabbitmq.conf"), node.settings()).expect("rabbitmq.conf");
        watch_over(&node.dir);
        node.spawn();
        node
    }

    /// The node of `listener` this test binary shares, started by the first test that asks
    /// for it. Its watchdog stops it when the tests are over.
    pub fn shared(listener: Listener) -> &'static Node {
        static PLAIN: OnceLock<Node> = OnceLock::new();
        static TLS: OnceLock<Node> = OnceLock::new();
        static TLS_CLIENT_CERTIFICATE: OnceLock<Node> = OnceLock::new();
        let node = match listener {
            Listener::Plain => &PLAIN,
            Listener::Tls {
                client_certificate_required: false,
            } => &TLS,
            Listener::Tls {
                client_certificate_required: true,
            } => &TLS_CLIENT_CERTIFICATE,
        };
        node.get_or_init(|| Node::start(listener))
    }

    /// The node's URL for the guest user: `amqp://` or `amqps://`, at `host` (a name for
    /// 127.0.0.1, such as `localhost`, or the address itself).
    pub fn url_at(&self, host: &str) -> String {
        let scheme = match self.listener {
            Listener::Plain => "amqp",
            Listener::Tls { .. } => "amqps",
        };
        format!("{scheme}://guest:guest@{host}:{}/%2f", self.port)
    }

    /// The node's URL at 127.0.0.1.
    pub fn url(&self) -> String {
        self.url_at("127.0.0.1")
    }

    /// What the node wrote to its standard output and error, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("out.log")).unwrap_or_default()
    }

    /// Stops the node gracefully, or kills it outright as a crash would, and starts it
    /// again on the same data and ports.
    pub fn restart(&mut self, crash: bool) {
        if crash {
            self.kill();
        } else {
            self.stop();
        }
        self.spawn();
    }

    fn settings(&self) -> String {
        let common = "loopback_users = none\n";
        match self.listener {
            Listener::Plain => format!("listeners.tcp.local = 127.0.0.1:{}\n{common}", self.port),
            Listener::Tls {
                client_certificate_required,
            } => {
                let file = |name: &str| testdata(name).display().to_string();
                format!(
                    "listeners.tcp = none\n\
                     listeners.ssl.local = 127.0.0.1:{port}\n\
                     ssl_options.cacertfile = {ca}\n\
                     ssl_options.certfile = {cert}\n\
                     ssl_options.keyfile = {key}\n\
                     ssl_options.verify = verify_peer\n\
                     ssl_options.fail_if_no_peer_cert = {client_certificate_required}\n\
                     {common}",
                    port = self.port,
                    ca = file("ca.pem"),
                    cert = file("server.pem"),
                    key = file("server.key"),
                )
            }
        }
    }

    fn spawn(&mut self) {
        let dir = &self.dir;
        let log = std::fs::File::create(dir.join("out.log")).expect("a log file");
        let child = Command::new(&self.server)
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a log file"))
            .stderr(log)
            // Its own process group, which the watchdog stops as a whole.
            .process_group(0)
            .spawn()
            .expect("rabbitmq-server starts");
        std::fs::write(dir.join("group"), child.id().to_string()).expect("the group file");
        self.child = Some(child);
        self.wait_for_port(true);
    }

    /// Stops the node gracefully (its script turns SIGTERM into a clean shutdown).
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.wait_for_port(false);
    }

    /// Kills the node outright, as a crash would: the Erlang VM (the child of the start
    /// script) first, then the script.
    fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for vm in children.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", vm]).status();
        }
        let _ = child.kill();
        let _ = child.wait();
        self.wait_for_port(false);
    }

    /// Waits until the node listens (`open`) or no longer does, failing with the node's log
    /// if that does not come in time or the node exits while starting.
    fn wait_for_port(&mut self, open: bool) {
        let what = if open {
            "the node to listen"
        } else {
            "the node to stop listening"
        };
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while listening(self.port) != open {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "the node exited ({status}) waiting for {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file of `testdata/tls`.
pub fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/tls")
        .join(name)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

fn server() -> Option<PathBuf> {
    let candidates = [
        std::env::var("RABBITMQ_SERVER").ok().map(PathBuf::from),
        Some(PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server")),
        Some(PathBuf::from("/usr/sbin/rabbitmq-server")),
    ];
    candidates.into_iter().flatten().find(|path| path.exists())
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Starts a process that waits for this test process to end, then stops the node whose
/// process group is written in `dir/group` (gracefully, then by force) and removes `dir`.
/// A node dropped in time has already done both; the watchdog then finds nothing to do.
// The watchdog outlives this process by design, so nothing here waits for it.
#[allow(clippy::zombie_processes)]
fn watch_over(dir: &Path) {
    const SCRIPT: &str = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        group=$(cat "$2/group" 2>/dev/null)
        if [ -n "$group" ]; then
            kill -TERM "-$group" 2>/dev/null
            for _ in $(seq 30); do
                kill -0 "-$group" 2>/dev/null || break
                sleep 1
            done
            kill -KILL "-$group" 2>/dev/null
        fi
        rm -rf "$2"
    "#;
    Command::new("sh")
        .args(["-c", SCRIPT, "watchdog"])
        .arg(std::process::id().to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Out of the test's process group, so a signal to the tests does not reach it.
        .process_group(0)
        .spawn()
        .expect("the node's watchdog starts");
}
