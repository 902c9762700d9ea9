//! Tests of the NATS driver against real servers: the conformance suite in core and JetStream
//! mode and the driver's own checks on the shared server at `TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`, with JetStream), and restarts on servers of their own on free
//! ports.

mod conformance;
mod nats_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use broker::config::{NatsConfig, Secret, SecretUrl};
use broker::nats::NatsProvider;
use broker::propagation::{
    DEAD_LETTER_ATTEMPTS_HEADER, DEAD_LETTER_ERROR_HEADER, DEAD_LETTER_TOPIC_HEADER,
};
use broker::{Context, Error, Manager, Message, Provider, ProviderExt};
use conformance::Driver;
use futures_util::StreamExt;

use nats_support::{
    NatsServer, Setup, assert_no_more, collect, collect_until, collect_until_prefix, collector,
    nats_url, pump, unique, within,
};

/// Core NATS. The server never redelivers and keeps nothing for absent members, so the check
/// of durable groups is not applicable (it asserts the at-most-once behaviour instead). The
/// checks of retries and dead letters run: the driver retries a failed handler in-process and
/// publishes the dead letter itself.
struct CoreNats;

#[async_trait]
impl Driver for CoreNats {
    async fn connect(&self) -> Arc<dyn Provider> {
        Setup::core().connect().await
    }

    async fn dead_broker_error(&self) -> Result<Error, &'static str> {
        Ok(nats_support::dead_server_error().await)
    }

    fn durable_groups(&self) -> Result<(), &'static str> {
        Err(
            "core NATS keeps nothing for a queue group without members: what is published \
             while none listens is gone, and nothing is ever redelivered",
        )
    }
}

/// JetStream, with a stream of its own capturing every topic of the check.
struct JetStreamNats(Setup);

#[async_trait]
impl Driver for JetStreamNats {
    async fn connect(&self) -> Arc<dyn Provider> {
        self.0.connect().await
    }

    async fn dead_broker_error(&self) -> Result<Error, &'static str> {
        Ok(nats_support::dead_server_error().await)
    }

    fn topic(&self) -> String {
        self.0.topic(&uuid::Uuid::now_v7().simple().to_string())
    }
}

mod core_conformance {
    use super::*;

    conformance_tests!(CoreNats);
}

mod jetstream_conformance {
    use super::*;

    conformance_tests!(JetStreamNats(Setup::jetstream()));
}

#[tokio::test]
async fn core_round_trip_keeps_every_field() {
    within(async {
        let provider = Setup::core().connect().await;
        let topic = unique("round");
        let (handler, mut received) = collector();
        let _subscription = provider
            .subscribe_fn(&Context::new(), &topic, handler)
            .await
            .unwrap();

        let sent = Message::new("hello core").with_header("kind", "greeting");
        // An id and a time of the caller's own: the time cannot come from the id.
        let chosen = Message {
            timestamp: Message::timestamp_from_millis(1_600_000_000_123),
            ..Message::new("chosen").with_id("order-42")
        };
        let ctx = Context::from_request_id("request-core-1");
        provider.publish(&ctx, &topic, sent.clone()).await.unwrap();
        provider
            .publish(&ctx, &topic, chosen.clone())
            .await
            .unwrap();

        let got = collect(&mut received, 2).await;
        assert_eq!(got[0], sent.with_header("trace_id", "request-core-1"));
        assert_eq!(got[1], chosen.with_header("trace_id", "request-core-1"));
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn jetstream_round_trip_keeps_every_field() {
    within(async {
        let setup = Setup::jetstream();
        let provider = setup.connect().await;
        let topic = setup.topic("round");
        let (handler, mut received) = collector();
        let _subscription = provider
            .subscribe_fn(&Context::new(), &topic, handler)
            .await
            .unwrap();

        let sent = Message::new(vec![0_u8, 159, 146, 150])
            .with_header("kind", "binary")
            .with_header("Content-Type", "application/octet-stream");
        // A UUIDv7 id with a time other than its own.
        let later = Message {
            timestamp: sent.timestamp + Duration::from_secs(3_600),
            ..Message::new("later")
        };
        let ctx = Context::from_request_id("request-js-1");
        provider.publish(&ctx, &topic, sent.clone()).await.unwrap();
        provider.publish(&ctx, &topic, later.clone()).await.unwrap();

        let got = collect(&mut received, 2).await;
        assert_eq!(got[0], sent.with_header("trace_id", "request-js-1"));
        assert_eq!(got[1], later.with_header("trace_id", "request-js-1"));
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn core_queue_group_shares_messages_without_duplicates() {
    within(async {
        let provider = Setup::core().connect().await;
        let topic = unique("queue");
        let (handler, mut received) = collector();
        let ctx = Context::new();
        let _a = provider
            .subscribe_group_fn(&ctx, &topic, "workers", handler.clone())
            .await
            .unwrap();
        let _b = provider
            .subscribe_group_fn(&ctx, &topic, "workers", handler)
            .await
            .unwrap();

        for n in 0..40 {
            provider
                .publish(&ctx, &topic, Message::new(format!("{n}")))
                .await
                .unwrap();
        }

        let got = collect(&mut received, 40).await;
        let ids: HashSet<_> = got.iter().map(|message| message.id.clone()).collect();
        assert_eq!(ids.len(), 40);
        assert_no_more(&mut received).await;
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn core_independent_subscribers_each_get_every_message() {
    within(async {
        let provider = Setup::core().connect().await;
        let topic = unique("fanout");
        let (first, mut first_received) = collector();
        let (second, mut second_received) = collector();
        let ctx = Context::new();
        let _a = provider.subscribe_fn(&ctx, &topic, first).await.unwrap();
        let _b = provider.subscribe_fn(&ctx, &topic, second).await.unwrap();

        for n in 0..10 {
            provider
                .publish(&ctx, &topic, Message::new(format!("{n}")))
                .await
                .unwrap();
        }

        assert_eq!(collect(&mut first_received, 10).await.len(), 10);
        assert_eq!(collect(&mut second_received, 10).await.len(), 10);
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_core_subscription_holds_a_burst_its_handler_has_not_reached() {
    within(async {
        const BURST: usize = 10_000;
        let provider = Setup::core().connect().await;
        let topic = unique("burst");
        let ctx = Context::new();

        // The handler waits until the whole burst is out, so every message of it has to
        // wait in the subscription's buffer.
        let (open, gate) = tokio::sync::watch::channel(false);
        let (handler, mut received) = collector();
        let _subscription = provider
            .subscribe_fn(&ctx, &topic, move |ctx: Context, message: Message| {
                let (mut gate, handler) = (gate.clone(), handler.clone());
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    broker::Handler::call(&handler, ctx, message).await
                }
            })
            .await
            .unwrap();

        futures_util::stream::iter(0..BURST)
            .map(|n| provider.publish(&ctx, &topic, Message::new(n.to_string())))
            .buffer_unordered(64)
            .for_each(|published| async move { published.unwrap() })
            .await;
        open.send(true).unwrap();

        let got = collect(&mut received, BURST).await;
        let bodies: HashSet<_> = got.iter().map(|message| message.body.clone()).collect();
        assert_eq!(bodies.len(), BURST, "every message of the burst once");
        assert_no_more(&mut received).await;
        provider.close().await.unwrap();
    })
    .await;
}

/// A core subscription whose buffer is full loses what the server sends next: that loss is
/// logged as a slow consumer, with the connection's name, never silent.
#[test]
fn a_full_core_buffer_is_logged_as_a_slow_consumer() {
    let text = nats_support::logged(tracing::Level::WARN, |logs| {
        within(async move {
            let mut setup = Setup::core().named("small-buffer");
            setup.set_pending_limit(8);
            let provider = setup.connect().await;
            let topic = unique("full");
            let ctx = Context::new();
            let (open, gate) = tokio::sync::watch::channel(false);
            let _subscription = provider
                .subscribe_fn(&ctx, &topic, move |_: Context, _: Message| {
                    let mut gate = gate.clone();
                    async move {
                        let _ = gate.wait_for(|open| *open).await;
                        Ok::<(), Error>(())
                    }
                })
                .await
                .unwrap();

            for n in 0..100 {
                provider
                    .publish(&ctx, &topic, Message::new(n.to_string()))
                    .await
                    .unwrap();
            }
            provider.ping(&ctx).await.unwrap();
            while !logs.text().contains("slow consumer") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            open.send(true).unwrap();
            provider.close().await.unwrap();
        })
    });

    let warning = text
        .lines()
        .find(|line| line.contains("slow consumer"))
        .expect("a slow-consumer warning");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("small-buffer"),
        "names the connection: {warning}"
    );
}

#[tokio::test]
async fn jetstream_group_shares_messages_and_independent_subscribers_get_all() {
    within(async {
        let setup = Setup::jetstream();
        let provider = setup.connect().await;
        let topic = setup.topic("shared");
        let ctx = Context::new();
        let (member, mut group_received) = collector();
        let (solo, mut solo_received) = collector();
        let _a = provider
            .subscribe_group_fn(&ctx, &topic, "billing", member.clone())
            .await
            .unwrap();
        let _b = provider
            .subscribe_group_fn(&ctx, &topic, "billing", member)
            .await
            .unwrap();
        let _c = provider.subscribe_fn(&ctx, &topic, solo).await.unwrap();

        for n in 0..30 {
            provider
                .publish(&ctx, &topic, Message::new(format!("{n}")))
                .await
                .unwrap();
        }

        let shared = collect(&mut group_received, 30).await;
        let ids: HashSet<_> = shared.iter().map(|message| message.id.clone()).collect();
        assert_eq!(ids.len(), 30);
        assert_no_more(&mut group_received).await;
        assert_eq!(collect(&mut solo_received, 30).await.len(), 30);
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn jetstream_failing_handler_is_redelivered_then_dead_lettered() {
    within(async {
        let setup = Setup::jetstream();
        let provider = setup.connect().await;
        let topic = setup.topic("poison");
        let ctx = Context::new();
        let deliveries = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&deliveries);
        let _failing = provider
            .subscribe_group_fn(
                &ctx,
                &topic,
                "fragile",
                move |_ctx: Context, _message: Message| {
                    let counted = Arc::clone(&counted);
                    async move {
                        counted.fetch_add(1, Ordering::SeqCst);
                        Err::<(), _>(std::io::Error::other("cannot handle this"))
                    }
                },
            )
            .await
            .unwrap();
        let (dead_handler, mut dead) = collector();
        let _dead = provider
            .subscribe_fn(&ctx, &format!("{topic}.dlq"), dead_handler)
            .await
            .unwrap();

        let sent = Message::new("poison").with_header("kind", "bad");
        provider.publish(&ctx, &topic, sent.clone()).await.unwrap();

        let letter = collect(&mut dead, 1).await.remove(0);
        assert_eq!(letter.id, sent.id);
        assert_eq!(letter.body, sent.body);
        assert_eq!(letter.timestamp, sent.timestamp);
        assert_eq!(letter.header("kind"), Some("bad"));
        assert_eq!(
            letter.header(DEAD_LETTER_TOPIC_HEADER),
            Some(topic.as_str())
        );
        assert_eq!(letter.header(DEAD_LETTER_ATTEMPTS_HEADER), Some("3"));
        assert!(
            letter
                .header(DEAD_LETTER_ERROR_HEADER)
                .unwrap()
                .contains("cannot handle this")
        );
        assert_eq!(deliveries.load(Ordering::SeqCst), 3);

        // Terminated: no fourth delivery.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(deliveries.load(Ordering::SeqCst), 3);
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn core_failing_handler_is_retried_in_process_then_dead_lettered() {
    within(async {
        let provider = Setup::core().connect().await;
        let topic = unique("core-poison");
        let ctx = Context::new();
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&attempts);
        let _failing = provider
            .subscribe_fn(&ctx, &topic, move |_ctx: Context, _message: Message| {
                let counted = Arc::clone(&counted);
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>(std::io::Error::other("no"))
                }
            })
            .await
            .unwrap();
        let (dead_handler, mut dead) = collector();
        let _dead = provider
            .subscribe_fn(&ctx, &format!("{topic}.dlq"), dead_handler)
            .await
            .unwrap();

        let sent = Message::new("poison");
        provider.publish(&ctx, &topic, sent.clone()).await.unwrap();

        let letter = collect(&mut dead, 1).await.remove(0);
        assert_eq!(letter.id, sent.id);
        assert_eq!(letter.header(DEAD_LETTER_ATTEMPTS_HEADER), Some("3"));
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_wildcard_subscription_dead_letters_by_subject_and_never_twice() {
    within(async {
        let setup = Setup::jetstream();
        let provider = setup.connect().await;
        let ctx = Context::new();
        let failures = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&failures);
        // `>` also matches the dead-letter subjects, so this subscription gets its dead letters.
        let _everything = provider
            .subscribe_group_fn(
                &ctx,
                &setup.topic(">"),
                "greedy",
                move |_ctx: Context, _message: Message| {
                    let counted = Arc::clone(&counted);
                    async move {
                        counted.fetch_add(1, Ordering::SeqCst);
                        Err::<(), _>(std::io::Error::other("never"))
                    }
                },
            )
            .await
            .unwrap();
        let (dead_handler, mut dead) = collector();
        let _dead = provider
            .subscribe_fn(&ctx, &setup.topic("eu.dlq.>"), dead_handler.clone())
            .await
            .unwrap();
        let _exact = provider
            .subscribe_fn(&ctx, &setup.topic("eu.dlq"), dead_handler)
            .await
            .unwrap();

        let sent = Message::new("bad");
        provider
            .publish(&ctx, &setup.topic("eu"), sent.clone())
            .await
            .unwrap();

        let letter = collect(&mut dead, 1).await.remove(0);
        assert_eq!(letter.id, sent.id);
        let eu = setup.topic("eu");
        assert_eq!(letter.header(DEAD_LETTER_TOPIC_HEADER), Some(eu.as_str()));
        // The dead letter fails three more times in the greedy subscription, then stops there.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_no_more(&mut dead).await;
        assert_eq!(failures.load(Ordering::SeqCst), 6);
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn jetstream_duplicate_publish_is_stored_once() {
    within(async {
        let setup = Setup::jetstream();
        let provider = setup.connect().await;
        let topic = setup.topic("dedup");
        let ctx = Context::new();

        let message = Message::new("once");
        provider
            .publish(&ctx, &topic, message.clone())
            .await
            .unwrap();
        provider
            .publish(&ctx, &topic, message.clone())
            .await
            .unwrap();
        provider
            .publish(&ctx, &topic, Message::new("another"))
            .await
            .unwrap();

        let context = provider.jetstream().expect("JetStream mode");
        let mut stream = context.get_stream(setup.stream_name()).await.unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, 2);
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn messages_published_by_async_nats_are_consumed_with_their_headers() {
    within(async {
        let setup = Setup::jetstream();
        let provider = setup.connect().await;
        let topic = setup.topic("interop");
        let (handler, mut received) = collector();
        let _subscription = provider
            .subscribe_fn(&Context::new(), &topic, handler)
            .await
            .unwrap();

        let client = async_nats::connect(nats_url()).await.unwrap();
        let context = async_nats::jetstream::new(client.clone());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "foreign-1");
        headers.insert("trace_id", "foreign-trace");
        headers.insert("X-Tenant", "acme");
        context
            .publish_with_headers(topic.clone(), headers, "from outside".into())
            .await
            .unwrap()
            .await
            .unwrap();
        context
            .publish(topic.clone(), "bare".into())
            .await
            .unwrap()
            .await
            .unwrap();

        let got = collect(&mut received, 2).await;
        assert_eq!(got[0].id, "foreign-1");
        assert_eq!(got[0].header("X-Tenant"), Some("acme"));
        assert_eq!(got[0].trace_id(), Some("foreign-trace"));
        assert_eq!(&got[0].body[..], b"from outside");
        assert_eq!(&got[1].body[..], b"bare");
        assert!(got[1].id.starts_with(setup.stream_name()), "{}", got[1].id);

        // And the other way: a core subscriber of async-nats sees our headers.
        let core = Setup::core().connect().await;
        let plain_topic = unique("interop-core");
        let mut raw = client.subscribe(plain_topic.clone()).await.unwrap();
        // Once its own probe comes back, the server has the raw subscription.
        client
            .publish(plain_topic.clone(), "probe".into())
            .await
            .unwrap();
        let probe = tokio::time::timeout(Duration::from_secs(20), raw.next())
            .await
            .unwrap();
        assert_eq!(&probe.unwrap().payload[..], b"probe");
        let sent = Message::new("to outside").with_header("X-Tenant", "acme");
        core.publish(&Context::from_request_id("r-9"), &plain_topic, sent.clone())
            .await
            .unwrap();
        let raw_message = tokio::time::timeout(Duration::from_secs(20), raw.next())
            .await
            .expect("the raw subscriber gets the message")
            .unwrap();
        let raw_headers = raw_message.headers.unwrap();
        assert_eq!(raw_headers.get("Nats-Msg-Id").unwrap().as_str(), sent.id);
        assert_eq!(raw_headers.get("X-Tenant").unwrap().as_str(), "acme");
        assert_eq!(raw_headers.get("trace_id").unwrap().as_str(), "r-9");

        core.close().await.unwrap();
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_reserved_header_fails_the_publish_clearly() {
    within(async {
        let provider = Setup::core().connect().await;
        let message = Message::new("x").with_header("Nats-Msg-Id", "mine");

        let error = provider
            .publish(&Context::new(), "anything", message)
            .await
            .unwrap_err();

        assert!(matches!(error, Error::Unsupported { .. }), "{error}");
        assert!(error.to_string().contains("Nats-Msg-Id"), "{error}");
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn display_names_the_connection_and_address_and_close_is_final() {
    within(async {
        let provider = Setup::core().named("orders").connect().await;
        let address = SecretUrl::parse(&nats_url()).unwrap().host_port();

        assert_eq!(provider.to_string(), format!("nats(orders: {address})"));
        provider.ping(&Context::new()).await.unwrap();
        provider.close().await.unwrap();

        let error = provider
            .publish(&Context::new(), "after.close", Message::new("x"))
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Closed { .. }), "{error}");
    })
    .await;
}

#[tokio::test]
async fn the_manager_connects_nats_and_gives_the_native_client() {
    within(async {
        let stream = unique("MGR").replace('.', "_");
        let toml = format!(
            r#"
            [brokers.events]
            driver = "nats"
            [brokers.events.nats]
            url = "{url}"
            mode = "jetstream"
            stream = {{ name = "{stream}", subjects = ["{stream}.>"], storage = "memory" }}
            "#,
            url = nats_url(),
        );
        let config = broker::Config::from_toml_with_env(&toml, &Default::default()).unwrap();
        let manager = Manager::connect(
            &Context::new().with_timeout(Duration::from_secs(10)),
            config,
        )
        .await
        .unwrap();

        let nats = manager.get_as::<NatsProvider>("events").unwrap();
        assert!(nats.jetstream().is_some());
        nats.client().flush().await.unwrap();
        manager.ping(&Context::new()).await.unwrap();
        manager.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn first_connect_waits_for_a_server_that_is_still_starting() {
    within(async {
        let port = nats_support::free_port();
        let setup = Setup::core().at(&format!("nats://127.0.0.1:{port}"));
        let connecting = tokio::spawn(async move {
            let ctx = Context::new().with_timeout(Duration::from_secs(20));
            NatsProvider::connect(&ctx, "late", setup.config()).await
        });

        tokio::time::sleep(Duration::from_millis(800)).await;
        let _server = NatsServer::start(port);

        let provider = connecting.await.unwrap().unwrap();
        provider.ping(&Context::new()).await.unwrap();
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn connecting_to_nothing_stops_at_the_deadline() {
    within(async {
        let port = nats_support::free_port();
        let setup = Setup::core().at(&format!("nats://127.0.0.1:{port}"));
        let ctx = Context::new().with_timeout(Duration::from_millis(700));

        let error = NatsProvider::connect(&ctx, "nowhere", setup.config())
            .await
            .unwrap_err();

        assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
        assert!(error.to_string().contains("nowhere"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn core_subscription_resumes_after_a_server_restart() {
    within(async {
        let port = nats_support::free_port();
        let mut server = NatsServer::start(port);
        let provider = Setup::core().at(&server.url()).connect().await;
        let topic = unique("restart");
        let (handler, mut received) = collector();
        let _subscription = provider
            .subscribe_fn(&Context::new(), &topic, handler)
            .await
            .unwrap();

        provider
            .publish(&Context::new(), &topic, Message::new("before"))
            .await
            .unwrap();
        assert_eq!(&collect(&mut received, 1).await[0].body[..], b"before");

        server.stop();
        nats_support::wait_until_disconnected(&provider).await;
        let ping = provider.ping(&Context::new()).await.unwrap_err();
        assert!(matches!(ping, Error::Broker { .. }), "{ping}");
        let down = Context::new().with_timeout(Duration::from_millis(500));
        let error = provider
            .publish(&down, &topic, Message::new("lost"))
            .await
            .unwrap_err();
        assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
        assert!(error.to_string().contains(&topic), "{error}");

        server.restart();
        nats_support::wait_until_connected(&provider).await;
        let after = Context::new().with_timeout(Duration::from_secs(10));
        provider
            .publish(&after, &topic, Message::new("after"))
            .await
            .unwrap();

        // The message queued while the server was down may arrive too: core NATS promises
        // nothing either way.
        let bodies: Vec<_> = collect_until(&mut received, b"after").await;
        assert!(bodies.iter().any(|body| body == b"after"));
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn jetstream_loses_nothing_acknowledged_across_a_server_restart() {
    within(async {
        let port = nats_support::free_port();
        let mut server = NatsServer::start(port);
        let setup = Setup::jetstream().at(&server.url()).file_storage();
        let provider = setup.connect().await;
        let topic = setup.topic("durable");
        let (handler, mut received) = collector();
        let _subscription = provider
            .subscribe_group_fn(&Context::new(), &topic, "keepers", handler)
            .await
            .unwrap();

        for n in 0..5 {
            let message = Message::new(format!("before {n}"));
            provider
                .publish(&Context::new(), &topic, message)
                .await
                .unwrap();
        }
        collect(&mut received, 5).await;

        server.stop();
        nats_support::wait_until_disconnected(&provider).await;
        let short = Context::new().with_timeout(Duration::from_millis(700));
        let error = provider
            .publish(&short, &topic, Message::new("given up"))
            .await
            .unwrap_err();
        assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
        let mut sent = HashSet::new();
        // A publish during the outage waits for the server (up to its deadline) and succeeds.
        let waiting = {
            let provider = Arc::clone(&provider);
            let topic = topic.clone();
            let message = Message::new("during");
            sent.insert(message.id.clone());
            tokio::spawn(async move {
                let ctx = Context::new().with_timeout(Duration::from_secs(30));
                provider.publish(&ctx, &topic, message).await
            })
        };
        tokio::time::sleep(Duration::from_millis(700)).await;
        server.restart();
        waiting.await.unwrap().unwrap();

        for n in 0..5 {
            let message = Message::new(format!("after {n}"));
            sent.insert(message.id.clone());
            let ctx = Context::new().with_timeout(Duration::from_secs(30));
            provider.publish(&ctx, &topic, message).await.unwrap();
        }

        let mut seen = HashSet::new();
        while !sent.is_subset(&seen) {
            let message = tokio::time::timeout(Duration::from_secs(30), received.recv())
                .await
                .expect("every acknowledged message arrives")
                .unwrap();
            seen.insert(message.id);
        }
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn user_and_password_authenticate_and_a_wrong_one_fails_at_once() {
    within(async {
        let port = nats_support::free_port();
        let _server = NatsServer::start_with(port, &["--user", "alice", "--pass", "hunter2"]);
        let mut right = Setup::core()
            .at(&format!("nats://127.0.0.1:{port}"))
            .config();
        right.user = Some("alice".to_owned());
        right.password = Some(Secret::new("hunter2"));
        let mut wrong = right.clone();
        wrong.password = Some(Secret::new("letmein"));
        let ctx = Context::new().with_timeout(Duration::from_secs(15));

        let provider = NatsProvider::connect(&ctx, "secured", right).await.unwrap();
        provider.ping(&ctx).await.unwrap();
        let shown = format!("{provider} {provider:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        provider.close().await.unwrap();

        let started = std::time::Instant::now();
        let error = NatsProvider::connect(&ctx, "secured", wrong)
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Broker { .. }), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "refused logins are not retried"
        );
        assert!(!error.to_string().contains("letmein"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn a_token_authenticates_and_stays_out_of_debug_output() {
    within(async {
        let port = nats_support::free_port();
        let _server = NatsServer::start_with(port, &["--auth", "s3cr3t-token"]);
        let mut config = Setup::core()
            .at(&format!("nats://127.0.0.1:{port}"))
            .config();
        config.token = Some(Secret::new("s3cr3t-token"));
        let ctx = Context::new().with_timeout(Duration::from_secs(15));

        let provider = NatsProvider::connect(&ctx, "tokened", config)
            .await
            .unwrap();
        provider.ping(&ctx).await.unwrap();
        assert!(!format!("{provider:?}").contains("s3cr3t-token"));
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_deleted_durable_consumer_is_opened_again() {
    within(async {
        let setup = Setup::jetstream();
        let provider = setup.connect().await;
        let topic = setup.topic("phoenix");
        let (handler, mut received) = collector();
        let _subscription = provider
            .subscribe_group_fn(&Context::new(), &topic, "phoenix", handler)
            .await
            .unwrap();
        provider
            .publish(&Context::new(), &topic, Message::new("first"))
            .await
            .unwrap();
        collect(&mut received, 1).await;

        let durable = format!("phoenix-{}", topic.replace('.', "_"));
        let context = provider.jetstream().unwrap();
        let stream = context.get_stream(setup.stream_name()).await.unwrap();
        stream.delete_consumer(&durable).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while stream.consumer_info(&durable).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the consumer was not opened again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        provider
            .publish(&Context::new(), &topic, Message::new("second"))
            .await
            .unwrap();
        let got = collect(&mut received, 1).await;
        assert_eq!(&got[0].body[..], b"second");
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn core_subscription_fails_over_to_another_node_of_a_cluster() {
    within(async {
        let cluster = unique("cluster");
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| (nats_support::free_port(), nats_support::free_port()))
            .collect();
        let routes = ports
            .iter()
            .map(|(_, route)| format!("nats://127.0.0.1:{route}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers: Vec<NatsServer> = ports
            .iter()
            .map(|(client, route)| {
                let listen = format!("nats://127.0.0.1:{route}");
                let name = format!("node-{client}");
                NatsServer::start_with(
                    *client,
                    &[
                        "--server_name",
                        &name,
                        "--cluster_name",
                        &cluster,
                        "--cluster",
                        &listen,
                        "--routes",
                        &routes,
                    ],
                )
            })
            .collect();

        let mut config = Setup::core().config();
        config.url = None;
        config.urls = ports
            .iter()
            .map(|(client, _)| SecretUrl::parse(&format!("nats://127.0.0.1:{client}")).unwrap())
            .collect();
        let ctx = Context::new().with_timeout(Duration::from_secs(20));
        let subscriber = Arc::new(
            NatsProvider::connect(&ctx, "cluster-sub", config)
                .await
                .unwrap(),
        );
        let topic = unique("failover");
        let (handler, mut received) = collector();
        let _subscription = subscriber
            .subscribe_fn(&Context::new(), &topic, handler)
            .await
            .unwrap();

        // The publisher sits on a node the subscriber does not use.
        let used = subscriber.client().server_info().port;
        let other = ports
            .iter()
            .map(|(client, _)| *client)
            .find(|port| *port != used)
            .unwrap();
        let publisher = Setup::core()
            .at(&format!("nats://127.0.0.1:{other}"))
            .connect()
            .await;
        let before = pump(&publisher, &topic, "before");
        let got = collect(&mut received, 1).await;
        before.abort();
        assert!(got[0].body.starts_with(b"before"));

        let index = ports
            .iter()
            .position(|(client, _)| *client == used)
            .unwrap();
        servers[index].stop();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while subscriber.client().server_info().port == used {
            assert!(std::time::Instant::now() < deadline, "no failover");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nats_support::wait_until_connected(&subscriber).await;

        while received.try_recv().is_ok() {}
        let after = pump(&publisher, &topic, "after");
        let got = collect_until_prefix(&mut received, b"after").await;
        after.abort();
        assert!(got.body.starts_with(b"after"));

        subscriber.close().await.unwrap();
        publisher.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_handler_slower_than_ack_wait_is_not_given_the_message_twice() {
    within(async {
        let mut setup = Setup::jetstream();
        setup.set_ack_wait(Duration::from_secs(1));
        let provider = setup.connect().await;
        let topic = setup.topic("slow");
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        let (done, mut finished) = collector();
        let _subscription = provider
            .subscribe_group_fn(
                &Context::new(),
                &topic,
                "patient",
                move |ctx: Context, message: Message| {
                    let counted = Arc::clone(&counted);
                    let done = done.clone();
                    async move {
                        counted.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(2500)).await;
                        broker::Handler::call(&done, ctx, message).await
                    }
                },
            )
            .await
            .unwrap();

        provider
            .publish(&Context::new(), &topic, Message::new("slow"))
            .await
            .unwrap();

        collect(&mut finished, 1).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_subject_no_stream_captures_fails_clearly() {
    within(async {
        let mut config = Setup::jetstream().config();
        config.stream = None;
        let ctx = Context::new().with_timeout(Duration::from_secs(10));
        let provider = NatsProvider::connect(&ctx, "streamless", config)
            .await
            .unwrap();
        let topic = unique("nowhere");

        let published = provider
            .publish(&ctx, &topic, Message::new("x"))
            .await
            .unwrap_err();
        let subscribed = provider
            .subscribe_fn(&ctx, &topic, collector().0)
            .await
            .unwrap_err();

        for error in [published, subscribed] {
            assert!(matches!(error, Error::Broker { .. }), "{error}");
            assert_eq!(error.origin().unwrap().target, topic, "{error}");
        }
        provider.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_required_stream_that_is_missing_fails_the_connect_naming_it() {
    within(async {
        let mut config = Setup::jetstream().config();
        if let Some(stream) = &mut config.stream {
            stream.missing = broker::config::NatsMissingStream::Fail;
        }
        let name = config.stream.as_ref().unwrap().name.clone();
        let ctx = Context::new().with_timeout(Duration::from_secs(10));

        let error = NatsProvider::connect(&ctx, "strict", config)
            .await
            .unwrap_err();

        assert!(matches!(error, Error::Broker { .. }), "{error}");
        assert!(error.to_string().contains(&name), "{error}");
    })
    .await;
}

#[tokio::test]
async fn a_jetstream_subscriber_without_a_group_resumes_after_a_server_restart() {
    within(async {
        let port = nats_support::free_port();
        let mut server = NatsServer::start(port);
        let setup = Setup::jetstream().at(&server.url()).file_storage();
        let provider = setup.connect().await;
        let topic = setup.topic("ephemeral");
        let (handler, mut received) = collector();
        let _subscription = provider
            .subscribe_fn(&Context::new(), &topic, handler)
            .await
            .unwrap();
        provider
            .publish(&Context::new(), &topic, Message::new("before"))
            .await
            .unwrap();
        collect(&mut received, 1).await;

        server.stop();
        nats_support::wait_until_disconnected(&provider).await;
        server.restart();
        nats_support::wait_until_connected(&provider).await;

        let after = Message::new("after");
        let ctx = Context::new().with_timeout(Duration::from_secs(20));
        provider.publish(&ctx, &topic, after.clone()).await.unwrap();
        let got = collect(&mut received, 1).await;
        assert_eq!(got[0].id, after.id);
        provider.close().await.unwrap();
    })
    .await;
}

/// Everything the driver and the client log, at every level, while connecting with a password
/// and a token in URLs, publishing, closing and being refused: no secret appears.
#[test]
fn secrets_never_reach_the_logs() {
    let text = nats_support::logged(tracing::Level::TRACE, |_| async {
        let port = nats_support::free_port();
        let _server = NatsServer::start_with(port, &["--user", "alice", "--pass", "pa55-w0rd"]);
        let url = format!("nats://alice:pa55-w0rd@127.0.0.1:{port}");
        let ctx = Context::new().with_timeout(Duration::from_secs(15));

        let mut in_url = Setup::core().at(&url).config();
        in_url.name = Some("logged".to_owned());
        let provider = NatsProvider::connect(&ctx, "in-url", in_url).await.unwrap();
        provider
            .publish(&ctx, "logged.topic", Message::new("x"))
            .await
            .unwrap();
        tracing::info!(provider = %provider, debug = ?provider, "connected");
        provider.close().await.unwrap();

        let token_port = nats_support::free_port();
        let _token_server = NatsServer::start_with(token_port, &["--auth", "t0ken-s3cret"]);
        let token_url = format!("nats://t0ken-s3cret@127.0.0.1:{token_port}");
        let provider = Setup::core().at(&token_url).connect().await;
        provider.ping(&ctx).await.unwrap();
        tracing::info!(provider = %provider, debug = ?provider, "connected with a token");
        provider.close().await.unwrap();

        let mut wrong = Setup::core()
            .at(&format!("nats://127.0.0.1:{port}"))
            .config();
        wrong.user = Some("alice".to_owned());
        wrong.password = Some(Secret::new("wr0ng-pa55"));
        let error = NatsProvider::connect(&ctx, "wrong", wrong)
            .await
            .unwrap_err();
        tracing::warn!(error = %error, debug = ?error, "refused");
    });

    assert!(text.contains("refused"), "the capture works: {text}");
    for secret in ["pa55-w0rd", "wr0ng-pa55", "t0ken-s3cret"] {
        assert!(!text.contains(secret), "{secret} was logged:\n{text}");
    }
}

#[tokio::test]
async fn a_durable_name_shared_by_two_topics_is_refused() {
    within(async {
        let mut setup = Setup::jetstream();
        setup.set_durable_name("{group}");
        let provider = setup.connect().await;
        let ctx = Context::new();
        let (handler, _received) = collector();
        let _first = provider
            .subscribe_group_fn(&ctx, &setup.topic("a"), "same", handler.clone())
            .await
            .unwrap();

        let error = provider
            .subscribe_group_fn(&ctx, &setup.topic("b"), "same", handler)
            .await
            .unwrap_err();

        assert!(error.to_string().contains("{topic}"), "{error}");
        provider.close().await.unwrap();
    })
    .await;
}

/// Publishes one message through a connection made with `config` and waits for it to come
/// back on a subscription of the same connection.
async fn round_trip(name: &str, config: NatsConfig) {
    let ctx = Context::new().with_timeout(Duration::from_secs(15));
    let provider = NatsProvider::connect(&ctx, name, config).await.unwrap();
    let topic = unique("transport");
    let (handler, mut received) = collector();
    let _subscription = provider.subscribe_fn(&ctx, &topic, handler).await.unwrap();

    provider
        .publish(&ctx, &topic, Message::new("over the wire"))
        .await
        .unwrap();

    let got = collect(&mut received, 1).await.remove(0);
    assert_eq!(got.body.as_ref(), b"over the wire");
    provider.close().await.unwrap();
}

#[tokio::test]
async fn publish_and_subscribe_over_websocket() {
    within(async {
        let websocket_port = nats_support::free_port();
        let _server = NatsServer::start_with_config(
            nats_support::free_port(),
            &format!("websocket {{ port: {websocket_port}, no_tls: true }}"),
        );
        let config = Setup::core()
            .at(&format!("ws://127.0.0.1:{websocket_port}"))
            .config();

        round_trip("websocket", config).await;
    })
    .await;
}

/// TLS against servers of their own with the certificates of `testdata/tls`.
#[cfg(feature = "tls")]
mod tls {
    use std::time::Instant;

    use broker::config::TlsConfig;
    use nats_support::tls_file;

    use super::*;

    /// Core NATS at `url`, trusting the test authority.
    fn trusting(url: &str) -> NatsConfig {
        let mut config = Setup::core().at(url).config();
        config.tls = Some(TlsConfig {
            ca_file: Some(tls_file("ca.pem")),
            ..TlsConfig::default()
        });
        config
    }

    /// The settings' TLS table.
    fn tls_of(config: &mut NatsConfig) -> &mut TlsConfig {
        config.tls.get_or_insert_with(TlsConfig::default)
    }

    /// The error connecting the connection `name` with `config` gives. A TLS failure is
    /// final, so it comes at once rather than at the deadline.
    async fn connect_error(name: &str, config: NatsConfig) -> Error {
        let ctx = Context::new().with_timeout(Duration::from_secs(15));
        let started = Instant::now();

        let error = NatsProvider::connect(&ctx, name, config)
            .await
            .expect_err("the connection fails");

        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a TLS failure is not retried: {error}"
        );
        assert!(matches!(error, Error::Broker { .. }), "{error}");
        assert_eq!(error.origin().unwrap().connection, name, "{error}");
        assert!(error.to_string().contains(name), "{error}");
        error
    }

    #[tokio::test]
    async fn publish_and_subscribe_over_tls_trusting_the_test_authority() {
        within(async {
            let port = nats_support::free_port();
            let _server = NatsServer::start_tls(port, false);

            round_trip("secure", trusting(&format!("nats://127.0.0.1:{port}"))).await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_required_client_certificate_is_shown_and_a_missing_one_fails() {
        within(async {
            let port = nats_support::free_port();
            let _server = NatsServer::start_tls(port, true);
            let without = trusting(&format!("nats://127.0.0.1:{port}"));
            let mut with = without.clone();
            tls_of(&mut with).cert_file = Some(tls_file("client.pem"));
            tls_of(&mut with).key_file = Some(tls_file("client.key"));

            round_trip("mutual", with).await;
            let error = connect_error("anonymous", without).await;

            assert!(error.to_string().contains("Certificate"), "{error}");
        })
        .await;
    }

    #[tokio::test]
    async fn an_authority_that_does_not_trust_the_server_fails_naming_the_connection() {
        within(async {
            let port = nats_support::free_port();
            let _server = NatsServer::start_tls(port, false);
            let mut config = trusting(&format!("nats://127.0.0.1:{port}"));
            tls_of(&mut config).ca_file = Some(tls_file("untrusted-ca.pem"));

            let error = connect_error("suspicious", config).await;

            assert!(error.to_string().contains("certificate"), "{error}");
        })
        .await;
    }

    #[tokio::test]
    async fn server_name_is_the_name_the_certificate_is_checked_against() {
        within(async {
            let port = nats_support::free_port();
            let _server = NatsServer::start_tls(port, false);
            let mut right = trusting(&format!("nats://127.0.0.1:{port}"));
            tls_of(&mut right).server_name = Some("localhost".to_owned());
            let mut wrong = right.clone();
            tls_of(&mut wrong).server_name = Some("wrong.example".to_owned());

            round_trip("by-name", right).await;
            let error = connect_error("misnamed", wrong).await;

            assert!(error.to_string().contains("certificate"), "{error}");
        })
        .await;
    }

    #[tokio::test]
    async fn a_tls_url_turns_tls_on_with_the_system_roots_when_no_table_says_otherwise() {
        within(async {
            let port = nats_support::free_port();
            let _server = NatsServer::start_tls(port, false);
            let url = format!("tls://127.0.0.1:{port}");
            let system_roots = Setup::core().at(&url).config();

            round_trip("tls-url", trusting(&url)).await;
            // The system does not trust the test authority: the certificate was checked.
            let error = connect_error("tls-url-system", system_roots).await;

            assert!(error.to_string().contains("certificate"), "{error}");
        })
        .await;
    }

    #[tokio::test]
    async fn publish_and_subscribe_over_websocket_with_tls() {
        within(async {
            let websocket_port = nats_support::free_port();
            let (cert, key) = (tls_file("server.pem"), tls_file("server.key"));
            let _server = NatsServer::start_with_config(
                nats_support::free_port(),
                &format!(
                    "websocket {{ port: {websocket_port}, tls {{ cert_file: {cert:?}, \
                     key_file: {key:?} }} }}"
                ),
            );

            round_trip(
                "secure-websocket",
                trusting(&format!("wss://127.0.0.1:{websocket_port}")),
            )
            .await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_missing_ca_file_is_a_configuration_error_naming_the_key() {
        within(async {
            let mut config = trusting("nats://127.0.0.1:4222");
            tls_of(&mut config).ca_file = Some(tls_file("no-such-ca.pem"));
            let ctx = Context::new().with_timeout(Duration::from_secs(5));

            let error = NatsProvider::connect(&ctx, "misfiled", config)
                .await
                .unwrap_err();

            let Error::Config(error) = error else {
                panic!("not a configuration error: {error}");
            };
            assert_eq!(error.key_path(), Some("nats.tls.ca_file"), "{error}");
            assert_eq!(error.connection_name(), Some("misfiled"), "{error}");
        })
        .await;
    }

    #[tokio::test]
    async fn a_plain_websocket_url_with_tls_turned_on_is_refused() {
        within(async {
            let config = trusting("ws://127.0.0.1:8080");
            let ctx = Context::new().with_timeout(Duration::from_secs(5));

            let error = NatsProvider::connect(&ctx, "half-secure", config)
                .await
                .unwrap_err();

            let Error::Config(error) = error else {
                panic!("not a configuration error: {error}");
            };
            assert_eq!(error.key_path(), Some("nats.url"), "{error}");
        })
        .await;
    }

    #[tokio::test]
    async fn a_server_that_demands_tls_gives_an_error_not_a_panic() {
        within(async {
            let port = nats_support::free_port();
            let _server = NatsServer::start_tls(port, false);
            let setup = Setup::core().at(&format!("nats://127.0.0.1:{port}"));

            let error = connect_error("tls-only", setup.config()).await;

            assert!(error.to_string().contains("requires TLS"), "{error}");
        })
        .await;
    }
}

/// Without the `tls` feature, asking for TLS is refused before anything is sent.
#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn tls_is_refused_in_a_build_without_the_tls_feature() {
    within(async {
        let by_url = Setup::core().at("tls://127.0.0.1:4222").config();
        let mut by_table = Setup::core().config();
        by_table.tls = Some(broker::config::TlsConfig::default());
        let ctx = Context::new().with_timeout(Duration::from_secs(5));

        for config in [by_url, by_table] {
            let error = NatsProvider::connect(&ctx, "secure", config)
                .await
                .unwrap_err();

            assert!(matches!(error, Error::Unsupported { .. }), "{error}");
        }
    })
    .await;
}
