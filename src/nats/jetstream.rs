//! JetStream: the stream, acknowledged publishes, and pull consumers with explicit acks.

use std::fmt::Write;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self as js, AckKind};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{DEAD_LETTER_TIMEOUT, DRIVER, DeadLetter, Shared, codec};
use crate::config::{
    NatsConfig, NatsConsumerConfig, NatsDeliver, NatsMissingStream, NatsRetention, NatsStorage,
    NatsStreamConfig,
};
use crate::context::new_id;
use crate::error::{BoxError, Error, Operation, Origin, Result};
use crate::handler::{Dispatcher, HandlerResult};
use crate::message::Message;
use crate::propagation;

/// How long an ephemeral consumer outlives a subscriber that vanished without stopping.
const EPHEMERAL_INACTIVE_THRESHOLD: Duration = Duration::from_secs(300);

/// How often the server confirms an idle pull request, so a lost one is noticed.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(5);

/// The most messages one pull request asks for.
const MAX_BATCH: i64 = 100;

/// How long a stopping subscription waits for its last acks and clean-up.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks JetStream at connect: the configured stream exists (created when missing if the
/// configuration says so), or at least JetStream answers.
pub(super) async fn prepare(
    context: &js::Context,
    config: &NatsConfig,
    origin: impl Fn() -> Origin,
) -> Result<()> {
    let Some(stream) = &config.stream else {
        // Listing streams is the cheapest request every JetStream server answers.
        if let Some(Err(error)) = context.stream_names().next().await {
            return Err(Error::broker(
                origin(),
                format!("JetStream is not available: {error}"),
            ));
        }
        return Ok(());
    };

    match stream.missing {
        NatsMissingStream::Create => {
            context
                .get_or_create_stream(stream_config(stream))
                .await
                .map_err(|error| {
                    Error::broker(
                        origin(),
                        format!("cannot create the stream `{}`: {error}", stream.name),
                    )
                })?;
        }
        NatsMissingStream::Fail => {
            context.get_stream(&stream.name).await.map_err(|error| {
                Error::broker(
                    origin(),
                    format!("the stream `{}` is not there: {error}", stream.name),
                )
            })?;
        }
    }
    Ok(())
}

fn stream_config(settings: &NatsStreamConfig) -> stream::Config {
    stream::Config {
        name: settings.name.clone(),
        subjects: settings.subjects.clone(),
        storage: match settings.storage {
            NatsStorage::File => StorageType::File,
            NatsStorage::Memory => StorageType::Memory,
        },
        retention: match settings.retention {
            NatsRetention::Limits => RetentionPolicy::Limits,
            NatsRetention::Interest => RetentionPolicy::Interest,
            NatsRetention::Workqueue => RetentionPolicy::WorkQueue,
        },
        duplicate_window: settings.duplicate_window.unwrap_or_default(),
        max_age: settings.max_age.unwrap_or_default(),
        ..Default::default()
    }
}

/// Publishes and waits for the stream's acknowledgement, trying again while the server is
/// unreachable. The message carries its id in `Nats-Msg-Id`, so the stream stores it once
/// however often it is sent.
///
/// `headers` go with the first attempt; a retry gets new ones from `encode`, so a publish that
/// goes through at once does not pay for a copy kept in case it does not.
pub(super) async fn publish(
    connection: &str,
    context: &js::Context,
    subject: &str,
    headers: HeaderMap,
    body: Bytes,
    encode: impl Fn() -> Result<HeaderMap, String>,
) -> Result<(), PublishError> {
    let mut first = Some(headers);
    let mut attempt: u32 = 0;
    loop {
        let headers = match first.take() {
            Some(headers) => headers,
            None => encode()
                .map_err(|reason| PublishError::with_source(PublishErrorKind::Other, reason))?,
        };
        // Boxed: the client's future takes most of a kilobyte, and inside this one it would
        // make every publish's future too large for the allocator's per-thread cache.
        let sent = Box::pin(context.publish_with_headers(
            super::core::shared_subject(subject),
            headers,
            body.clone(),
        ));
        let acknowledged = match sent.await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        let error = match acknowledged {
            Ok(ack) => {
                if ack.duplicate {
                    tracing::debug!(subject, stream = %ack.stream, "duplicate publish dropped");
                }
                return Ok(());
            }
            Err(error) => error,
        };

        // No answer in time means the server is away; "no stream" while disconnected means
        // the same. Connected and no stream is a configuration mistake worth failing on.
        let disconnected = context.client().connection_state() != State::Connected;
        let transient = match error.kind() {
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => true,
            PublishErrorKind::StreamNotFound => disconnected,
            _ => false,
        };
        if !transient {
            return Err(error);
        }
        attempt = attempt.saturating_add(1);
        let delay = Duration::from_millis(50)
            .saturating_mul(2u32.saturating_pow(attempt.min(6)))
            .min(Duration::from_secs(2));
        if attempt == 1 || attempt.is_multiple_of(20) {
            tracing::info!(
                connection,
                driver = %DRIVER,
                subject,
                attempt,
                delay_ms = delay.as_millis(),
                error = %error,
                "JetStream did not acknowledge the publish; trying again until the deadline"
            );
        }
        tokio::time::sleep(delay).await;
    }
}

/// One JetStream subscription: a pull consumer and its message stream.
pub(super) struct Consumer {
    shared: Arc<Shared>,
    topic: String,
    stream: stream::Stream,
    consumer: PullConsumer,
    settings: pull::Config,
    durable: bool,
    messages: pull::Stream,
    dispatcher: Dispatcher,
    /// The stream sequence of the last message handled, to resume a lost ephemeral consumer.
    last_sequence: Option<u64>,
}

impl Consumer {
    /// Creates (or joins) the consumer for `topic` and starts pulling; returns once the
    /// consumer exists on the server.
    pub(super) async fn start(
        shared: &Arc<Shared>,
        context: &js::Context,
        topic: &str,
        group: Option<&str>,
        dispatcher: Dispatcher,
    ) -> Result<Consumer> {
        let origin = || shared.origin(Operation::Subscribe, topic);
        let stream_name = match &shared.config.stream {
            Some(stream) => stream.name.clone(),
            None => context.stream_by_subject(topic).await.map_err(|error| {
                Error::broker(origin(), format!("no stream captures `{topic}`: {error}"))
            })?,
        };
        let stream = context.get_stream(&stream_name).await.map_err(|error| {
            Error::broker(
                origin(),
                format!("cannot find the stream `{stream_name}`: {error}"),
            )
        })?;

        let settings = consumer_config(&shared.config.consumer, topic, group);
        let durable = group.is_some();
        let consumer = open_consumer(&stream, &settings)
            .await
            .map_err(|error| Error::broker(origin(), error))?;
        let filter = &consumer.cached_info().config.filter_subject;
        if filter != topic {
            return Err(Error::broker(
                origin(),
                format!(
                    "the durable consumer `{}` already reads `{filter}`; give \
                     `consumer.durable_name` a `{{topic}}` so each topic gets its own",
                    consumer.cached_info().name
                ),
            ));
        }
        let messages = pull_messages(&consumer, &shared.config.consumer)
            .await
            .map_err(|error| Error::broker(origin(), error))?;

        Ok(Consumer {
            shared: Arc::clone(shared),
            topic: topic.to_owned(),
            stream,
            consumer,
            settings,
            durable,
            messages,
            dispatcher,
            last_sequence: None,
        })
    }

    /// Handles messages one at a time until `stop` fires, then gives back what it pulled but
    /// did not start, and removes an ephemeral consumer.
    pub(super) async fn run(mut self, stop: CancellationToken) {
        // One wait for the stop, not one per message: each registers with the token.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            // A flag read before each message, so the wait for the stop is polled only while
            // no message is ready, rather than ahead of every one.
            if stop.is_cancelled() {
                break;
            }
            let next = tokio::select! {
                biased;
                next = self.messages.next() => next,
                _ = &mut stopped => break,
            };
            match next {
                Some(Ok(message)) => self.handle(message).await,
                Some(Err(error)) => match error.kind() {
                    MessagesErrorKind::MissingHeartbeat => tracing::debug!(
                        connection = %self.shared.name,
                        topic = %self.topic,
                        "missed a JetStream heartbeat"
                    ),
                    MessagesErrorKind::ConsumerDeleted
                    | MessagesErrorKind::NoResponders
                    | MessagesErrorKind::RequestLimitExceeded
                    | MessagesErrorKind::PushBasedConsumer => {
                        tracing::warn!(
                            connection = %self.shared.name,
                            driver = %DRIVER,
                            topic = %self.topic,
                            error = %error,
                            "the consumer is gone or unreachable; opening it again"
                        );
                        if !self.reopen(&stop).await {
                            break;
                        }
                    }
                    _ => {
                        tracing::warn!(
                            connection = %self.shared.name,
                            driver = %DRIVER,
                            topic = %self.topic,
                            error = %error,
                            "pulling messages failed"
                        );
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                        }
                    }
                },
                None => {
                    if !self.reopen(&stop).await {
                        break;
                    }
                }
            }
        }
        self.leave().await;
    }

    /// Runs the handler on one delivery and acknowledges it as the outcome says.
    async fn handle(&mut self, delivered: js::Message) {
        let info = delivered.reply.as_deref().and_then(Delivery::parse);
        let attempt = info.as_ref().map_or(1, |info| {
            u32::try_from(info.delivered).unwrap_or(u32::MAX).max(1)
        });
        let sequence = info.as_ref().map(|info| info.stream_sequence);
        // Made on first use, as only a message that carries no time of its own needs it, and
        // the same for the dead letter.
        let published = OnceLock::new();
        let published = || {
            *published.get_or_init(|| {
                info.as_ref()
                    .map_or_else(SystemTime::now, Delivery::published)
            })
        };
        let fallback_id = || match &info {
            Some(info) => info.fallback_id(),
            None => new_id(),
        };
        let message = codec::decode(
            delivered.headers.as_ref(),
            delivered.payload.clone(),
            fallback_id,
            published,
        );
        // The handler takes the message rather than a copy: the id is kept for the ack, and
        // a message every delivery failed on is decoded again, with the same id and time.
        let id = message.id.clone();

        let result = self.attempt_in_progress(&delivered, message, attempt).await;
        let retry = self.dispatcher.retry();
        match result {
            Ok(()) => self.acknowledge(&delivered, &id, AckKind::Ack).await,
            Err(error) if attempt >= retry.attempts.max(1) => {
                let message = codec::decode(
                    delivered.headers.as_ref(),
                    delivered.payload.clone(),
                    || id,
                    published,
                );
                self.dead_letter(&delivered, &message, &error.to_string(), attempt)
                    .await;
            }
            Err(_) => {
                let delay = retry.backoff(attempt);
                self.acknowledge(&delivered, &id, AckKind::Nak(Some(delay)))
                    .await;
            }
        }
        if sequence.is_some() {
            self.last_sequence = sequence;
        }
    }

    /// Runs the handler once, telling the server every half `ack_wait` that it is still at
    /// work, so a slow handler does not get its message delivered a second time meanwhile.
    async fn attempt_in_progress(
        &self,
        delivered: &js::Message,
        message: Message,
        attempt: u32,
    ) -> HandlerResult {
        let handled = self.dispatcher.attempt(message, attempt);
        tokio::pin!(handled);
        // Most handlers are done within their first poll; only one that is not needs the
        // timer, which is set up and torn down in the runtime's shared timer wheel.
        if let Some(result) = (&mut handled).now_or_never() {
            return result;
        }

        let every = (self.shared.config.consumer.ack_wait / 2).max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                biased;
                result = &mut handled => return result,
                _ = ticks.tick() => {
                    if let Err(error) = delivered.ack_with(AckKind::Progress).await {
                        tracing::debug!(
                            connection = %self.shared.name,
                            topic = %self.topic,
                            error = %error,
                            "cannot tell the server the handler is still at work"
                        );
                    }
                }
            }
        }
    }

    async fn acknowledge(&self, delivered: &js::Message, message_id: &str, kind: AckKind) {
        let name = ack_name(&kind);
        if let Err(error) = delivered.ack_with(kind).await {
            tracing::warn!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                message_id,
                ack = name,
                error = %Error::broker(self.shared.origin(Operation::Ack, &self.topic), error),
                "acknowledgement not sent: the server will deliver the message again"
            );
        }
    }

    /// Publishes a message every delivery failed on to the dead-letter subject, then
    /// terminates it. If dead-lettering fails the message is delivered again later instead.
    async fn dead_letter(
        &self,
        delivered: &js::Message,
        message: &Message,
        error: &str,
        attempts: u32,
    ) {
        let trace_id = message.trace_id().unwrap_or_default();
        let subject = delivered.subject.as_str();
        let target = match self.shared.dead_letter_target(subject, message) {
            DeadLetter::To(target) => target,
            dropped => {
                tracing::error!(
                    connection = %self.shared.name,
                    driver = %DRIVER,
                    topic = %self.topic,
                    subject,
                    message_id = %message.id,
                    trace_id,
                    attempts,
                    error,
                    reason = dropped.reason(),
                    "handler failed on every delivery: message terminated"
                );
                self.acknowledge(delivered, &message.id, AckKind::Term)
                    .await;
                return;
            }
        };

        let dead = propagation::dead_letter(message, subject, error, attempts);
        let sent = tokio::time::timeout(DEAD_LETTER_TIMEOUT, self.publish_dead(&target, &dead))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        match sent {
            Ok(()) => {
                tracing::error!(
                    connection = %self.shared.name,
                    driver = %DRIVER,
                    topic = %self.topic,
                    dead_letter_subject = %target,
                    message_id = %message.id,
                    trace_id,
                    attempts,
                    error,
                    "handler failed on every delivery: message dead-lettered"
                );
                self.acknowledge(delivered, &message.id, AckKind::Term)
                    .await;
            }
            Err(publish_error) => {
                let delay = self.dispatcher.retry().backoff(attempts);
                tracing::error!(
                    connection = %self.shared.name,
                    driver = %DRIVER,
                    topic = %self.topic,
                    dead_letter_subject = %target,
                    message_id = %message.id,
                    trace_id,
                    attempts,
                    error,
                    publish_error = %publish_error,
                    retry_in_ms = delay.as_millis(),
                    "dead-lettering failed: the message will be delivered again"
                );
                self.acknowledge(delivered, &message.id, AckKind::Nak(Some(delay)))
                    .await;
            }
        }
    }

    /// Stores a dead letter in the stream that captures `target`, or publishes it on core
    /// NATS when none does.
    async fn publish_dead(&self, target: &str, dead: &Message) -> Result<(), BoxError> {
        let headers = codec::encode_dead_letter(dead)?;
        let Some(context) = &self.shared.jetstream else {
            return super::core::publish(&self.shared.client, target, headers, dead.body.clone())
                .await;
        };
        let encode = || codec::encode_dead_letter(dead);
        match publish(
            &self.shared.name,
            context,
            target,
            headers,
            dead.body.clone(),
            encode,
        )
        .await
        {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == PublishErrorKind::StreamNotFound => {
                tracing::warn!(
                    connection = %self.shared.name,
                    driver = %DRIVER,
                    dead_letter_subject = target,
                    "no stream captures the dead-letter subject: it is published on core NATS \
                     and reaches only current subscribers"
                );
                super::core::publish(&self.shared.client, target, encode()?, dead.body.clone())
                    .await
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Opens the consumer and its message stream again after the server lost them, trying
    /// until it works or `stop` fires. A consumer that has to be created anew starts after the
    /// last message this subscription handled; a durable one that still exists keeps its place.
    async fn reopen(&mut self, stop: &CancellationToken) -> bool {
        if let Some(sequence) = self.last_sequence {
            self.settings.deliver_policy = DeliverPolicy::ByStartSequence {
                start_sequence: sequence.saturating_add(1),
            };
        }
        let mut attempt: u32 = 0;
        loop {
            let opened = async {
                // An ephemeral consumer that still exists keeps its place; only a lost one is
                // created anew (a durable one is looked up by name anyway).
                let name = self.consumer.cached_info().name.clone();
                let consumer = match self.stream.consumer_info(&name).await {
                    Ok(_) if !self.durable => self.consumer.clone(),
                    _ => open_consumer(&self.stream, &self.settings).await?,
                };
                let messages = pull_messages(&consumer, &self.shared.config.consumer).await?;
                Ok::<_, BoxError>((consumer, messages))
            };
            let error = tokio::select! {
                biased;
                _ = stop.cancelled() => return false,
                opened = opened => match opened {
                    Ok((consumer, messages)) => {
                        self.consumer = consumer;
                        self.messages = messages;
                        tracing::info!(
                            connection = %self.shared.name,
                            driver = %DRIVER,
                            topic = %self.topic,
                            "consumer opened again"
                        );
                        return true;
                    }
                    Err(error) => error,
                },
            };
            attempt = attempt.saturating_add(1);
            let delay = Duration::from_millis(100)
                .saturating_mul(2u32.saturating_pow(attempt.min(6)))
                .min(Duration::from_secs(5));
            tracing::info!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                attempt,
                delay_ms = delay.as_millis(),
                error = %error,
                "cannot open the consumer; trying again"
            );
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Gives back the messages pulled but not started, sends the acks, and deletes an
    /// ephemeral consumer.
    async fn leave(mut self) {
        let mut given_back = 0_usize;
        // Bounded: a stream that kept reporting errors must not hold the stop up.
        for _ in 0..MAX_BATCH * 2 {
            let Some(Some(next)) = self.messages.next().now_or_never() else {
                break;
            };
            if let Ok(message) = next {
                let _ = message.ack_with(AckKind::Nak(None)).await;
                given_back += 1;
            }
        }
        if given_back > 0 {
            tracing::debug!(
                connection = %self.shared.name,
                topic = %self.topic,
                given_back,
                "messages pulled but not handled were given back"
            );
        }
        drop(self.messages);

        let client = &self.shared.client;
        if tokio::time::timeout(STOP_TIMEOUT, client.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                "the last acknowledgements could not be flushed: those messages will be \
                 delivered again"
            );
        }
        if !self.durable {
            let name = self.consumer.cached_info().name.clone();
            let deleted =
                tokio::time::timeout(STOP_TIMEOUT, self.stream.delete_consumer(&name)).await;
            if !matches!(deleted, Ok(Ok(_))) {
                tracing::debug!(
                    connection = %self.shared.name,
                    consumer = %name,
                    "the ephemeral consumer was left for the server to remove"
                );
            }
        }
    }
}

/// What the driver reads of a delivery's `$JS.ACK.` reply subject: the fields of async-nats's
/// `Message::info` it uses.
///
/// Read here because `info` finds every token with a string search, parses all of them and
/// makes a calendar date of the time, which took a tenth of a delivery's cost. The two formats
/// are those of the JetStream ack subject (ADR-15):
/// `<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<nanos>.<pending>`, or with
/// `<domain>.<account hash>.` before it and any tokens after it.
#[derive(Debug, PartialEq)]
struct Delivery<'a> {
    /// The tokens up to the consumer's name.
    head: &'a str,
    /// Whether `head` starts with the domain and the account hash.
    qualified: bool,
    /// How many times the server delivered the message, this time included.
    delivered: i64,
    stream_sequence: u64,
    /// `stream_sequence` as the server wrote it.
    stream_sequence_text: &'a str,
    /// When the stream stored the message, in nanoseconds since the Unix epoch.
    nanos: &'a str,
}

impl<'a> Delivery<'a> {
    fn parse(reply: &'a str) -> Option<Delivery<'a>> {
        let tokens = reply.strip_prefix("$JS.ACK.")?;
        let dots = dots(tokens);
        let qualified = match dots {
            6 => false,
            8.. => true,
            _ => return None,
        };
        // The numbers are read from the end, past the tokens a newer server may add.
        let mut rest = tokens;
        for _ in 0..dots.saturating_sub(8) {
            rest = split_last(rest)?.0;
        }
        let (rest, pending) = split_last(rest)?;
        let (rest, nanos) = split_last(rest)?;
        let (rest, consumer_sequence) = split_last(rest)?;
        let (rest, stream_sequence_text) = split_last(rest)?;
        let (head, delivered) = split_last(rest)?;
        pending.parse::<u64>().ok()?;
        consumer_sequence.parse::<u64>().ok()?;
        // Parsed when needed; a valid one fits an `i128`, as async-nats reads it.
        let digits = nanos.strip_prefix('-').unwrap_or(nanos);
        if digits.is_empty() || digits.len() > 38 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Delivery {
            head,
            qualified,
            delivered: delivered.parse().ok()?,
            stream_sequence: stream_sequence_text.parse().ok()?,
            stream_sequence_text,
            nanos,
        })
    }

    /// When the stream stored the message.
    fn published(&self) -> SystemTime {
        time_from_nanos(self.nanos).unwrap_or_else(SystemTime::now)
    }

    /// The id of a message that carries none: `{stream}:{stream sequence}`.
    fn fallback_id(&self) -> String {
        let mut head = self.head;
        if self.qualified {
            for _ in 0..2 {
                head = head.split_once('.').map_or("", |(_, rest)| rest);
            }
        }
        let stream = head.split_once('.').map_or(head, |(stream, _)| stream);
        let mut id = String::with_capacity(stream.len() + 21);
        id.push_str(stream);
        id.push(':');
        // The server writes plain decimals; anything else is written anew.
        let text = self.stream_sequence_text;
        if text == "0" || !text.starts_with(['0', '+']) {
            id.push_str(text);
        } else {
            let _ = write!(id, "{}", self.stream_sequence);
        }
        id
    }
}

/// How many `.` `text` holds.
fn dots(text: &str) -> usize {
    // Blocks of 16 bytes are counted whole, which the compiler turns into a few vector
    // instructions instead of a branch per byte.
    let count = |block: &[u8]| {
        block
            .iter()
            .fold(0_u8, |n, byte| n + u8::from(*byte == b'.'))
    };
    let mut blocks = text.as_bytes().chunks_exact(16);
    let whole: usize = blocks.by_ref().map(|block| usize::from(count(block))).sum();
    whole + usize::from(count(blocks.remainder()))
}

/// `text` without its last `.`-separated token, and that token.
fn split_last(text: &str) -> Option<(&str, &str)> {
    // The tokens read this way are short numbers: a byte loop beats a string search.
    let dot = text.bytes().rposition(|byte| byte == b'.')?;
    Some((&text[..dot], &text[dot + 1..]))
}

/// The time `nanos` (decimal text) nanoseconds from the Unix epoch, before it when negative.
fn time_from_nanos(nanos: &str) -> Option<SystemTime> {
    if let Ok(after) = nanos.parse::<u64>() {
        return UNIX_EPOCH.checked_add(Duration::from_nanos(after));
    }
    let before = nanos.parse::<i128>().ok()?.checked_neg()?;
    UNIX_EPOCH.checked_sub(Duration::from_nanos(u64::try_from(before).ok()?))
}

/// The consumer a subscription to `topic` uses: durable and named after the group, or
/// ephemeral without one.
fn consumer_config(
    settings: &NatsConsumerConfig,
    topic: &str,
    group: Option<&str>,
) -> pull::Config {
    let durable_name = group.map(|group| durable_name(&settings.durable_name, group, topic));
    pull::Config {
        durable_name: durable_name.clone(),
        name: durable_name,
        deliver_policy: match settings.deliver {
            NatsDeliver::New => DeliverPolicy::New,
            NatsDeliver::All => DeliverPolicy::All,
        },
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver.unwrap_or(-1),
        filter_subject: topic.to_owned(),
        max_ack_pending: settings.max_ack_pending,
        backoff: settings.backoff.clone(),
        inactive_threshold: if group.is_some() {
            Duration::ZERO
        } else {
            EPHEMERAL_INACTIVE_THRESHOLD
        },
        ..Default::default()
    }
}

/// The durable consumer name of `group` on `topic`: the template filled in, with every
/// character a consumer name cannot hold replaced by `_`.
fn durable_name(template: &str, group: &str, topic: &str) -> String {
    template
        .replace("{group}", group)
        .replace("{topic}", topic)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn open_consumer(
    stream: &stream::Stream,
    settings: &pull::Config,
) -> Result<PullConsumer, BoxError> {
    Ok(match &settings.durable_name {
        Some(name) => {
            stream
                .get_or_create_consumer(name, settings.clone())
                .await?
        }
        None => stream.create_consumer(settings.clone()).await?,
    })
}

async fn pull_messages(
    consumer: &PullConsumer,
    settings: &NatsConsumerConfig,
) -> Result<pull::Stream, BoxError> {
    let batch = settings.max_ack_pending.clamp(1, MAX_BATCH);
    Ok(consumer
        .stream()
        .max_messages_per_batch(usize::try_from(batch).unwrap_or(1))
        .heartbeat(IDLE_HEARTBEAT)
        .messages()
        .await?)
}

fn ack_name(kind: &AckKind) -> &'static str {
    match kind {
        AckKind::Ack => "ack",
        AckKind::Nak(_) => "nak",
        AckKind::Progress => "progress",
        AckKind::Next => "next",
        AckKind::Term => "term",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_gets_a_durable_consumer_and_no_group_an_ephemeral_one() {
        let settings = NatsConsumerConfig::default();

        let durable = consumer_config(&settings, "orders.created", Some("billing"));
        let ephemeral = consumer_config(&settings, "orders.created", None);

        assert_eq!(
            durable.durable_name.as_deref(),
            Some("billing-orders_created")
        );
        assert_eq!(durable.ack_policy, AckPolicy::Explicit);
        assert_eq!(durable.filter_subject, "orders.created");
        assert_eq!(durable.max_deliver, -1);
        assert_eq!(durable.max_ack_pending, settings.max_ack_pending);
        assert_eq!(ephemeral.durable_name, None);
        assert_eq!(ephemeral.inactive_threshold, EPHEMERAL_INACTIVE_THRESHOLD);
        assert_eq!(ephemeral.deliver_policy, DeliverPolicy::New);
    }

    #[test]
    fn ack_subjects_of_both_formats_are_read() {
        const NANOS: u64 = 1_790_230_470_084_404_000;
        let published = UNIX_EPOCH + Duration::from_nanos(NANOS);
        let first = format!("$JS.ACK.events.durable.3.100.7.{NANOS}.42");
        let second = format!("$JS.ACK._.szMpdrwD.events.4z6UI6IG.1.5.1.{NANOS}.1");
        let added = format!("$JS.ACK.hub.szMpdrwD.events.durable.2.50.9.{NANOS}.0.rand.more");

        let first = Delivery::parse(&first).unwrap();
        let second = Delivery::parse(&second).unwrap();
        let added = Delivery::parse(&added).unwrap();

        assert_eq!((first.delivered, first.stream_sequence), (3, 100));
        assert_eq!((second.delivered, second.stream_sequence), (1, 5));
        assert_eq!((added.delivered, added.stream_sequence), (2, 50));
        for delivery in [&first, &second, &added] {
            assert_eq!(delivery.published(), published);
        }
        assert_eq!(first.fallback_id(), "events:100");
        assert_eq!(second.fallback_id(), "events:5");
        assert_eq!(added.fallback_id(), "events:50");
        let padded = format!("$JS.ACK.events.durable.3.007.7.{NANOS}.42");
        assert_eq!(Delivery::parse(&padded).unwrap().fallback_id(), "events:7");
    }

    #[test]
    fn other_subjects_are_not_read_as_ack_subjects() {
        for reply in [
            "$JS.ACK.events.durable.3.100.7.1790230470084404000",
            "$JS.ACK.hub.szMpdrwD.events.durable.2.50.9.1790230470084404000",
            "$JS.FC.events.durable.3.100.7.1790230470084404000.42",
            "$JS.ACK.events.durable.3.abc.7.1790230470084404000.42",
            "$JS.ACK.events.durable.3.100.7.soon.42",
            "_INBOX.abc",
        ] {
            assert_eq!(Delivery::parse(reply), None, "{reply}");
        }
    }

    #[test]
    fn a_time_before_the_epoch_is_read_too() {
        assert_eq!(
            time_from_nanos("-1500000000"),
            UNIX_EPOCH.checked_sub(Duration::from_millis(1500))
        );
        assert_eq!(time_from_nanos("x"), None);
    }

    #[test]
    fn durable_names_hold_only_allowed_characters() {
        assert_eq!(
            durable_name("{group}-{topic}", "billing", "orders.*.created"),
            "billing-orders___created"
        );
        assert_eq!(durable_name("{group}", "a b>", "x"), "a_b_");
    }
}
