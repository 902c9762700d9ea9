//! A real restart of a RabbitMQ server, on a node of this test's own.
//!
//! The shared server on 5672 is left alone: the test starts a second node (its own name, ports
//! and data directory) from the local RabbitMQ installation, stops it (or kills it, as a crash
//! would) under a running provider and starts it again on the same data. It needs the
//! `rabbitmq-server` that scripts/brokers installs (`RABBITMQ_SERVER` names another one).

#![cfg(feature = "rabbitmq")]

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::config::{RabbitMqConfig, SecretUrl};
use broker::rabbitmq::RabbitMqProvider;
use broker::{Context, Message, Provider, ProviderExt, RetryPolicy};
use tokio::sync::mpsc;

/// How long a node may take to start or stop.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// A RabbitMQ node of this test's own; stopped and its data removed when dropped.
struct Node {
    child: Option<Child>,
    name: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
    server: PathBuf,
}

impl Node {
    fn server() -> Option<PathBuf> {
        let candidates = [
            std::env::var("RABBITMQ_SERVER").ok().map(PathBuf::from),
            Some(PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server")),
            Some(PathBuf::from("/usr/sbin/rabbitmq-server")),
        ];
        candidates.into_iter().flatten().find(|path| path.exists())
    }

    fn start() -> Option<Node> {
        let server = Node::server()?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let dir = std::env::temp_dir().join(format!("broker-rabbitmq-{id}"));
        std::fs::create_dir_all(&dir).ok()?;
        let mut node = Node {
            child: None,
            name: format!("broker-test-{}@localhost", &id[id.len() - 12..]),
            port: free_port(),
            dist_port: free_port(),
            dir,
            server,
        };
        std::fs::write(
            node.dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.local = 127.0.0.1:{}\nloopback_users = none\n",
                node.port
            ),
        )
        .ok()?;
        node.spawn();
        Some(node)
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
            .spawn()
            .expect("rabbitmq-server starts");
        self.child = Some(child);
        wait_for(|| listening(self.port), "the node to listen");
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
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
        wait_for(|| !listening(self.port), "the node to stop listening");
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
        wait_for(|| !listening(self.port), "the node to stop listening");
    }

    fn restart(&mut self, crash: bool) {
        if crash {
            self.kill();
        } else {
            self.stop();
        }
        self.spawn();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

fn wait_for(condition: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("out.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_confirmed_message() {
    restart_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_crash_loses_no_confirmed_message() {
    restart_under_load(true).await;
}

/// Publishes and consumes on a node of its own while the node restarts (or crashes and
/// starts again), then checks that every confirmed message was consumed.
async fn restart_under_load(crash: bool) {
    let Some(mut node) = tokio::task::spawn_blocking(Node::start).await.unwrap() else {
        panic!("rabbitmq-server is not installed here; scripts/brokers installs it");
    };
    let config = RabbitMqConfig {
        url: Some(SecretUrl::parse(&node.url()).unwrap()),
        exchange: "restart".to_owned(),
        reconnect_backoff: Duration::from_millis(100),
        reconnect_max_backoff: Duration::from_millis(500),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..RabbitMqConfig::default()
    };
    let ctx = Context::new().with_timeout(Duration::from_secs(20));
    let provider = Arc::new(
        RabbitMqProvider::connect(&ctx, "restart", config)
            .await
            .unwrap_or_else(|error| panic!("{error}\n{}", log_of(&node.dir))),
    );
    let (sender, mut receiver) = mpsc::unbounded_channel::<String>();
    let subscription = provider
        .subscribe_group_fn(
            &Context::new(),
            "orders",
            "durable",
            move |_ctx: Context, message: Message| {
                let _ = sender.send(message.id);
                std::future::ready(Ok::<(), std::io::Error>(()))
            },
        )
        .await
        .unwrap();

    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let done = tokio_util::sync::CancellationToken::new();
    let publishers: Vec<_> = (0..3)
        .map(|publisher| {
            let (provider, confirmed, done) =
                (Arc::clone(&provider), Arc::clone(&confirmed), done.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !done.is_cancelled() {
                    let message = Message::new(format!("publisher {publisher} message {i}"));
                    let id = message.id.clone();
                    let ctx = Context::new().with_timeout(Duration::from_secs(60));
                    if let Err(error) = provider.publish(&ctx, "orders", message).await {
                        panic!("publish {i} of {publisher} failed: {error}");
                    }
                    confirmed.lock().unwrap().push(id);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = confirmed.lock().unwrap().len();
    node = tokio::task::spawn_blocking(move || {
        node.restart(crash);
        node
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    done.cancel();
    for publisher in publishers {
        tokio::time::timeout(Duration::from_secs(90), publisher)
            .await
            .expect("publishing finishes")
            .expect("every publish succeeds");
    }
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(
        confirmed.len() > before,
        "publishing resumed after the restart"
    );

    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while confirmed.iter().any(|id| !seen.contains_key(id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, receiver.recv()).await {
            Ok(Some(id)) => *seen.entry(id).or_default() += 1,
            _ => break,
        }
    }
    let missing = confirmed
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .count();
    let duplicates: usize = seen.values().map(|count| count - 1).sum();
    eprintln!(
        "{}: {} confirmed ({before} before), {missing} missing, {duplicates} duplicates",
        if crash { "crash" } else { "restart" },
        confirmed.len()
    );
    assert_eq!(missing, 0, "every confirmed message was consumed");

    subscription.stop().await;
    provider.close().await.unwrap();
    tokio::task::spawn_blocking(move || drop(node))
        .await
        .unwrap();
}
