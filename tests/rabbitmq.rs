//! Tests of the RabbitMQ driver against a real server.
//!
//! The server's URL comes from `TEST_RABBITMQ_URL` (or `TEST_RABBITMQ_ADDR` as `host:port`),
//! by default `amqp://guest:guest@127.0.0.1:5672/%2f`. The reconnection tests also use
//! `rabbitmqctl` to close this driver's connections from the server side, and fail where it
//! cannot run. Every test uses its own exchange and names, so they run in parallel;
//! every wait is bounded.

#![cfg(feature = "rabbitmq")]

mod conformance;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker::config::{ExchangeKind, RabbitMqConfig, SecretUrl};
use broker::rabbitmq::amqprs::channel::{
    BasicGetArguments, BasicPublishArguments, Channel, ExchangeDeclareArguments,
    ExchangeDeleteArguments, ExchangeType, QueueDeclareArguments, QueueDeleteArguments,
};
use broker::rabbitmq::amqprs::{BasicProperties, FieldTable, FieldValue};
use broker::rabbitmq::{RabbitMqError, RabbitMqProvider};
use broker::{Context, Error, Manager, Message, Provider, ProviderExt, RetryPolicy};
use tokio::sync::mpsc;

use conformance::{ATTEMPTS, Driver};

const WAIT: Duration = Duration::from_secs(20);

/// `TEST_RABBITMQ_URL`, or `TEST_RABBITMQ_ADDR` (`host:port`) with the guest user, or the
/// local server.
fn server_url() -> String {
    if let Ok(url) = std::env::var("TEST_RABBITMQ_URL") {
        return url;
    }
    let address =
        std::env::var("TEST_RABBITMQ_ADDR").unwrap_or_else(|_| "127.0.0.1:5672".to_owned());
    format!("amqp://guest:guest@{address}/%2f")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

fn config() -> RabbitMqConfig {
    RabbitMqConfig {
        url: Some(SecretUrl::parse(&server_url()).expect("a valid TEST_RABBITMQ_URL")),
        exchange: unique("test-exchange"),
        retry: RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            multiplier: 2.0,
        },
        connection_name: unique("test-connection"),
        ..RabbitMqConfig::default()
    }
}

fn ctx() -> Context {
    Context::new().with_timeout(WAIT)
}

async fn connect(config: RabbitMqConfig) -> RabbitMqProvider {
    // Logs show with `RUST_LOG`; the conformance checks need this subscriber, not another.
    conformance::trace::install();
    RabbitMqProvider::connect(&ctx(), "test", config)
        .await
        .expect("the test server accepts the connection")
}

/// Deletes the exchanges and queues a test declared, then closes the provider.
async fn clean_up(provider: RabbitMqProvider, queues: &[String]) {
    delete_topology(&provider, queues).await;
    provider.close().await.expect("close succeeds");
}

/// Deletes `queues` and the provider's exchanges.
async fn delete_topology(provider: &RabbitMqProvider, queues: &[String]) {
    if let Ok(channel) = provider.open_channel(&ctx()).await {
        for queue in queues {
            let _ = channel.queue_delete(QueueDeleteArguments::new(queue)).await;
        }
        let config = provider.config();
        for exchange in [config.exchange.clone(), config.dead_letter_exchange_name()] {
            let _ = channel
                .exchange_delete(ExchangeDeleteArguments::new(&exchange))
                .await;
        }
        let _ = channel.close().await;
    }
}

/// A handler that forwards every message it gets, tagged with `tag`.
fn forward(
    tag: usize,
    sender: mpsc::UnboundedSender<(usize, Message)>,
) -> impl Fn(Context, Message) -> std::future::Ready<Result<(), std::io::Error>> + Send + Sync + 'static
{
    move |_ctx, message| {
        let _ = sender.send((tag, message));
        std::future::ready(Ok(()))
    }
}

async fn receive(receiver: &mut mpsc::UnboundedReceiver<(usize, Message)>) -> (usize, Message) {
    tokio::time::timeout(WAIT, receiver.recv())
        .await
        .expect("a message arrives in time")
        .expect("the subscription is still running")
}

/// Waits until no message arrived for a short while; returns what did.
async fn drain(receiver: &mut mpsc::UnboundedReceiver<(usize, Message)>) -> Vec<(usize, Message)> {
    let mut got = Vec::new();
    while let Ok(Some(item)) =
        tokio::time::timeout(Duration::from_millis(500), receiver.recv()).await
    {
        got.push(item);
    }
    got
}

fn rabbit_error(error: &Error) -> &RabbitMqError {
    RabbitMqError::of(error).unwrap_or_else(|| panic!("not a RabbitMQ error: {error:?}"))
}

/// Takes one message from `queue` with `basic.get`, waiting until one is there.
async fn get_one(channel: &Channel, queue: &str) -> (BasicProperties, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = channel
            .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
            .await
            .expect("basic.get succeeds");
        if let Some((_, properties, body)) = got {
            return (properties, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing arrived in {queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The conformance suite's view of this driver: one shared exchange whose dead letters are a
/// topic like any other (`{topic}.dlq` on the same exchange), so the suite can subscribe to them.
struct RabbitMq;

#[async_trait::async_trait]
impl Driver for RabbitMq {
    async fn connect(&self) -> Arc<dyn Provider> {
        let config = RabbitMqConfig {
            exchange: "broker.conformance".to_owned(),
            dead_letter_exchange: "{exchange}".to_owned(),
            dead_letter_queue: false,
            // The suite's group queues go away on their own soon after it.
            queue_expires: Duration::from_secs(10),
            retry: RetryPolicy {
                attempts: ATTEMPTS,
                ..config().retry
            },
            ..config()
        };
        Arc::new(connect(config).await)
    }

    async fn dead_broker_error(&self) -> Result<Error, &'static str> {
        let config = RabbitMqConfig {
            url: Some(SecretUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap()),
            ..config()
        };
        Ok(RabbitMqProvider::connect(&ctx(), "dead", config)
            .await
            .unwrap_err())
    }
}

conformance_tests!(RabbitMq);

#[tokio::test]
async fn round_trip_keeps_all_four_fields() {
    let provider = connect(config()).await;
    let topic = unique("orders");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(
            &ctx(),
            &topic,
            "billing",
            move |ctx: Context, message: Message| {
                // The handler's context continues the publisher's trace.
                let traced = message
                    .clone()
                    .with_header("handler_trace_id", ctx.trace_id());
                let _ = sender.send((0, traced));
                std::future::ready(Ok::<(), std::io::Error>(()))
            },
        )
        .await
        .unwrap();

    let sent = Message::new(&b"\x00binary\xffbody"[..])
        .with_header("kind", "created")
        .with_header("empty", "")
        .with_header("unicode", "żółw 🐢");
    let ctx = Context::from_request_id("request-7").with_timeout(WAIT);
    provider.publish(&ctx, &topic, sent.clone()).await.unwrap();

    let (_, mut got) = receive(&mut receiver).await;
    assert_eq!(
        got.headers.remove("handler_trace_id").as_deref(),
        Some("request-7")
    );
    let expected = sent.with_header("trace_id", "request-7");
    assert_eq!(got.id, expected.id);
    assert_eq!(got.body, expected.body);
    assert_eq!(got.timestamp, expected.timestamp);
    assert_eq!(got.headers, expected.headers);

    subscription.stop().await;
    clean_up(
        provider,
        &[format!("{topic}.billing"), format!("{topic}.dlq")],
    )
    .await;
}

#[tokio::test]
async fn competing_consumers_of_a_group_share_without_duplicates() {
    let provider = connect(config()).await;
    let topic = unique("jobs");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let first = provider
        .subscribe_group_fn(&ctx(), &topic, "workers", forward(1, sender.clone()))
        .await
        .unwrap();
    let second = provider
        .subscribe_group_fn(&ctx(), &topic, "workers", forward(2, sender))
        .await
        .unwrap();

    let mut sent = Vec::new();
    for i in 0..40 {
        let message = Message::new(format!("job {i}"));
        sent.push(message.id.clone());
        provider.publish(&ctx(), &topic, message).await.unwrap();
    }

    let mut got = Vec::new();
    for _ in 0..sent.len() {
        got.push(receive(&mut receiver).await);
    }
    got.extend(drain(&mut receiver).await);
    let mut ids: Vec<String> = got.iter().map(|(_, message)| message.id.clone()).collect();
    ids.sort();
    sent.sort();
    assert_eq!(ids, sent, "every message exactly once");
    let by_first = got.iter().filter(|(tag, _)| *tag == 1).count();
    assert!(
        by_first > 0 && by_first < sent.len(),
        "both members took a share, the first took {by_first}"
    );

    first.stop().await;
    second.stop().await;
    clean_up(
        provider,
        &[format!("{topic}.workers"), format!("{topic}.dlq")],
    )
    .await;
}

#[tokio::test]
async fn many_publishes_in_flight_are_each_confirmed() {
    let provider = connect(config()).await;
    let topic = unique("burst");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "counter", forward(0, sender))
        .await
        .unwrap();

    let messages: Vec<Message> = (0..300)
        .map(|i| Message::new(format!("burst {i}")))
        .collect();
    let ctx = ctx();
    let publishes = messages
        .iter()
        .map(|message| provider.publish(&ctx, &topic, message.clone()));
    let results = futures_util::future::join_all(publishes).await;
    assert!(
        results.iter().all(Result::is_ok),
        "every publish is confirmed"
    );

    let mut got = Vec::new();
    for _ in 0..messages.len() {
        got.push(receive(&mut receiver).await.1.id);
    }
    got.sort();
    let mut sent: Vec<String> = messages.into_iter().map(|message| message.id).collect();
    sent.sort();
    assert_eq!(got, sent);

    subscription.stop().await;
    clean_up(
        provider,
        &[format!("{topic}.counter"), format!("{topic}.dlq")],
    )
    .await;
}

#[tokio::test]
async fn a_subscription_stopped_amid_a_backlog_puts_back_only_what_it_did_not_handle() {
    let provider = connect(config()).await;
    let topic = unique("backlog");
    let queue = format!("{topic}.workers");
    let (sender, mut receiver) = mpsc::unbounded_channel();

    // The group's queue exists first, so the backlog waits in it and arrives in bursts, as
    // the acknowledgements of a run of handled deliveries are sent together.
    provider
        .subscribe_group_fn(&ctx(), &topic, "workers", forward(0, sender.clone()))
        .await
        .unwrap()
        .stop()
        .await;
    let ctx = ctx();
    let publishes = (0..500).map(|i| provider.publish(&ctx, &topic, Message::new(format!("{i}"))));
    let results = futures_util::future::join_all(publishes).await;
    assert!(results.iter().all(Result::is_ok));

    // A handler slow enough for the stop to come amid the backlog.
    let slow = move |_: Context, message: Message| {
        let sender = sender.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let _ = sender.send((0, message));
            Ok::<(), std::io::Error>(())
        }
    };
    let subscription = provider
        .subscribe_group_fn(&ctx, &topic, "workers", slow)
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        got.push(receive(&mut receiver).await.1.body);
    }
    subscription.stop().await;
    got.extend(
        drain(&mut receiver)
            .await
            .into_iter()
            .map(|(_, message)| message.body),
    );
    let expected: Vec<_> = (0..got.len())
        .map(|i| bytes::Bytes::from(format!("{i}")))
        .collect();
    assert_eq!(got, expected, "one at a time, in order");
    assert!(got.len() < 500, "the stop came amid the backlog");

    // Stopping closed the channel, which put back every delivery still unacknowledged.
    let channel = provider.open_channel(&ctx).await.unwrap();
    let (_, waiting, _) = channel
        .queue_declare(QueueDeclareArguments::new(&queue).passive(true).finish())
        .await
        .expect("the group queue exists")
        .expect("the server answers the declaration");
    let _ = channel.close().await;
    assert_eq!(
        waiting as usize,
        500 - got.len(),
        "every handled message was acknowledged and every other one put back"
    );

    clean_up(provider, &[queue, format!("{topic}.dlq")]).await;
}

#[tokio::test]
async fn every_group_gets_every_message() {
    let provider = connect(config()).await;
    let topic = unique("events");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let audit = provider
        .subscribe_group_fn(&ctx(), &topic, "audit", forward(1, sender.clone()))
        .await
        .unwrap();
    let mail = provider
        .subscribe_group_fn(&ctx(), &topic, "mail", forward(2, sender.clone()))
        .await
        .unwrap();
    let private = provider
        .subscribe_fn(&ctx(), &topic, forward(3, sender))
        .await
        .unwrap();

    for i in 0..5 {
        provider
            .publish(&ctx(), &topic, Message::new(format!("event {i}")))
            .await
            .unwrap();
    }

    let mut got = Vec::new();
    for _ in 0..15 {
        got.push(receive(&mut receiver).await);
    }
    got.extend(drain(&mut receiver).await);
    let mut per_tag: HashMap<usize, usize> = HashMap::new();
    for (tag, _) in &got {
        *per_tag.entry(*tag).or_default() += 1;
    }
    assert_eq!(per_tag, HashMap::from([(1, 5), (2, 5), (3, 5)]));

    audit.stop().await;
    mail.stop().await;
    private.stop().await;
    clean_up(
        provider,
        &[
            format!("{topic}.audit"),
            format!("{topic}.mail"),
            format!("{topic}.dlq"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_while_others_flow() {
    let provider = connect(config()).await;
    let topic = unique("payments");
    let attempts = Arc::new(Mutex::new(0_u32));
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let counted = Arc::clone(&attempts);
    let subscription = provider
        .subscribe_group_fn(
            &ctx(),
            &topic,
            "ledger",
            move |_ctx: Context, message: Message| {
                let sender = sender.clone();
                let counted = Arc::clone(&counted);
                async move {
                    if message.body.as_ref() == b"poison" {
                        *counted.lock().unwrap() += 1;
                        return Err(std::io::Error::other("cannot parse the payment"));
                    }
                    let _ = sender.send((0, message));
                    Ok(())
                }
            },
        )
        .await
        .unwrap();

    let poison = Message::new("poison");
    provider
        .publish(&ctx(), &topic, poison.clone())
        .await
        .unwrap();
    for i in 0..3 {
        provider
            .publish(&ctx(), &topic, Message::new(format!("good {i}")))
            .await
            .unwrap();
    }

    for _ in 0..3 {
        let (_, message) = receive(&mut receiver).await;
        assert!(message.body.starts_with(b"good"));
    }
    let channel = provider.open_channel(&ctx()).await.unwrap();
    let (properties, body) = get_one(&channel, &format!("{topic}.dlq")).await;
    assert_eq!(body, b"poison");
    assert_eq!(properties.message_id(), Some(&poison.id));
    let headers = properties.headers().expect("dead letters carry headers");
    let text = |name: &str| match headers.get(&name.try_into().unwrap()) {
        Some(FieldValue::S(value)) => value.to_string(),
        other => panic!("header {name}: {other:?}"),
    };
    assert_eq!(text("dead_letter_attempts"), "3");
    assert_eq!(text("dead_letter_topic"), topic);
    assert!(text("dead_letter_error").contains("cannot parse the payment"));
    assert_eq!(*attempts.lock().unwrap(), 3);
    let _ = channel.close().await;

    subscription.stop().await;
    clean_up(
        provider,
        &[format!("{topic}.ledger"), format!("{topic}.dlq")],
    )
    .await;
}

#[tokio::test]
async fn messages_from_other_clients_arrive_with_their_headers() {
    let provider = connect(config()).await;
    let topic = unique("interop");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "reader", forward(0, sender))
        .await
        .unwrap();

    let mut headers = FieldTable::new();
    headers.insert(
        "text".try_into().unwrap(),
        FieldValue::S("hello".try_into().unwrap()),
    );
    headers.insert("int".try_into().unwrap(), FieldValue::I(-42));
    headers.insert("long".try_into().unwrap(), FieldValue::l(1 << 40));
    headers.insert("flag".try_into().unwrap(), FieldValue::t(true));
    headers.insert("ratio".try_into().unwrap(), FieldValue::d(0.25));
    headers.insert(
        "bytes".try_into().unwrap(),
        FieldValue::x(b"raw".to_vec().try_into().unwrap()),
    );
    headers.insert(
        "nested".try_into().unwrap(),
        FieldValue::F(FieldTable::new()),
    );
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_timestamp(1_700_000_000)
        .finish();
    let channel = provider.open_channel(&ctx()).await.unwrap();
    channel
        .basic_publish(
            properties,
            b"from amqprs".to_vec(),
            BasicPublishArguments::new(&provider.config().exchange, &topic),
        )
        .await
        .unwrap();

    let (_, got) = receive(&mut receiver).await;
    let expected: BTreeMap<String, String> = [
        ("text", "hello"),
        ("int", "-42"),
        ("long", "1099511627776"),
        ("flag", "true"),
        ("ratio", "0.25"),
        ("bytes", "raw"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect();
    assert_eq!(got.headers, expected);
    assert_eq!(got.body.as_ref(), b"from amqprs");
    assert!(!got.id.is_empty(), "a message without an id gets one");
    assert_eq!(got.timestamp_millis(), 1_700_000_000_000);
    let _ = channel.close().await;

    subscription.stop().await;
    clean_up(
        provider,
        &[format!("{topic}.reader"), format!("{topic}.dlq")],
    )
    .await;
}

#[tokio::test]
async fn an_unroutable_publish_is_an_error() {
    let provider = connect(config()).await;
    let topic = unique("nobody-listens");

    let error = provider
        .publish(&ctx(), &topic, Message::new("lost?"))
        .await
        .unwrap_err();

    assert!(
        matches!(rabbit_error(&error), RabbitMqError::Unroutable { routing_key, .. } if *routing_key == topic),
        "{error}"
    );
    let origin = error.origin().unwrap();
    assert_eq!(origin.connection, "test");
    assert_eq!(origin.target, topic);
    // The publishing channel is still usable afterwards.
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "late", forward(0, sender))
        .await
        .unwrap();
    provider
        .publish(&ctx(), &topic, Message::new("found"))
        .await
        .unwrap();
    receive(&mut receiver).await;

    subscription.stop().await;
    clean_up(provider, &[format!("{topic}.late"), format!("{topic}.dlq")]).await;
}

#[tokio::test]
async fn among_many_publishes_in_flight_only_the_unroutable_ones_fail() {
    let provider = connect(config()).await;
    let routed = unique("routed");
    let unrouted = unique("unrouted");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &routed, "reader", forward(0, sender))
        .await
        .unwrap();

    let ctx = ctx();
    let publishes = (0..200).map(|i| {
        let topic = if i % 3 == 0 { &unrouted } else { &routed };
        let provider = &provider;
        let ctx = &ctx;
        async move {
            let published = provider
                .publish(ctx, topic, Message::new(format!("message {i}")))
                .await;
            (topic, published)
        }
    });
    let results = futures_util::future::join_all(publishes).await;

    let mut confirmed = 0;
    for (topic, published) in &results {
        if **topic == unrouted {
            let error = published.as_ref().unwrap_err();
            assert!(
                matches!(rabbit_error(error), RabbitMqError::Unroutable { routing_key, .. } if *routing_key == unrouted),
                "{error}"
            );
        } else {
            assert!(published.is_ok(), "{published:?}");
            confirmed += 1;
        }
    }
    for _ in 0..confirmed {
        receive(&mut receiver).await;
    }

    subscription.stop().await;
    clean_up(
        provider,
        &[format!("{routed}.reader"), format!("{routed}.dlq")],
    )
    .await;
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let mut url = SecretUrl::parse(&server_url()).unwrap().expose().clone();
    url.set_password(Some("not-the-password")).unwrap();
    let config = RabbitMqConfig {
        url: Some(SecretUrl::parse(url.as_str()).unwrap()),
        ..config()
    };

    let error = RabbitMqProvider::connect(&ctx(), "test", config)
        .await
        .unwrap_err();

    assert!(
        matches!(rabbit_error(&error), RabbitMqError::AccessRefused { .. }),
        "{error:?}"
    );
    assert!(!error.to_string().contains("not-the-password"));
}

#[tokio::test]
async fn an_exchange_of_another_type_is_a_clear_error() {
    let setup = connect(config()).await;
    let taken = unique("fanout-exchange");
    let channel = setup.open_channel(&ctx()).await.unwrap();
    channel
        .exchange_declare(ExchangeDeclareArguments::of_type(
            &taken,
            ExchangeType::Fanout,
        ))
        .await
        .unwrap();

    let error = RabbitMqProvider::connect(
        &ctx(),
        "test",
        RabbitMqConfig {
            exchange: taken.clone(),
            exchange_type: ExchangeKind::Topic,
            ..config()
        },
    )
    .await
    .unwrap_err();

    assert!(
        matches!(rabbit_error(&error), RabbitMqError::TopologyMismatch { kind: "exchange", name, .. } if *name == taken),
        "{error}"
    );
    let _ = channel
        .exchange_delete(ExchangeDeleteArguments::new(&taken))
        .await;
    let _ = channel.close().await;
    clean_up(setup, &[]).await;
}

#[tokio::test]
async fn display_names_the_connection_and_hides_the_password() {
    let provider = connect(config()).await;

    let url = SecretUrl::parse(&server_url()).unwrap();
    let port = url.expose().port().unwrap_or(5672);
    let host = url.expose().host_str().unwrap().to_owned();
    assert_eq!(
        provider.to_string(),
        format!("rabbitmq(test: {host}:{port})")
    );
    if let Some(password) = url.expose().password() {
        assert!(!format!("{provider:?}").contains(&format!(":{password}@")));
    }
    provider.ping(&ctx()).await.unwrap();

    clean_up(provider, &[]).await;
}

#[tokio::test]
async fn the_manager_connects_rabbitmq_from_toml() {
    let exchange = unique("manager-exchange");
    let manager = Manager::from_toml(&format!(
        r#"
        [brokers.events]
        driver = "rabbitmq"

        [brokers.events.rabbitmq]
        url = "{}"
        exchange = "{exchange}"
        "#,
        server_url()
    ))
    .await
    .unwrap();

    let provider = manager.get_as::<RabbitMqProvider>("events").unwrap();
    assert!(provider.connection().is_some());
    manager.ping(&ctx()).await.unwrap();
    let channel = provider.open_channel(&ctx()).await.unwrap();
    let _ = channel
        .exchange_delete(ExchangeDeleteArguments::new(&exchange))
        .await;
    let _ = channel
        .exchange_delete(ExchangeDeleteArguments::new(&format!("{exchange}.dlx")))
        .await;
    let _ = channel.close().await;
    manager.close().await.unwrap();
}

#[tokio::test]
async fn operations_after_close_fail_and_a_stopped_context_stops_them() {
    let provider = connect(config()).await;
    let topic = unique("closing");

    let cancelled = Context::new();
    cancelled.cancel();
    let error = provider
        .publish(&cancelled, &topic, Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Cancelled { .. }), "{error}");

    delete_topology(&provider, &[]).await;
    provider.close().await.unwrap();
    let error = provider
        .publish(&ctx(), &topic, Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Closed { .. }), "{error}");
}

/// Closes, from the server side, the connections whose client-provided name is `name`, and
/// says how many; `None` if `rabbitmqctl` cannot run here.
fn force_close(name: &str) -> Option<usize> {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-s", "pid", "client_properties"])
        .output()
        .ok()
        .filter(|output| output.status.success())?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let mut closed = 0;
    for line in listing.lines().filter(|line| line.contains(name)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        if rabbitmqctl(&["close_connection", pid, "closed by a broker test"]) {
            closed += 1;
        }
    }
    Some(closed)
}

#[tokio::test]
async fn publishing_and_subscriptions_resume_after_the_connection_is_lost() {
    let config = config();
    let name = config.connection_name.clone();
    let provider = Arc::new(connect(config).await);
    let topic = unique("durable");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "keeper", forward(0, sender))
        .await
        .unwrap();

    // Four publishers keep several publishes in flight until well after the connection is
    // closed under them.
    let closed_at = Arc::new(Mutex::new(None::<tokio::time::Instant>));
    let done = tokio_util::sync::CancellationToken::new();
    let publishers: Vec<_> = (0..4)
        .map(|publisher| {
            let provider = Arc::clone(&provider);
            let topic = topic.clone();
            let done = done.clone();
            let closed_at = Arc::clone(&closed_at);
            tokio::spawn(async move {
                let (mut confirmed, mut after_close) = (Vec::new(), 0);
                for i in 0.. {
                    if done.is_cancelled() {
                        break;
                    }
                    let message = Message::new(format!("publisher {publisher} message {i}"));
                    let id = message.id.clone();
                    let ctx = Context::new().with_timeout(Duration::from_secs(30));
                    if let Err(error) = provider.publish(&ctx, &topic, message).await {
                        panic!("publish {i} of {publisher} failed: {error}");
                    }
                    confirmed.push(id);
                    if closed_at.lock().unwrap().is_some() {
                        after_close += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (confirmed, after_close)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let Some(closed) = force_close(&name) else {
        done.cancel();
        panic!("rabbitmqctl cannot run here; scripts/brokers installs RabbitMQ with it");
    };
    assert!(closed >= 1, "our connection was found and closed");
    *closed_at.lock().unwrap() = Some(tokio::time::Instant::now());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    done.cancel();
    let mut confirmed = Vec::new();
    let mut after_close = 0;
    for publisher in publishers {
        let (ids, after) = tokio::time::timeout(Duration::from_secs(60), publisher)
            .await
            .expect("publishing finishes")
            .expect("every publish succeeds");
        confirmed.extend(ids);
        after_close += after;
    }
    assert!(
        after_close > 0,
        "publishing resumed after the connection was closed"
    );

    let mut seen: HashMap<String, usize> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while confirmed.iter().any(|id| !seen.contains_key(id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, receiver.recv()).await {
            Ok(Some((_, message))) => *seen.entry(message.id).or_default() += 1,
            _ => break,
        }
    }
    let missing: Vec<&String> = confirmed
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    let duplicates: usize = seen.values().map(|count| count - 1).sum();
    assert!(
        missing.is_empty(),
        "lost {} confirmed messages",
        missing.len()
    );
    eprintln!(
        "{} confirmed ({after_close} after the close), {duplicates} duplicates",
        confirmed.len()
    );

    subscription.stop().await;
    let provider = Arc::try_unwrap(provider).expect("the publisher task ended");
    clean_up(
        provider,
        &[format!("{topic}.keeper"), format!("{topic}.dlq")],
    )
    .await;
}

/// Runs `rabbitmqctl` with `args`; `false` if it is missing or fails.
fn rabbitmqctl(args: &[&str]) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A user of its own for one test, deleted when dropped.
struct TestUser {
    name: String,
}

impl TestUser {
    fn create(password: &str) -> Option<TestUser> {
        let name = unique("broker-test-user");
        if !rabbitmqctl(&["add_user", &name, password]) {
            return None;
        }
        let user = TestUser { name };
        rabbitmqctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]).then_some(user)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

#[tokio::test]
async fn a_publish_during_an_outage_waits_for_its_deadline_then_succeeds_once_reconnected() {
    let Some(user) = TestUser::create("first-password") else {
        panic!("rabbitmqctl cannot add a user here; scripts/brokers installs RabbitMQ with it");
    };
    let mut url = SecretUrl::parse(&server_url()).unwrap().expose().clone();
    url.set_username(&user.name).unwrap();
    url.set_password(Some("first-password")).unwrap();
    let config = RabbitMqConfig {
        url: Some(SecretUrl::parse(url.as_str()).unwrap()),
        reconnect_backoff: Duration::from_millis(50),
        reconnect_max_backoff: Duration::from_millis(200),
        ..config()
    };
    let name = config.connection_name.clone();
    let provider = connect(config).await;
    let topic = unique("outage");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "patient", forward(0, sender))
        .await
        .unwrap();

    // The outage: the connection is closed and logging in again fails until the password is
    // set back.
    assert!(rabbitmqctl(&[
        "change_password",
        &user.name,
        "second-password"
    ]));
    assert!(force_close(&name).is_some_and(|closed| closed >= 1));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let short = Context::new().with_timeout(Duration::from_millis(1500));
    let error = provider
        .publish(&short, &topic, Message::new("too early"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
    let origin = error.origin().unwrap();
    assert_eq!(
        (origin.connection.as_str(), origin.operation),
        ("test", broker::Operation::Publish)
    );
    assert!(provider.ping(&ctx()).await.is_err());

    assert!(rabbitmqctl(&[
        "change_password",
        &user.name,
        "first-password"
    ]));
    let message = Message::new("after the outage");
    provider
        .publish(&ctx(), &topic, message.clone())
        .await
        .unwrap();
    let (_, got) = receive(&mut receiver).await;
    assert_eq!(got.id, message.id);
    provider.ping(&ctx()).await.unwrap();

    subscription.stop().await;
    clean_up(
        provider,
        &[format!("{topic}.patient"), format!("{topic}.dlq")],
    )
    .await;
    drop(user);
}

#[tokio::test]
async fn a_group_queue_declared_with_other_settings_is_a_clear_error() {
    let provider = connect(config()).await;
    let topic = unique("preset");
    let queue = format!("{topic}.group");
    let channel = provider.open_channel(&ctx()).await.unwrap();
    channel
        .queue_declare(broker::rabbitmq::amqprs::channel::QueueDeclareArguments::new(&queue))
        .await
        .unwrap();

    let error = provider
        .subscribe_group_fn(
            &ctx(),
            &topic,
            "group",
            forward(0, mpsc::unbounded_channel().0),
        )
        .await
        .unwrap_err();

    assert!(
        matches!(rabbit_error(&error), RabbitMqError::TopologyMismatch { kind: "queue", name, .. } if *name == queue),
        "{error}"
    );
    let _ = channel.close().await;
    clean_up(provider, &[queue, format!("{topic}.dlq")]).await;
}

#[tokio::test]
async fn the_servers_are_tried_in_turn() {
    let good = config();
    let config = RabbitMqConfig {
        url: Some(SecretUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap()),
        urls: vec![good.url.clone().unwrap()],
        ..good
    };

    let provider = connect(config).await;

    let url = SecretUrl::parse(&server_url()).unwrap();
    let port = url.expose().port().unwrap_or(5672);
    assert!(
        provider.to_string().ends_with(&format!(":{port})")),
        "{provider}"
    );
    provider.ping(&ctx()).await.unwrap();
    clean_up(provider, &[]).await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_clear_error() {
    let config = RabbitMqConfig {
        url: Some(SecretUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap()),
        ..config()
    };

    let error = RabbitMqProvider::connect(&ctx(), "test", config)
        .await
        .unwrap_err();

    assert!(
        matches!(rabbit_error(&error), RabbitMqError::Unreachable { address, .. } if address == "127.0.0.1:1"),
        "{error}"
    );
    assert_eq!(
        error.origin().unwrap().operation,
        broker::Operation::Connect
    );
}

#[tokio::test]
async fn a_fanout_exchange_without_confirms_delivers_to_every_queue() {
    let provider = connect(RabbitMqConfig {
        exchange_type: ExchangeKind::Fanout,
        confirms: false,
        ..config()
    })
    .await;
    let first_topic = unique("left");
    let second_topic = unique("right");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let first = provider
        .subscribe_group_fn(&ctx(), &first_topic, "g", forward(1, sender.clone()))
        .await
        .unwrap();
    let second = provider
        .subscribe_group_fn(&ctx(), &second_topic, "g", forward(2, sender))
        .await
        .unwrap();

    provider
        .publish(&ctx(), &first_topic, Message::new("to all"))
        .await
        .unwrap();

    let mut tags = vec![
        receive(&mut receiver).await.0,
        receive(&mut receiver).await.0,
    ];
    tags.sort();
    assert_eq!(tags, [1, 2]);

    first.stop().await;
    second.stop().await;
    clean_up(
        provider,
        &[
            format!("{first_topic}.g"),
            format!("{second_topic}.g"),
            format!("{first_topic}.dlq"),
            format!("{second_topic}.dlq"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_message_whose_retries_are_cut_short_goes_back_to_its_queue() {
    let provider = connect(RabbitMqConfig {
        retry: RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(30),
            multiplier: 1.0,
        },
        ..config()
    })
    .await;
    let topic = unique("interrupted");
    let (failed_sender, mut failed) = mpsc::unbounded_channel();
    let failing = provider
        .subscribe_group_fn(
            &ctx(),
            &topic,
            "g",
            move |_ctx: Context, message: Message| {
                let _ = failed_sender.send((0, message));
                std::future::ready(Err::<(), _>(std::io::Error::other("not now")))
            },
        )
        .await
        .unwrap();
    let message = Message::new("try again later");
    provider
        .publish(&ctx(), &topic, message.clone())
        .await
        .unwrap();
    receive(&mut failed).await;

    // Stopping during the 30 s backoff gives the message back instead of dead-lettering it.
    tokio::time::timeout(WAIT, failing.stop())
        .await
        .expect("stop does not wait for the backoff");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let next = provider
        .subscribe_group_fn(&ctx(), &topic, "g", forward(0, sender))
        .await
        .unwrap();
    let (_, got) = receive(&mut receiver).await;
    assert_eq!(got.id, message.id);

    next.stop().await;
    clean_up(provider, &[format!("{topic}.g"), format!("{topic}.dlq")]).await;
}

#[tokio::test]
async fn a_subscription_whose_queue_was_deleted_declares_it_again() {
    let provider = connect(RabbitMqConfig {
        reconnect_backoff: Duration::from_millis(50),
        ..config()
    })
    .await;
    let topic = unique("recreated");
    let queue = format!("{topic}.g");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "g", forward(0, sender))
        .await
        .unwrap();

    let channel = provider.open_channel(&ctx()).await.unwrap();
    channel
        .queue_delete(QueueDeleteArguments::new(&queue))
        .await
        .unwrap();
    let _ = channel.close().await;

    // Until the queue is back, publishing is unroutable; then the message flows again.
    let message = Message::new("after the deletion");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match provider.publish(&ctx(), &topic, message.clone()).await {
            Ok(()) => break,
            Err(error) => {
                assert!(
                    matches!(rabbit_error(&error), RabbitMqError::Unroutable { .. }),
                    "{error}"
                );
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the queue never came back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let (_, got) = receive(&mut receiver).await;
    assert_eq!(got.id, message.id);

    subscription.stop().await;
    clean_up(provider, &[queue, format!("{topic}.dlq")]).await;
}

#[tokio::test]
async fn settings_built_in_code_are_checked_before_connecting() {
    let error = RabbitMqProvider::connect(
        &ctx(),
        "test",
        RabbitMqConfig {
            prefetch: 0,
            ..config()
        },
    )
    .await
    .unwrap_err();

    assert!(
        matches!(rabbit_error(&error), RabbitMqError::InvalidSetting { key, .. } if key == "prefetch"),
        "{error}"
    );
}

#[tokio::test]
async fn an_exchange_deleted_under_the_provider_is_declared_again() {
    let provider = connect(RabbitMqConfig {
        reconnect_backoff: Duration::from_millis(50),
        ..config()
    })
    .await;
    let topic = unique("vanishing");
    let channel = provider.open_channel(&ctx()).await.unwrap();
    channel
        .exchange_delete(ExchangeDeleteArguments::new(&provider.config().exchange))
        .await
        .unwrap();
    let _ = channel.close().await;

    // The server closes the publishing channel (404); the error says so, and the provider
    // reconnects and declares the exchange again.
    let error = provider
        .publish(&ctx(), &topic, Message::new("into the void"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            rabbit_error(&error),
            RabbitMqError::ChannelClosed { code: 404, .. }
        ),
        "{error}"
    );

    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "g", forward(0, sender))
        .await
        .unwrap();
    let message = Message::new("after the exchange came back");
    provider
        .publish(&ctx(), &topic, message.clone())
        .await
        .unwrap();
    assert_eq!(receive(&mut receiver).await.1.id, message.id);

    subscription.stop().await;
    clean_up(provider, &[format!("{topic}.g"), format!("{topic}.dlq")]).await;
}

#[tokio::test]
async fn handlers_run_concurrently_up_to_the_configured_limit() {
    let provider = connect(RabbitMqConfig {
        concurrency: 4,
        ..config()
    })
    .await;
    let topic = unique("parallel");
    let running = Arc::new(Mutex::new((0_usize, 0_usize)));
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let counted = Arc::clone(&running);
    let subscription = provider
        .subscribe_group_fn(
            &ctx(),
            &topic,
            "g",
            move |_ctx: Context, message: Message| {
                let (counted, sender) = (Arc::clone(&counted), sender.clone());
                async move {
                    {
                        let mut counts = counted.lock().unwrap();
                        counts.0 += 1;
                        counts.1 = counts.1.max(counts.0);
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    counted.lock().unwrap().0 -= 1;
                    let _ = sender.send((0, message));
                    Ok::<(), std::io::Error>(())
                }
            },
        )
        .await
        .unwrap();

    for i in 0..8 {
        provider
            .publish(&ctx(), &topic, Message::new(format!("slow {i}")))
            .await
            .unwrap();
    }
    for _ in 0..8 {
        receive(&mut receiver).await;
    }

    assert_eq!(
        running.lock().unwrap().1,
        4,
        "at most and at least 4 at once"
    );
    subscription.stop().await;
    clean_up(provider, &[format!("{topic}.g"), format!("{topic}.dlq")]).await;
}

#[tokio::test]
async fn a_body_larger_than_a_frame_arrives_whole() {
    let provider = connect(config()).await;
    let topic = unique("large");
    let (sender, mut receiver) = mpsc::unbounded_channel();
    let subscription = provider
        .subscribe_group_fn(&ctx(), &topic, "g", forward(0, sender))
        .await
        .unwrap();

    let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let message = Message::new(body);
    provider
        .publish(&ctx(), &topic, message.clone())
        .await
        .unwrap();

    let (_, got) = receive(&mut receiver).await;
    assert_eq!(got.body, message.body);

    subscription.stop().await;
    clean_up(provider, &[format!("{topic}.g"), format!("{topic}.dlq")]).await;
}
