//! RabbitMQ: `broker` against amqprs used directly, with publisher confirms and manual acks on
//! both sides.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use async_trait::async_trait;
use broker::config::{RabbitMqConfig, SecretUrl};
use broker::rabbitmq::RabbitMqProvider;
use broker::{Context, Message, Provider, SubscribeOptions};
use futures_util::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use crate::report::Report;
use crate::{
    BODY, Settings, compare_latency, compare_throughput, histogram, latency_through, message,
    now_ns, paced, record, soak, time_consume,
};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

pub(crate) async fn run(settings: &Settings, report: &mut Report) -> BenchResult<()> {
    let url = std::env::var("TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let exchange = format!("bench.{}", uuid::Uuid::now_v7().simple());
    let config = RabbitMqConfig {
        url: Some(SecretUrl::parse(&url)?),
        exchange: exchange.clone(),
        ..RabbitMqConfig::default()
    };
    let ctx = Context::new().with_timeout(Duration::from_secs(30));
    let provider = RabbitMqProvider::connect(&ctx, "bench", config).await?;
    let native = connect_native(&url).await?;
    let messages = settings.messages;
    let window = settings.concurrency;

    compare_throughput(
        report,
        "rabbitmq",
        "publish (confirmed)",
        messages,
        || publish_broker(&provider, &native, &exchange, messages, window),
        || publish_native(&native, &exchange, messages, window, Properties::Fixed),
    )
    .await?;

    // The same workload against amqprs sending what `broker` sends, to tell the cost of the
    // model's fields on the wire (paid mostly by the server) from the cost of the driver.
    compare_throughput(
        report,
        "rabbitmq",
        "publish (confirmed, same fields)",
        messages,
        || publish_broker(&provider, &native, &exchange, messages, window),
        || publish_native(&native, &exchange, messages, window, Properties::LikeBroker),
    )
    .await?;

    compare_throughput(
        report,
        "rabbitmq",
        "consume (manual ack)",
        messages,
        || consume_broker(&provider, messages, window),
        || consume_native(&native, &exchange, messages, window),
    )
    .await?;

    let provider = Arc::new(provider);
    compare_latency(
        report,
        "rabbitmq",
        "latency",
        || async { latency_through(provider.clone(), &topic(), settings).await },
        || latency_native(&native, &exchange, settings),
    )
    .await?;

    if !settings.soak.is_zero() {
        let topic = topic();
        report.add_soak(soak(&*provider, "rabbitmq", &topic, settings).await?);
    }

    provider.close().await?;
    let cleanup = native.open_channel(None).await?;
    cleanup
        .exchange_delete(amqprs::channel::ExchangeDeleteArguments::new(&exchange))
        .await?;
    native.close().await?;
    Ok(())
}

async fn connect_native(url: &str) -> BenchResult<Connection> {
    let parsed = SecretUrl::parse(url)?;
    let url = parsed.expose();
    let password = url.password().unwrap_or("guest");
    let user = match url.username() {
        "" => "guest",
        user => user,
    };
    let args = OpenConnectionArguments::new(
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5672),
        user,
        password,
    )
    .virtual_host("/")
    .finish();
    let connection = Connection::open(&args).await?;
    connection
        .register_callback(DefaultConnectionCallback)
        .await?;
    Ok(connection)
}

fn topic() -> String {
    format!("bench.{}", uuid::Uuid::now_v7().simple())
}

/// A durable queue bound to `topic`, so publishes are routable; returns its name.
async fn bound_queue(channel: &Channel, exchange: &str, topic: &str) -> BenchResult<String> {
    let queue = format!("{topic}.queue");
    channel
        .queue_declare(QueueDeclareArguments::durable_client_named(&queue))
        .await?;
    channel
        .queue_bind(QueueBindArguments::new(&queue, exchange, topic))
        .await?;
    Ok(queue)
}

async fn delete_queue(channel: &Channel, queue: &str) -> BenchResult<()> {
    channel
        .queue_delete(QueueDeleteArguments::new(queue))
        .await?;
    Ok(())
}

async fn publish_broker(
    provider: &RabbitMqProvider,
    native: &Connection,
    exchange: &str,
    messages: usize,
    window: usize,
) -> BenchResult<Duration> {
    let topic = topic();
    let channel = native.open_channel(None).await?;
    let queue = bound_queue(&channel, exchange, &topic).await?;
    let ctx = Context::new();

    let start = Instant::now();
    futures_util::stream::iter(0..messages)
        .map(|_| provider.publish(&ctx, &topic, message()))
        .buffer_unordered(window)
        .try_collect::<()>()
        .await?;
    let elapsed = start.elapsed();

    delete_queue(&channel, &queue).await?;
    channel.close().await?;
    Ok(elapsed)
}

/// Publisher confirms as they arrive: (delivery tag, whether it covers every earlier tag).
struct Confirms(mpsc::UnboundedSender<(u64, bool)>);

#[async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send((ack.delivery_tag(), ack.mutiple()));
    }

    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        let _ = self.0.send((nack.delivery_tag(), nack.multiple()));
    }

    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// What the native side puts in each message's properties.
#[derive(Debug, Clone, Copy)]
enum Properties {
    /// One fixed set: persistent, with the benchmark's one header.
    Fixed,
    /// What `broker` sends for a message: a fresh id and timestamp, the millisecond time and
    /// `trace_id` headers beside the benchmark's one, persistent and `mandatory`.
    LikeBroker,
}

impl Properties {
    fn build(self, trace_id: &str) -> BenchResult<BasicProperties> {
        let mut headers = FieldTable::new();
        headers.insert("bench".try_into()?, "1".into());
        let mut properties = BasicProperties::default();
        properties.with_persistence(true);
        if let Properties::LikeBroker = self {
            let millis = i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis(),
            )?;
            headers.insert("trace_id".try_into()?, trace_id.into());
            headers.insert("x-broker-timestamp-ms".try_into()?, FieldValue::l(millis));
            properties
                .with_message_id(&uuid::Uuid::now_v7().to_string())
                .with_timestamp(u64::try_from(millis / 1000)?);
        }
        properties.with_headers(headers);
        Ok(properties)
    }
}

/// Publishes `messages` persistent messages with at most `window` unconfirmed at once, as a
/// careful amqprs user would, and returns when every one is confirmed.
async fn publish_confirmed(
    connection: &Connection,
    exchange: &str,
    topic: &str,
    messages: usize,
    window: usize,
    shape: Properties,
) -> BenchResult<Duration> {
    let channel = connection.open_channel(None).await?;
    let (confirms, mut confirmed) = mpsc::unbounded_channel();
    channel.register_callback(Confirms(confirms)).await?;
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await?;
    let trace_id = uuid::Uuid::now_v7().to_string();
    let fixed = shape.build(&trace_id)?;
    let mandatory = matches!(shape, Properties::LikeBroker);

    let start = Instant::now();
    let mut outstanding = BTreeSet::new();
    let mut next_tag = 1u64;
    while next_tag <= messages as u64 || !outstanding.is_empty() {
        if next_tag <= messages as u64 && outstanding.len() < window {
            let mut args = BasicPublishArguments::new(exchange, topic);
            args.mandatory(mandatory);
            let properties = match shape {
                Properties::Fixed => fixed.clone(),
                Properties::LikeBroker => shape.build(&trace_id)?,
            };
            channel
                .basic_publish(properties, BODY.to_vec(), args)
                .await?;
            outstanding.insert(next_tag);
            next_tag += 1;
            continue;
        }
        let Some((tag, multiple)) = confirmed.recv().await else {
            return Err("the channel closed before every confirm arrived".into());
        };
        if multiple {
            outstanding = outstanding.split_off(&(tag + 1));
        } else {
            outstanding.remove(&tag);
        }
    }
    let elapsed = start.elapsed();
    channel.close().await?;
    Ok(elapsed)
}

async fn publish_native(
    connection: &Connection,
    exchange: &str,
    messages: usize,
    window: usize,
    shape: Properties,
) -> BenchResult<Duration> {
    let topic = topic();
    let channel = connection.open_channel(None).await?;
    let queue = bound_queue(&channel, exchange, &topic).await?;
    let elapsed = publish_confirmed(connection, exchange, &topic, messages, window, shape).await?;
    delete_queue(&channel, &queue).await?;
    channel.close().await?;
    Ok(elapsed)
}

async fn consume_broker(
    provider: &RabbitMqProvider,
    messages: usize,
    window: usize,
) -> BenchResult<Duration> {
    let topic = topic();
    let group = SubscribeOptions::group("bench");
    let ctx = Context::new();
    let noop = |_: Context, _: Message| async { Ok::<(), broker::Error>(()) };

    // A first subscription declares the group's queue; the messages then wait in it.
    provider
        .subscribe(&ctx, &topic, group.clone(), Arc::new(noop))
        .await?
        .stop()
        .await;
    futures_util::stream::iter(0..messages)
        .map(|_| provider.publish(&ctx, &topic, message()))
        .buffer_unordered(window)
        .try_collect::<()>()
        .await?;

    let elapsed = time_consume(provider, &topic, group, messages).await?;

    let channel = provider.open_channel(&ctx).await?;
    delete_queue(&channel, &format!("{topic}.bench")).await?;
    channel.close().await?;
    Ok(elapsed)
}

async fn consume_native(
    connection: &Connection,
    exchange: &str,
    messages: usize,
    window: usize,
) -> BenchResult<Duration> {
    let topic = topic();
    let channel = connection.open_channel(None).await?;
    let queue = bound_queue(&channel, exchange, &topic).await?;
    publish_confirmed(
        connection,
        exchange,
        &topic,
        messages,
        window,
        Properties::Fixed,
    )
    .await?;

    let start = Instant::now();
    channel
        .basic_qos(BasicQosArguments::new(0, 64, false))
        .await?;
    let mut args = BasicConsumeArguments::new(&queue, "");
    args.manual_ack(true);
    let (_tag, mut deliveries) = channel.basic_consume_rx(args).await?;
    let mut received = 0;
    while received < messages {
        let Some(delivery) = deliveries.recv().await else {
            return Err("the consumer stopped early".into());
        };
        std::hint::black_box(&delivery.content);
        let tag = delivery.deliver.map_or(0, |deliver| deliver.delivery_tag());
        channel
            .basic_ack(BasicAckArguments::new(tag, false))
            .await?;
        received += 1;
    }
    let elapsed = start.elapsed();

    delete_queue(&channel, &queue).await?;
    channel.close().await?;
    Ok(elapsed)
}

/// End-to-end latency with amqprs alone: a bound queue consumed with manual acks, and
/// publishes at the settings' fixed rate that carry their send time as the message id.
async fn latency_native(
    connection: &Connection,
    exchange: &str,
    settings: &Settings,
) -> BenchResult<Histogram<u64>> {
    let topic = topic();
    let channel = connection.open_channel(None).await?;
    let queue = bound_queue(&channel, exchange, &topic).await?;
    channel
        .basic_qos(BasicQosArguments::new(0, 64, false))
        .await?;
    let mut args = BasicConsumeArguments::new(&queue, "");
    args.manual_ack(true);
    let (_tag, mut deliveries) = channel.basic_consume_rx(args).await?;

    let latencies = Arc::new(Mutex::new(histogram()));
    let recorded = Arc::clone(&latencies);
    let acks = channel.clone();
    let reader = tokio::spawn(async move {
        while let Some(delivery) = deliveries.recv().await {
            let sent = delivery
                .basic_properties
                .as_ref()
                .and_then(|properties| properties.message_id()?.parse().ok());
            record(&recorded, sent);
            let tag = delivery.deliver.map_or(0, |deliver| deliver.delivery_tag());
            let _ = acks.basic_ack(BasicAckArguments::new(tag, false)).await;
        }
    });

    let publisher = connection.open_channel(None).await?;
    paced(settings.latency_rate, settings.latency_duration, |_, _| {
        let publisher = publisher.clone();
        let (exchange, topic) = (exchange.to_owned(), topic.clone());
        async move {
            let properties = BasicProperties::default()
                .with_persistence(true)
                .with_message_id(&now_ns().to_string())
                .finish();
            let args = BasicPublishArguments::new(&exchange, &topic);
            publisher
                .basic_publish(properties, BODY.to_vec(), args)
                .await?;
            Ok(())
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    delete_queue(&channel, &queue).await?;
    reader.abort();
    publisher.close().await?;
    channel.close().await?;
    let histogram = latencies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(histogram)
}
