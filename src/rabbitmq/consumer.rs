//! One subscription's consumer: its channel, queue and loop, restarted after a lost
//! connection.

use std::sync::Arc;
use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicNackArguments, BasicQosArguments, Channel,
    ConsumerMessage,
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use super::codec;
use super::connection::{Link, Session, backoff};
use super::error::RabbitMqError;
use super::topology::{ChannelWatch, QueueSpec, declare_subscription};
use super::{DRIVER, Inner};
use crate::handler::{Dispatcher, Outcome};
use crate::message::Message;
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
                let _ = channel.close().await;
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
                                driver = DRIVER,
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
                                driver = DRIVER,
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
            match self.consume(current, &stop).await {
                Ended::Stopped => break,
                Ended::Lost => {}
            }
        }
        tracing::debug!(
            connection = %self.inner.name,
            driver = DRIVER,
            topic = %self.topic,
            "subscription stopped"
        );
    }

    async fn consume(&self, mut live: Live, stop: &CancellationToken) -> Ended {
        loop {
            let delivery = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Unacknowledged deliveries go back to the queue when the channel closes.
                    let _ = live.channel.close().await;
                    return Ended::Stopped;
                }
                _ = live.session.lost.cancelled() => return Ended::Lost,
                delivery = live.deliveries.recv() => delivery,
            };
            let Some(delivery) = delivery else {
                tracing::warn!(
                    connection = %self.inner.name,
                    driver = DRIVER,
                    topic = %self.topic,
                    queue = %live.queue,
                    "the consumer's channel closed"
                );
                return Ended::Lost;
            };
            if self.handle(&live, delivery, stop).await == Handled::Interrupted {
                let _ = live.channel.close().await;
                return Ended::Stopped;
            }
        }
    }

    /// Runs the handler on one delivery and acknowledges it as its outcome says.
    async fn handle(
        &self,
        live: &Live,
        delivery: ConsumerMessage,
        stop: &CancellationToken,
    ) -> Handled {
        let ConsumerMessage {
            deliver,
            basic_properties,
            content,
            ..
        } = delivery;
        let Some(deliver) = deliver else {
            return Handled::Done;
        };
        let tag = deliver.delivery_tag();
        let properties = basic_properties.unwrap_or_default();
        let message = codec::decode(&properties, content.unwrap_or_default());

        match self.dispatcher.dispatch(&message, stop).await {
            Outcome::Handled => {
                self.settle(live, tag, Settle::Ack).await;
                Handled::Done
            }
            Outcome::Failed { error, attempts } => {
                let dead = self
                    .dead_letter(live, &message, &error.to_string(), attempts)
                    .await;
                let settle = if dead { Settle::Ack } else { Settle::Reject };
                self.settle(live, tag, settle).await;
                Handled::Done
            }
            Outcome::Interrupted => {
                self.settle(live, tag, Settle::Requeue).await;
                Handled::Interrupted
            }
        }
    }

    /// Publishes the failed message, with its error headers, to the dead-letter exchange and
    /// waits for the confirm. `false` if that failed.
    async fn dead_letter(
        &self,
        live: &Live,
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
                live.session.publisher.publish(
                    &exchange,
                    &routing_key,
                    properties,
                    dead.body.to_vec(),
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(RabbitMqError::ConnectionLost {
                    address: live.session.address.clone(),
                })
            }),
            Err(error) => Err(error),
        };
        match published {
            Ok(()) => {
                tracing::warn!(
                    connection = %self.inner.name,
                    driver = DRIVER,
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
                    driver = DRIVER,
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

    async fn settle(&self, live: &Live, tag: u64, settle: Settle) {
        let result = match settle {
            Settle::Ack => {
                live.channel
                    .basic_ack(BasicAckArguments::new(tag, false))
                    .await
            }
            Settle::Reject => {
                live.channel
                    .basic_nack(BasicNackArguments::new(tag, false, false))
                    .await
            }
            Settle::Requeue => {
                live.channel
                    .basic_nack(BasicNackArguments::new(tag, false, true))
                    .await
            }
        };
        if let Err(error) = result {
            // The delivery stays unacknowledged, so the server delivers it again.
            tracing::warn!(
                connection = %self.inner.name,
                driver = DRIVER,
                topic = %self.topic,
                error = %error,
                "cannot acknowledge a delivery; it will be delivered again"
            );
        }
    }
}

enum Settle {
    Ack,
    /// `basic.nack` without requeue: the queue's dead-letter exchange takes it.
    Reject,
    Requeue,
}

/// Whether the consumer goes on after a delivery.
#[derive(PartialEq, Eq)]
enum Handled {
    Done,
    /// The subscription is stopping; the delivery went back to the queue.
    Interrupted,
}
