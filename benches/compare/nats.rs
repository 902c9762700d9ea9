//! NATS: `broker` against async-nats used directly, in core and JetStream mode.
//!
//! Both sides promise the same: a core publish is flushed before it returns, a JetStream
//! publish waits for the stream's ack, and a JetStream consumer acks every message.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use broker::config::{
    NatsConfig, NatsConsumerConfig, NatsDeliver, NatsMissingStream, NatsMode, NatsStreamConfig,
    SecretUrl,
};
use broker::nats::NatsProvider;
use broker::{Context, Provider, SubscribeOptions};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use tokio::sync::Notify;

use crate::report::Report;
use crate::{
    BODY, SENT_HEADER, Settings, compare_latency, compare_throughput, histogram, latency_through,
    message, new_group, now_ns, paced, record, soak, time_consume,
};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// How long a core consumer may take for one burst before the burst counts as lost: core NATS
/// drops messages a consumer cannot take, and a lost one would otherwise be waited for forever.
const CORE_CONSUME_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bursts a core consumer gets before the run fails.
const CORE_CONSUME_TRIES: usize = 3;

pub(crate) async fn run(settings: &Settings, report: &mut Report) -> BenchResult<()> {
    let url = std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let stream_name = format!("BENCH_{}", uuid::Uuid::now_v7().simple());
    let messages = settings.messages;

    let client = async_nats::connect(url.as_str()).await?;
    let context = jetstream::new(client.clone());
    // A bounded in-memory stream of the benchmark's own, removed at the end.
    context
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{prefix}.>")],
            storage: stream::StorageType::Memory,
            max_messages: i64::try_from(messages * 3).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await?;

    let core = connect(&url, NatsMode::Core, None, messages).await?;
    let streamed = connect(&url, NatsMode::Jetstream, Some(&stream_name), messages).await?;
    let concurrency = settings.concurrency;

    compare_throughput(
        report,
        "nats",
        "core publish (flushed)",
        messages,
        || publish_core_broker(&core, messages, concurrency),
        || publish_core_native(&client, messages, concurrency, Fields::Plain),
    )
    .await?;

    // The same workload against async-nats sending what `broker` sends, to tell the cost of
    // the model's headers (paid by both ends of the connection) from the cost of the driver.
    compare_throughput(
        report,
        "nats",
        "core publish (flushed, same fields)",
        messages,
        || publish_core_broker(&core, messages, concurrency),
        || publish_core_native(&client, messages, concurrency, Fields::LikeBroker),
    )
    .await?;

    compare_throughput(
        report,
        "nats",
        "core consume",
        messages,
        || tolerating_loss("broker", || consume_core_broker(&core, &client, messages)),
        || tolerating_loss("async-nats", || consume_core_native(&client, messages)),
    )
    .await?;

    compare_throughput(
        report,
        "nats",
        "JetStream publish (acked)",
        messages,
        || publish_broker(&streamed, &prefix, messages, concurrency),
        || publish_native(&context, &prefix, messages, concurrency),
    )
    .await?;

    compare_throughput(
        report,
        "nats",
        "JetStream consume (durable, acked)",
        messages,
        || consume_broker(&streamed, &context, &prefix, messages),
        || consume_native(&context, &stream_name, &prefix, messages),
    )
    .await?;

    compare_latency(
        report,
        "nats",
        "core latency",
        || async {
            latency_through(core.clone(), &subject("bench-core", "latency"), settings).await
        },
        || latency_native(&client, settings),
    )
    .await?;

    if !settings.soak.is_zero() {
        let topic = subject("bench-core", "soak");
        report.add_soak(soak(&*core, "nats core", &topic, settings).await?);
    }

    core.close().await?;
    streamed.close().await?;
    context.delete_stream(&stream_name).await?;
    Ok(())
}

async fn connect(
    url: &str,
    mode: NatsMode,
    stream: Option<&str>,
    messages: usize,
) -> BenchResult<Arc<NatsProvider>> {
    let config = NatsConfig {
        url: Some(SecretUrl::parse(url)?),
        mode,
        // Core consumers must hold a whole burst: core NATS drops what a slow one cannot take.
        pending_limit: 65_536.max(messages),
        stream: stream.map(|name| {
            Box::new(NatsStreamConfig {
                name: name.to_owned(),
                subjects: Vec::new(),
                storage: Default::default(),
                retention: Default::default(),
                missing: NatsMissingStream::Fail,
                duplicate_window: None,
                max_age: None,
            })
        }),
        consumer: Box::new(NatsConsumerConfig {
            deliver: NatsDeliver::All,
            ..NatsConsumerConfig::default()
        }),
        ..NatsConfig::default()
    };
    let ctx = Context::new().with_timeout(Duration::from_secs(30));
    Ok(Arc::new(
        NatsProvider::connect(&ctx, "bench", config).await?,
    ))
}

fn subject(prefix: &str, workload: &str) -> String {
    format!("{prefix}.{workload}.{}", uuid::Uuid::now_v7().simple())
}

fn headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("bench", "1");
    headers
}

async fn publish_core_broker(
    provider: &NatsProvider,
    messages: usize,
    concurrency: usize,
) -> BenchResult<Duration> {
    // Core subjects need no stream: nobody listens, which costs the server nothing.
    let subject = subject("bench-core", "publish");
    let ctx = Context::new();
    let start = Instant::now();
    futures_util::stream::iter(0..messages)
        .map(|_| provider.publish(&ctx, &subject, message()))
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    Ok(start.elapsed())
}

/// What the native side puts in each message's headers.
#[derive(Debug, Clone, Copy)]
enum Fields {
    /// The benchmark's one header.
    Plain,
    /// What `broker` sends for a message: a fresh UUIDv7 id as `Nats-Msg-Id` (it holds the
    /// time too) and the publisher's `trace_id` beside the benchmark's header.
    LikeBroker,
}

async fn publish_core_native(
    client: &async_nats::Client,
    messages: usize,
    concurrency: usize,
    fields: Fields,
) -> BenchResult<Duration> {
    let subject = subject("bench-core", "publish");
    let trace_id = uuid::Uuid::now_v7().to_string();
    let start = Instant::now();
    futures_util::stream::iter(0..messages)
        .map(|_| {
            let subject = subject.clone();
            let mut headers = headers();
            if let Fields::LikeBroker = fields {
                headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
                headers.insert("trace_id", trace_id.as_str());
            }
            async move {
                client
                    .publish_with_headers(subject, headers, Bytes::from_static(&BODY))
                    .await?;
                client.flush().await?;
                Ok::<(), Box<dyn std::error::Error>>(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    Ok(start.elapsed())
}

async fn publish_broker(
    provider: &NatsProvider,
    prefix: &str,
    messages: usize,
    concurrency: usize,
) -> BenchResult<Duration> {
    let subject = subject(prefix, "publish");
    let ctx = Context::new();
    let start = Instant::now();
    futures_util::stream::iter(0..messages)
        .map(|_| provider.publish(&ctx, &subject, message()))
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    Ok(start.elapsed())
}

async fn publish_native(
    context: &jetstream::Context,
    prefix: &str,
    messages: usize,
    concurrency: usize,
) -> BenchResult<Duration> {
    let subject = subject(prefix, "publish");
    let start = Instant::now();
    futures_util::stream::iter(0..messages)
        .map(|_| {
            let subject = subject.clone();
            async move {
                let mut headers = headers();
                headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string().as_str());
                context
                    .publish_with_headers(subject, headers, Bytes::from_static(&BODY))
                    .await?
                    .await?;
                Ok::<(), Box<dyn std::error::Error>>(())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    Ok(start.elapsed())
}

/// Publishes `messages` messages to `subject` as fast as the client takes them, flushing once
/// at the end: the same input for both core consumers.
async fn burst(client: &async_nats::Client, subject: &str, messages: usize) -> BenchResult<()> {
    for _ in 0..messages {
        client
            .publish_with_headers(subject.to_owned(), headers(), Bytes::from_static(&BODY))
            .await?;
    }
    client.flush().await?;
    Ok(())
}

/// Runs one core consume side, again with a fresh burst when messages were lost: either
/// client may lose some when the shared machine starves it, and the figure is about speed.
async fn tolerating_loss<F, Fut>(side: &str, mut consume: F) -> BenchResult<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = BenchResult<Duration>>,
{
    let mut tries = 1;
    loop {
        match consume().await {
            Ok(elapsed) => return Ok(elapsed),
            Err(error) if tries < CORE_CONSUME_TRIES => {
                eprintln!(
                    "nats core consume, {side}: {error}; core NATS drops what a slow consumer cannot take, so the burst runs again"
                );
                tries += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// How long a core subscription of `broker` takes to handle a burst of `messages` messages,
/// timed from the first publish to the last message handled.
async fn consume_core_broker(
    provider: &NatsProvider,
    publisher: &async_nats::Client,
    messages: usize,
) -> BenchResult<Duration> {
    let subject = subject("bench-core", "consume");
    let handled = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (count, all) = (Arc::clone(&handled), Arc::clone(&done));
    let handler = move |_: Context, _: broker::Message| {
        if count.fetch_add(1, Ordering::Relaxed) + 1 == messages {
            all.notify_one();
        }
        async { Ok::<(), broker::Error>(()) }
    };
    let subscription = provider
        .subscribe(
            &Context::new(),
            &subject,
            SubscribeOptions::default(),
            Arc::new(handler),
        )
        .await?;

    let start = Instant::now();
    burst(publisher, &subject, messages).await?;
    let finished = tokio::time::timeout(CORE_CONSUME_TIMEOUT, done.notified()).await;
    let elapsed = start.elapsed();
    subscription.stop().await;
    finished.map_err(|_| {
        format!(
            "the broker's core subscription handled {} of {messages} messages",
            handled.load(Ordering::Relaxed)
        )
    })?;
    Ok(elapsed)
}

/// The same burst, read by an async-nats subscriber of the same client kind.
async fn consume_core_native(
    publisher: &async_nats::Client,
    messages: usize,
) -> BenchResult<Duration> {
    let url = std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    // A client of its own, as the broker's subscription has, with room for the whole burst.
    let client = async_nats::ConnectOptions::new()
        .subscription_capacity(65_536.max(messages))
        .connect(url.as_str())
        .await?;
    let subject = subject("bench-core", "consume");
    let mut subscriber = client.subscribe(subject.clone()).await?;
    client.flush().await?;

    let start = Instant::now();
    let reader = tokio::spawn(async move {
        let mut count = 0;
        while count < messages {
            let Some(message) = subscriber.next().await else {
                break;
            };
            std::hint::black_box(&message.payload);
            count += 1;
        }
        count
    });
    burst(publisher, &subject, messages).await?;
    let abort = reader.abort_handle();
    let count = tokio::time::timeout(CORE_CONSUME_TIMEOUT, reader)
        .await
        .map_err(|_| {
            abort.abort();
            "the native core subscriber did not get every message"
        })??;
    let elapsed = start.elapsed();
    assert_eq!(count, messages, "native core subscriber read every message");
    Ok(elapsed)
}

/// A subject of the stream holding `messages` messages, published natively and acknowledged.
async fn filled_subject(
    context: &jetstream::Context,
    prefix: &str,
    messages: usize,
) -> BenchResult<String> {
    let subject = subject(prefix, "consume");
    futures_util::stream::iter(0..messages)
        .map(|_| {
            let subject = subject.clone();
            async move {
                context
                    .publish_with_headers(subject, headers(), Bytes::from_static(&BODY))
                    .await?
                    .await?;
                Ok::<(), Box<dyn std::error::Error>>(())
            }
        })
        .buffer_unordered(256)
        .try_collect::<()>()
        .await?;
    Ok(subject)
}

async fn consume_broker(
    provider: &NatsProvider,
    context: &jetstream::Context,
    prefix: &str,
    messages: usize,
) -> BenchResult<Duration> {
    let subject = filled_subject(context, prefix, messages).await?;
    // Timing starts once the subscription is live, as the native side has nothing to join.
    time_consume(provider, &subject, new_group(), messages).await
}

async fn consume_native(
    context: &jetstream::Context,
    stream_name: &str,
    prefix: &str,
    messages: usize,
) -> BenchResult<Duration> {
    let subject = filled_subject(context, prefix, messages).await?;
    let stream = context.get_stream(stream_name).await?;
    let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            name: Some(name.clone()),
            filter_subject: subject,
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: 256,
            ..Default::default()
        })
        .await?;

    let start = Instant::now();
    let mut pulled = consumer
        .stream()
        .max_messages_per_batch(100)
        .messages()
        .await?;
    let mut count = 0;
    while count < messages {
        let Some(message) = pulled.next().await else {
            break;
        };
        let message = message?;
        std::hint::black_box(&message.payload);
        message.ack().await.map_err(|error| error.to_string())?;
        count += 1;
    }
    let elapsed = start.elapsed();
    assert_eq!(count, messages, "native consumer read every message");
    drop(pulled);
    stream.delete_consumer(&name).await?;
    Ok(elapsed)
}

async fn latency_native(
    client: &async_nats::Client,
    settings: &Settings,
) -> BenchResult<Histogram<u64>> {
    let subject = subject("bench-core", "latency");
    let latencies = Arc::new(Mutex::new(histogram()));
    let mut subscriber = client.subscribe(subject.clone()).await?;
    client.flush().await?;

    let recorded = Arc::clone(&latencies);
    let reader = tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            let sent = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(SENT_HEADER))
                .and_then(|sent| sent.as_str().parse::<u64>().ok());
            record(&recorded, sent);
        }
    });

    paced(settings.latency_rate, settings.latency_duration, |_, _| {
        let client = client.clone();
        let subject = subject.clone();
        async move {
            tokio::spawn(async move {
                let mut headers = headers();
                headers.insert(SENT_HEADER, now_ns().to_string().as_str());
                let body = Bytes::from_static(&BODY);
                if client
                    .publish_with_headers(subject, headers, body)
                    .await
                    .is_ok()
                {
                    let _ = client.flush().await;
                }
            });
            Ok(())
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    reader.abort();
    let histogram = latencies.lock().unwrap().clone();
    Ok(histogram)
}
