//! Helpers of the NATS tests (`tests/nats.rs`): configurations with unique names, a collecting handler, bounded
//! waits, and a nats-server of a test's own (plain, TLS or WebSocket) that is killed when the
//! test ends.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::config::{
    NatsConfig, NatsConsumerConfig, NatsMissingStream, NatsMode, NatsRetention, NatsStorage,
    NatsStreamConfig, SecretUrl,
};
use broker::nats::NatsProvider;
use broker::{Context, Handler, HandlerResult, Message, Provider, RetryPolicy};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// The longest any test may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The shared server's address: `TEST_NATS_URL`, or `TEST_NATS_ADDR` as `host:port`.
pub fn nats_url() -> String {
    if let Ok(url) = std::env::var("TEST_NATS_URL") {
        return url;
    }
    match std::env::var("TEST_NATS_ADDR") {
        Ok(address) => format!("nats://{address}"),
        Err(_) => "nats://127.0.0.1:4222".to_owned(),
    }
}

/// A name no other test uses: `{prefix}-{uuid}`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Runs a test body with logs on and a bound on its time.
pub async fn within<F: Future<Output = ()>>(test: F) {
    crate::conformance::trace::install();
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test finished in time");
}

/// A handler that sends every message it gets into a channel.
#[derive(Clone)]
pub struct Collector(UnboundedSender<Message>);

impl Handler for Collector {
    fn call(&self, _ctx: Context, message: Message) -> BoxFuture<'static, HandlerResult> {
        let _ = self.0.send(message);
        Box::pin(async { Ok(()) })
    }
}

/// A collecting handler and the receiver of what it gets.
pub fn collector() -> (Collector, UnboundedReceiver<Message>) {
    let (sender, receiver) = unbounded_channel();
    (Collector(sender), receiver)
}

/// The next `count` messages, failing the test if they do not come within 20 seconds.
pub async fn collect(received: &mut UnboundedReceiver<Message>, count: usize) -> Vec<Message> {
    let mut messages = Vec::with_capacity(count);
    while messages.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(20), received.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} messages came", messages.len()))
            .expect("the handler is alive");
        messages.push(message);
    }
    messages
}

/// The settings of one test's connection.
#[derive(Clone)]
pub struct Setup {
    name: String,
    prefix: String,
    config: NatsConfig,
}

impl Setup {
    /// Core NATS on the shared server.
    pub fn core() -> Setup {
        let config = NatsConfig {
            url: Some(SecretUrl::parse(&nats_url()).expect("TEST_NATS_URL is a URL")),
            retry: RetryPolicy {
                attempts: 3,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(200),
                multiplier: 2.0,
            },
            ..NatsConfig::default()
        };
        Setup {
            name: "test".to_owned(),
            prefix: unique("t"),
            config,
        }
    }

    /// JetStream on the shared server, with a memory stream of its own capturing `{prefix}.>`.
    pub fn jetstream() -> Setup {
        let mut setup = Setup::core();
        setup.config.mode = NatsMode::Jetstream;
        setup.config.stream = Some(Box::new(NatsStreamConfig {
            name: format!("S{}", uuid::Uuid::now_v7().simple()),
            subjects: vec![format!("{}.>", setup.prefix)],
            storage: NatsStorage::Memory,
            retention: NatsRetention::Limits,
            missing: NatsMissingStream::Create,
            duplicate_window: None,
            max_age: Some(Duration::from_secs(600)),
        }));
        setup.config.consumer = Box::new(NatsConsumerConfig {
            ack_wait: Duration::from_secs(5),
            ..NatsConsumerConfig::default()
        });
        setup
    }

    /// This setup under another connection name.
    pub fn named(mut self, name: &str) -> Setup {
        self.name = name.to_owned();
        self
    }

    /// This setup against another server.
    pub fn at(mut self, url: &str) -> Setup {
        self.config.url = Some(SecretUrl::parse(url).expect("a URL"));
        self
    }

    /// This setup with its stream on disk.
    pub fn file_storage(mut self) -> Setup {
        if let Some(stream) = &mut self.config.stream {
            stream.storage = NatsStorage::File;
        }
        self
    }

    /// This setup with consumers that wait `ack_wait` for an acknowledgement.
    pub fn set_ack_wait(&mut self, ack_wait: Duration) {
        self.config.consumer.ack_wait = ack_wait;
    }

    /// This setup with core subscriptions that buffer at most `limit` messages.
    pub fn set_pending_limit(&mut self, limit: usize) {
        self.config.pending_limit = limit;
    }

    /// This setup with another template for durable consumer names.
    pub fn set_durable_name(&mut self, template: &str) {
        self.config.consumer.durable_name = template.to_owned();
    }

    /// A subject under this setup's prefix, captured by its stream.
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        self.config
            .stream
            .as_ref()
            .map_or("", |stream| stream.name.as_str())
    }

    /// The connection's settings.
    pub fn config(&self) -> NatsConfig {
        self.config.clone()
    }

    /// Connects, within 20 seconds.
    pub async fn connect(&self) -> Arc<NatsProvider> {
        let ctx = Context::new().with_timeout(Duration::from_secs(20));
        let provider = NatsProvider::connect(&ctx, &self.name, self.config())
            .await
            .expect("connects to NATS");
        Arc::new(provider)
    }
}

/// The error connecting gives where no server listens.
pub async fn dead_server_error() -> broker::Error {
    let setup = Setup::core().at(&format!("nats://127.0.0.1:{}", free_port()));
    let ctx = Context::new().with_timeout(Duration::from_secs(1));
    NatsProvider::connect(&ctx, "dead", setup.config())
        .await
        .expect_err("nothing listens there")
}

/// Runs the test that `test` makes on a runtime of its own, on this thread, with everything
/// logged at `level` or above kept, and returns what was logged. The test gets the capture to
/// read the logs while it runs. The client's and the driver's tasks run on this thread too, so
/// their events are kept.
pub fn logged<F: Future<Output = ()>>(
    level: tracing::Level,
    test: impl FnOnce(LogCapture) -> F,
) -> String {
    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    tracing::subscriber::with_default(subscriber, || runtime.block_on(test(logs.clone())));
    logs.text()
}

/// A log writer that keeps everything written to it.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().map(|bytes| bytes.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut bytes) = self.0.lock() {
            bytes.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("an address").port()
}

/// Waits until the provider's pings succeed again.
pub async fn wait_until_connected(provider: &NatsProvider) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while provider
        .ping(&Context::new().with_timeout(Duration::from_secs(1)))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the provider did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the provider's client noticed that its server is gone.
pub async fn wait_until_disconnected(provider: &NatsProvider) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while provider.client().connection_state() == async_nats::connection::State::Connected {
        assert!(
            Instant::now() < deadline,
            "the provider did not notice the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A file of the test certificates in `testdata/tls` (see `testdata/tls/generate`).
pub fn tls_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/tls")
        .join(name)
}

/// A nats-server with JetStream on a port of its own, killed when dropped.
pub struct NatsServer {
    port: u16,
    store: PathBuf,
    extra: Vec<String>,
    /// A configuration file written for this server, removed with it.
    config_file: Option<PathBuf>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on `port` and waits until it accepts connections.
    pub fn start(port: u16) -> NatsServer {
        NatsServer::start_with(port, &[])
    }

    /// Starts a server on `port` with more command-line options, for example authentication.
    pub fn start_with(port: u16, extra: &[&str]) -> NatsServer {
        NatsServer::launch(port, extra, None)
    }

    /// Starts a server on `port` that speaks only TLS, with the test certificate for
    /// localhost and 127.0.0.1. With `verify_clients` it also demands a client certificate
    /// signed by the test authority.
    pub fn start_tls(port: u16, verify_clients: bool) -> NatsServer {
        let (cert, key, ca) = (
            tls_file("server.pem"),
            tls_file("server.key"),
            tls_file("ca.pem"),
        );
        let mut options = vec![
            "--tls",
            "--tlscert",
            cert.to_str().expect("a UTF-8 path"),
            "--tlskey",
            key.to_str().expect("a UTF-8 path"),
        ];
        if verify_clients {
            options.extend([
                "--tlsverify",
                "--tlscacert",
                ca.to_str().expect("a UTF-8 path"),
            ]);
        }
        NatsServer::start_with(port, &options)
    }

    /// Starts a server on `port` that also reads `config`, a nats-server configuration (for
    /// example a `websocket` block); the command-line options win over it.
    pub fn start_with_config(port: u16, config: &str) -> NatsServer {
        let file = std::env::temp_dir().join(format!("{}.conf", unique("nats-test-config")));
        std::fs::write(&file, config).expect("the configuration file is written");
        let path = file.to_str().expect("a UTF-8 path").to_owned();
        NatsServer::launch(port, &["-c", &path], Some(file))
    }

    fn launch(port: u16, extra: &[&str], config_file: Option<PathBuf>) -> NatsServer {
        let store = std::env::temp_dir().join(unique("nats-test-store"));
        let mut server = NatsServer {
            port,
            store,
            extra: extra.iter().map(|option| (*option).to_owned()).collect(),
            config_file,
            child: None,
        };
        server.restart();
        server
    }

    /// `nats://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        let binary = std::env::var("TEST_NATS_SERVER")
            .unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned());
        let child = Command::new(binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
        if let Some(file) = &self.config_file {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Publishes `{label} {n}` to `topic` every 100 ms until aborted (at most 20 s).
pub fn pump(
    publisher: &Arc<NatsProvider>,
    topic: &str,
    label: &'static str,
) -> tokio::task::JoinHandle<()> {
    let publisher = Arc::clone(publisher);
    let topic = topic.to_owned();
    tokio::spawn(async move {
        for n in 0..200 {
            let ctx = Context::new().with_timeout(Duration::from_secs(5));
            let message = Message::new(format!("{label} {n}"));
            let _ = publisher.publish(&ctx, &topic, message).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The first message whose body starts with `prefix`, skipping stragglers of earlier pumps.
pub async fn collect_until_prefix(
    received: &mut UnboundedReceiver<Message>,
    prefix: &[u8],
) -> Message {
    loop {
        let message = collect(received, 1).await.remove(0);
        if message.body.starts_with(prefix) {
            return message;
        }
    }
}

/// The bodies of the messages that arrive up to and including the one whose body is `last`.
pub async fn collect_until(received: &mut UnboundedReceiver<Message>, last: &[u8]) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), received.recv())
            .await
            .expect("the message arrives")
            .unwrap();
        bodies.push(message.body.to_vec());
        if message.body == last {
            return bodies;
        }
    }
}

/// Fails if another message arrives within 300 ms.
pub async fn assert_no_more(received: &mut UnboundedReceiver<Message>) {
    let extra = tokio::time::timeout(Duration::from_millis(300), received.recv()).await;
    assert!(extra.is_err(), "an extra delivery: {extra:?}");
}
