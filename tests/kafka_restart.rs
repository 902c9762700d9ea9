//! The Kafka driver across a broker restart. The test starts its own nisshi on a free port,
//! with its storage in a file so records survive the restart, and nothing else sees the
//! outage.

mod conformance;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use broker::config::KafkaConfig;
use broker::kafka::KafkaProvider;
use broker::{Context, Message, Provider, RetryPolicy, SubscribeOptions};
use conformance::{Inbox, TIMEOUT};

/// A nisshi process of this test's own; killed when dropped, even if the test fails.
struct Nisshi {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Nisshi {
    fn start() -> Nisshi {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("broker-nisshi-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nisshi = Nisshi {
            child: None,
            port,
            dir,
        };
        nisshi.spawn();
        nisshi
    }

    fn binary() -> PathBuf {
        if let Ok(path) = std::env::var("NISSHI") {
            return path.into();
        }
        let home = std::env::var("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
        let installed = home.join("bin/nisshi");
        if installed.exists() {
            installed
        } else {
            PathBuf::from("nisshi")
        }
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(Nisshi::binary())
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://nisshi.db"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start nisshi (scripts/brokers installs it): {error}")
            });
        self.child = Some(child);
        self.wait_until_it_answers();
    }

    fn wait_until_it_answers(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nisshi did not answer on port {}", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Nisshi {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_across_a_broker_restart() {
    let mut nisshi = Nisshi::start();
    let config = KafkaConfig {
        brokers: vec![format!("127.0.0.1:{}", nisshi.port)],
        partitions: 2,
        heartbeat_interval: Duration::from_millis(300),
        session_timeout: Duration::from_secs(6),
        fetch_max_wait: Duration::from_millis(100),
        request_timeout: Duration::from_secs(20),
        retry: RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        },
        ..KafkaConfig::default()
    };
    let ctx = Context::new().with_timeout(TIMEOUT);
    let provider = Arc::new(
        KafkaProvider::connect(&ctx, "restart", config)
            .await
            .unwrap(),
    );
    let topic = "restart.topic";
    let inbox = Inbox::default();
    let _subscription = provider
        .subscribe(
            &Context::new(),
            topic,
            SubscribeOptions::group("restart-group"),
            Arc::new(inbox.handler()),
        )
        .await
        .unwrap();

    let mut sent = Vec::new();
    for index in 0..20 {
        let message = Message::new(format!("before {index}"));
        provider
            .publish(&ctx, topic, message.clone())
            .await
            .unwrap();
        sent.push(message);
    }
    inbox.wait_for(sent.len()).await;

    nisshi.kill();
    let publisher = {
        let provider = Arc::clone(&provider);
        tokio::spawn(async move {
            // Published while the broker is down: each waits for it, up to its deadline.
            let ctx = Context::new().with_timeout(TIMEOUT);
            let mut sent = Vec::new();
            for index in 0..20 {
                let message = Message::new(format!("during {index}"));
                provider
                    .publish(&ctx, topic, message.clone())
                    .await
                    .unwrap();
                sent.push(message);
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    nisshi.restart();
    sent.extend(publisher.await.unwrap());

    let waited = tokio::time::timeout(TIMEOUT * 2, async {
        loop {
            let received: std::collections::HashSet<String> = inbox.ids().into_iter().collect();
            if sent.iter().all(|message| received.contains(&message.id)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    let mut deliveries: HashMap<String, usize> = HashMap::new();
    for id in inbox.ids() {
        *deliveries.entry(id).or_default() += 1;
    }
    let missing = sent
        .iter()
        .filter(|m| !deliveries.contains_key(&m.id))
        .count();
    let duplicates: usize = deliveries.values().map(|count| count - 1).sum();
    println!(
        "delivered {} of {}, {duplicates} duplicates",
        deliveries.len(),
        sent.len()
    );
    assert!(
        waited.is_ok(),
        "{missing} acknowledged messages were not delivered"
    );
    provider.close().await.unwrap();
}
