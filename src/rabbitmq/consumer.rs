//! One subscription's consumer: its channel, queue and loop, restarted after a lost
//! connection.

use std::sync::Arc;
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicNackArguments, BasicQosArguments, Channel,
    ConsumerMessage,
};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use super::codec;
use super::connection::{Link, Session, backoff, close_channel};
use super::error::RabbitMqError;
use super::topology::{ChannelWatch, QueueSpec, declare_subscription};
use super::{DRIVER, Inner};
use crate::handler::{Dispatcher, Outcome};
use crate::message::{Fallback, Message};
use crate::propagation;

/// How long dead-lettering waits for the dead-letter exchange's confirm.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);

/// A consumer registered on a channel of one session.
pub(super) struct Live {
    session: Arc<Session>,
    channel: Channel,
    queue: String,
    deliveries: UnboundedReceiver<ConsumerMessage>,
}

/// How a consumer's time on one channel ended.
enum Ended {
    /// The subscription stops.
    Stopped,
    /// The channel or its connection went away: consume again on the next session.
    Lost,
}

/// One subscription.
pub(super) struct Consumer {
    pub(super) inner: Arc<Inner>,
    pub(super) topic: String,
    pub(super) group: Option<String>,
    pub(super) dispatcher: Dispatcher,
}

impl Consumer {
    fn link(&self) -> &Link {
        &self.inner.link
    }

    /// Opens a channel on `session`, declares and binds the queue and starts consuming.
    pub(super) async fn start(&self, session: &Arc<Session>) -> Result<Live, RabbitMqError> {
        let config = &self.inner.config;
        let channel = session.connection.open_channel(None).await?;
        let watch = ChannelWatch::register(&channel).await?;

        let started = async {
            channel
                .basic_qos(BasicQosArguments::new(0, config.prefetch, false))
                .await
                .map_err(|error| watch.explain(error, "queue", &self.topic))?;
            let spec = match &self.group {
                Some(group) => QueueSpec::Group(config.queue_name(&self.topic, group)),
                None => QueueSpec::Private,
            };
            let queue = declare_subscription(&channel, &watch, config, &self.topic, &spec).await?;
            let args = BasicConsumeArguments::new(&queue, "")
                .manual_ack(true)
                .finish();
            let (_tag, deliveries) = channel
                .basic_consume_rx(args)
                .await
                .map_err(|error| watch.explain(error, "queue", &queue))?;
            Ok::<_, RabbitMqError>((queue, deliveries))
        };
        match started.await {
            Ok((queue, deliveries)) => Ok(Live {
                session: Arc::clone(session),
                channel,
                queue,
                deliveries,
            }),
            Err(error) => {
                close_channel(channel).await;
                Err(error)
            }
        }
    }

    /// Consumes until `stop` fires, starting again on every new session.
    pub(super) async fn run(self, first: Live, stop: CancellationToken) {
        let mut live = Some(first);
        let mut failures: u32 = 0;
        loop {
            let current = match live.take() {
                Some(current) => current,
                None => {
                    let session = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        session = self.link().session() => session,
                    };
                    let Some(session) = session else { break };
                    let started = tokio::select! {
                        biased;
                        _ = stop.cancelled() => break,
                        started = self.start(&session) => started,
                    };
                    match started {
                        Ok(current) => {
                            failures = 0;
                            tracing::info!(
                                connection = %self.inner.name,
                                driver = %DRIVER,
                                topic = %self.topic,
                                queue = %current.queue,
                                "subscription resumed"
                            );
                            current
                        }
                        Err(error) => {
                            failures = failures.saturating_add(1);
                            let delay = backoff(&self.inner.config, failures);
                            tracing::warn!(
                                connection = %self.inner.name,
                                driver = %DRIVER,
                                topic = %self.topic,
                                attempt = failures,
                                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                                error = %error,
                                "cannot resume the subscription; trying again"
                            );
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                _ = tokio::time::sleep(delay) => {}
                            }
                            continue;
                        }
                    }
                }
            };
            let session = Arc::clone(&current.session);
            match self.consume(current, &stop).await {
                Ended::Stopped => break,
                Ended::Lost if session.lost.is_cancelled() => {}
                Ended::Lost => {
                    // Only this channel went away (say, its queue was deleted): start again
                    // on the same connection after a pause, so a channel that keeps closing
                    // is not reopened in a tight loop.
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff(&self.inner.config, 1)) => {}
                    }
                }
            }
        }
        tracing::debug!(
            connection = %self.inner.name,
            driver = %DRIVER,
            topic = %self.topic,
            "subscription stopped"
        );
    }

    /// Takes deliveries and runs up to `concurrency` handlers at once, until `stop` fires or
    /// the channel goes away; then lets the running handlers finish and settles them.
    async fn consume(&self, live: Live, stop: &CancellationToken) -> Ended {
        let Live {
            session,
            channel,
            queue,
            mut deliveries,
        } = live;
        let limit = usize::from(self.inner.config.concurrency.max(1));
        let mut running = FuturesUnordered::new();
        let mut in_order = InOrderAcks::new(self.inner.config.prefetch);
        // One wait for each, not one per delivery: each registers with its token.
        let stopped = stop.cancelled();
        let lost = session.lost.cancelled();
        tokio::pin!(stopped, lost);

        let ended = loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break Ended::Stopped,
                Some(()) = running.next(), if !running.is_empty() => {}
                _ = &mut lost => break Ended::Lost,
                delivery = deliveries.recv(), if running.len() < limit => match delivery {
                    // One at a time, the handler runs right here: a set of running handlers
                    // would cost an allocation per delivery.
                    Some(delivery) if limit == 1 => {
                        if let Some((tag, settle)) = self.handle(&session, delivery, stop).await {
                            let waiting = !deliveries.is_empty();
                            in_order.settle(self, &channel, tag, settle, waiting).await;
                        }
                    }
                    Some(delivery) => running.push(async {
                        if let Some((tag, settle)) = self.handle(&session, delivery, stop).await {
                            self.settle(&channel, tag, settle).await;
                        }
                    }),
                    None => {
                        tracing::warn!(
                            connection = %self.inner.name,
                            driver = %DRIVER,
                            topic = %self.topic,
                            queue = %queue,
                            "the consumer's channel closed"
                        );
                        break Ended::Lost;
                    }
                },
            }
        };

        // Running handlers finish (a stop only cuts their retries short) and are settled; after
        // a loss their acknowledgements fail and the server delivers those messages again.
        while running.next().await.is_some() {}
        drop(running);
        in_order.flush(self, &channel).await;
        if let Ended::Stopped = ended {
            // Deliveries not yet handled go back to the queue when the channel closes.
            close_channel(channel).await;
        }
        ended
    }

    /// Runs the handler on one delivery; returns its tag and how to settle it.
    async fn handle(
        &self,
        session: &Arc<Session>,
        delivery: ConsumerMessage,
        stop: &CancellationToken,
    ) -> Option<(u64, Settle)> {
        let ConsumerMessage {
            deliver,
            basic_properties,
            content,
            ..
        } = delivery;
        let deliver = deliver?;
        let tag = deliver.delivery_tag();
        let properties = basic_properties.unwrap_or_default();
        let body = Bytes::from(content.unwrap_or_default());
        let fallback = Fallback::default();
        let delivered = || codec::decode(&properties, body.clone(), &fallback);

        let settle = match self.dispatcher.dispatch(delivered, stop).await {
            Outcome::Handled => Settle::Ack,
            Outcome::Failed { error, attempts } => {
                // Boxed: dead-lettering is rare, and its publish would otherwise weigh on
                // every delivery's future.
                let dead =
                    Box::pin(self.dead_letter(session, &delivered(), &error.to_string(), attempts))
                        .await;
                if dead { Settle::Ack } else { Settle::Reject }
            }
            Outcome::Interrupted => Settle::Requeue,
        };
        Some((tag, settle))
    }

    /// Publishes the failed message, with its error headers, to the dead-letter exchange and
    /// waits for the confirm. `false` if that failed.
    async fn dead_letter(
        &self,
        session: &Session,
        message: &Message,
        error: &str,
        attempts: u32,
    ) -> bool {
        let dead = propagation::dead_letter(message, &self.topic, error, attempts);
        let exchange = self.inner.config.dead_letter_exchange_name();
        let routing_key = self.inner.config.dead_letter_topic_for(&self.topic);
        let published = match codec::encode(&dead) {
            Ok(properties) => tokio::time::timeout(
                DEAD_LETTER_TIMEOUT,
                session
                    .publisher
                    .publish(&exchange, &routing_key, properties, dead.body.to_vec()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(RabbitMqError::ConnectionLost {
                    address: session.address.clone(),
                })
            }),
            Err(error) => Err(error),
        };
        match published {
            Ok(()) => {
                tracing::warn!(
                    connection = %self.inner.name,
                    driver = %DRIVER,
                    topic = %self.topic,
                    dead_letter_exchange = %exchange,
                    dead_letter_topic = %routing_key,
                    message_id = %message.id,
                    attempts,
                    "message dead-lettered"
                );
                true
            }
            Err(publish_error) => {
                tracing::warn!(
                    connection = %self.inner.name,
                    driver = %DRIVER,
                    topic = %self.topic,
                    dead_letter_exchange = %exchange,
                    message_id = %message.id,
                    error = %publish_error,
                    "cannot publish to the dead-letter exchange; rejecting the message to it instead, without the error headers"
                );
                false
            }
        }
    }

    async fn settle(&self, channel: &Channel, tag: u64, settle: Settle) {
        let result = match settle {
            Settle::Ack => channel.basic_ack(BasicAckArguments::new(tag, false)).await,
            Settle::AckThrough => channel.basic_ack(BasicAckArguments::new(tag, true)).await,
            Settle::Reject => {
                channel
                    .basic_nack(BasicNackArguments::new(tag, false, false))
                    .await
            }
            Settle::Requeue => {
                channel
                    .basic_nack(BasicNackArguments::new(tag, false, true))
                    .await
            }
        };
        if let Err(error) = result {
            // The delivery stays unacknowledged, so the server delivers it again.
            tracing::warn!(
                connection = %self.inner.name,
                driver = %DRIVER,
                topic = %self.topic,
                error = %error,
                "cannot acknowledge a delivery; it will be delivered again"
            );
        }
    }
}

enum Settle {
    Ack,
    /// One `basic.ack` for this delivery and every earlier one on the channel.
    AckThrough,
    /// `basic.nack` without requeue: the queue's dead-letter exchange takes it.
    Reject,
    Requeue,
}

/// Acknowledgements of deliveries handled one at a time, in order: a run of handled
/// deliveries is acknowledged at once, with one `multiple` ack for the last of them.
///
/// The run ends when no further delivery is waiting (so a quiet queue acknowledges each message
/// right away), when it reaches half the prefetch (so the server never stalls for acks), and
/// before any delivery that is rejected or requeued. A handled delivery whose ack is still
/// waiting is delivered again if the connection is lost meanwhile, as one whose handler was
/// still running would be.
struct InOrderAcks {
    last_handled: Option<u64>,
    count: u16,
    most: u16,
}

impl InOrderAcks {
    fn new(prefetch: u16) -> Self {
        InOrderAcks {
            last_handled: None,
            count: 0,
            most: (prefetch / 2).max(1),
        }
    }

    /// Settles the delivery `tag`; `waiting` says whether another delivery has arrived.
    async fn settle(
        &mut self,
        consumer: &Consumer,
        channel: &Channel,
        tag: u64,
        settle: Settle,
        waiting: bool,
    ) {
        if let Settle::Ack = settle {
            self.last_handled = Some(tag);
            self.count += 1;
            if !waiting || self.count >= self.most {
                self.flush(consumer, channel).await;
            }
            return;
        }
        self.flush(consumer, channel).await;
        consumer.settle(channel, tag, settle).await;
    }

    /// Acknowledges every handled delivery not acknowledged yet.
    async fn flush(&mut self, consumer: &Consumer, channel: &Channel) {
        self.count = 0;
        if let Some(tag) = self.last_handled.take() {
            consumer.settle(channel, tag, Settle::AckThrough).await;
        }
    }
}
