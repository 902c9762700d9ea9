//! Publishing with publisher confirms: one channel, many publishes in flight.
//!
//! In confirm mode the server numbers the messages of a channel 1, 2, 3… and acknowledges them
//! by that delivery tag, sometimes several at once (`multiple`). The client hands those acks to
//! a channel callback only, so the [`Publisher`] keeps its own count and a map from delivery
//! tag to the publisher waiting for it. One task per channel takes the messages in the order
//! they were queued, numbers them and hands them to the client, so tags and the order of
//! messages on the wire agree without publishers taking turns on a lock. An unroutable message
//! published as `mandatory` comes back as a `basic.return` just before its ack; the return
//! carries no tag, so it is matched to the oldest waiting message with the same message id.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::DRIVER;
use super::error::RabbitMqError;

/// How the server answered one publish.
#[derive(Debug)]
enum Confirm {
    Ack,
    Nack,
    Returned { text: String },
    Closed { code: u16, text: String },
}

struct Waiter {
    message_id: String,
    returned: Option<String>,
    answer: oneshot::Sender<Confirm>,
}

impl Waiter {
    /// Tells the publisher how the server answered: `acked` or not.
    fn answer(self, acked: bool) {
        let confirm = match (acked, self.returned) {
            (false, _) => Confirm::Nack,
            (true, Some(text)) => Confirm::Returned { text },
            (true, None) => Confirm::Ack,
        };
        // The publisher may have given up (its context stopped); nobody to tell then.
        let _ = self.answer.send(confirm);
    }
}

#[derive(Default)]
struct Pending {
    waiting: BTreeMap<u64, Waiter>,
    /// Why the channel closed, once it has.
    closed: Option<(u16, String)>,
}

/// One message queued for the sending task.
struct Outgoing {
    args: BasicPublishArguments,
    properties: BasicProperties,
    body: Vec<u8>,
    answer: oneshot::Sender<Confirm>,
}

/// A message handed to the sending task, whose confirm is still to come; without a receiver
/// when the task had already stopped.
pub(super) struct Sent(Option<oneshot::Receiver<Confirm>>);

/// The publishing channel of one connection.
pub(super) struct Publisher {
    channel: Channel,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    pending: Arc<Mutex<Pending>>,
    address: String,
}

impl Publisher {
    /// Sets up `channel` for publishing, in confirm mode when `confirms` is on, and starts its
    /// sending task. A server that closes the channel fires `lost`; once `lost` fires the task
    /// stops and every publish still waiting fails.
    pub(super) async fn new(
        channel: Channel,
        confirms: bool,
        lost: CancellationToken,
        address: String,
    ) -> Result<Self, RabbitMqError> {
        let pending = Arc::new(Mutex::new(Pending::default()));
        channel
            .register_callback(ConfirmCallback {
                pending: Arc::clone(&pending),
                lost: lost.clone(),
            })
            .await?;
        if confirms {
            channel
                .confirm_select(ConfirmSelectArguments::new(false))
                .await?;
        }

        let (outgoing, queued) = mpsc::unbounded_channel();
        let task = SendTask {
            channel: channel.clone(),
            confirms,
            pending: Arc::clone(&pending),
            lost,
        };
        tokio::spawn(task.run(queued));
        Ok(Publisher {
            channel,
            outgoing,
            pending,
            address,
        })
    }

    /// The channel, for closing it.
    pub(super) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Queues one message, as `mandatory`, for the sending task. Wait for its confirm with
    /// [`Publisher::confirmed`].
    ///
    /// Queueing does not wait, so a publish holds little while it waits for its confirm, and
    /// the messages of many publishes reach the client in one go.
    pub(super) fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Sent {
        let (answer, confirm) = oneshot::channel();
        let args = BasicPublishArguments {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            mandatory: true,
            immediate: false,
        };
        let outgoing = Outgoing {
            args,
            properties,
            body,
            answer,
        };
        Sent(self.outgoing.send(outgoing).ok().map(|()| confirm))
    }

    /// Waits for the server's confirm of a message [`Publisher::send`] queued to `exchange`
    /// with `routing_key` (or for it to be written, when confirms are off).
    ///
    /// Dropping the future gives up waiting; a message that was not sent yet is then not sent.
    pub(super) async fn confirmed(
        &self,
        sent: Sent,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), RabbitMqError> {
        let Some(confirm) = sent.0 else {
            return Err(self.lost_error());
        };
        match confirm.await {
            Ok(Confirm::Ack) => Ok(()),
            Ok(Confirm::Nack) => Err(RabbitMqError::Nacked),
            Ok(Confirm::Returned { text }) => Err(RabbitMqError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                detail: text,
            }),
            Ok(Confirm::Closed { code, text }) => Err(RabbitMqError::ChannelClosed { code, text }),
            // The sending task dropped the message: the channel or its connection is gone.
            Err(_) => Err(self.lost_error()),
        }
    }

    /// Publishes one message as `mandatory` and waits for its confirm (when confirms are on).
    pub(super) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> Result<(), RabbitMqError> {
        let sent = self.send(exchange, routing_key, properties, body);
        self.confirmed(sent, exchange, routing_key).await
    }

    fn lost_error(&self) -> RabbitMqError {
        match lock(&self.pending).closed.clone() {
            Some((code, text)) => RabbitMqError::ChannelClosed { code, text },
            None => RabbitMqError::ConnectionLost {
                address: self.address.clone(),
            },
        }
    }
}

/// The sending task of one publishing channel: numbers the queued messages and hands them to
/// the client in that order.
struct SendTask {
    channel: Channel,
    confirms: bool,
    pending: Arc<Mutex<Pending>>,
    lost: CancellationToken,
}

impl SendTask {
    async fn run(self, mut queued: mpsc::UnboundedReceiver<Outgoing>) {
        // One wait for the loss, polled only when nothing else is ready: registering a new one
        // for every message would cost more than sending it.
        let lost = self.lost.cancelled();
        tokio::pin!(lost);
        let mut next_tag: u64 = 1;
        loop {
            let message = tokio::select! {
                biased;
                message = queued.recv() => match message {
                    Some(message) => message,
                    // The publisher is gone, and with it the session.
                    None => break,
                },
                _ = &mut lost => break,
            };
            // Its publisher stopped waiting (its context ended): it is not sent at all.
            if message.answer.is_closed() {
                continue;
            }
            // The server may have closed the channel while messages were queued: sending on
            // would reach a channel that is no longer open.
            if self.lost.is_cancelled() {
                break;
            }

            let tag = next_tag;
            let answer = if self.confirms {
                let message_id = message.properties.message_id().cloned().unwrap_or_default();
                lock(&self.pending).waiting.insert(
                    tag,
                    Waiter {
                        message_id,
                        returned: None,
                        answer: message.answer,
                    },
                );
                None
            } else {
                Some(message.answer)
            };
            let sent = tokio::select! {
                biased;
                sent = self
                    .channel
                    .basic_publish(message.properties, message.body, message.args) => sent,
                _ = &mut lost => break,
            };
            if let Err(error) = sent {
                // Not sent: its publisher sees the connection lost and sends it again on the
                // next one.
                lock(&self.pending).waiting.remove(&tag);
                tracing::debug!(
                    driver = %DRIVER,
                    error = %error,
                    "cannot hand a message to the client"
                );
                self.lost.cancel();
                break;
            }
            next_tag += 1;
            if let Some(answer) = answer {
                let _ = answer.send(Confirm::Ack);
            }
        }

        // No confirm can come on this channel any more: the messages waiting for one, and
        // those still queued, fail with the loss of the channel or of its connection.
        queued.close();
        let waiting = std::mem::take(&mut lock(&self.pending).waiting);
        drop(waiting);
    }
}

fn lock(pending: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    // Every change is a single insert or remove, so a panic elsewhere leaves it consistent.
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Feeds the channel's confirms, returns and close to the waiting publishers.
struct ConfirmCallback {
    pending: Arc<Mutex<Pending>>,
    lost: CancellationToken,
}

impl ConfirmCallback {
    /// Answers the publish with `tag`, or every publish up to it when `multiple`.
    fn settle(&self, tag: u64, multiple: bool, acked: bool) {
        let mut pending = lock(&self.pending);
        if multiple {
            let later = pending.waiting.split_off(&(tag.saturating_add(1)));
            let settled = std::mem::replace(&mut pending.waiting, later);
            drop(pending);
            for waiter in settled.into_values() {
                waiter.answer(acked);
            }
        } else if let Some(waiter) = pending.waiting.remove(&tag) {
            drop(pending);
            waiter.answer(acked);
        }
    }
}

#[async_trait]
impl ChannelCallback for ConfirmCallback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        let code = close.reply_code();
        let text = close.reply_text().clone();
        tracing::warn!(driver = %DRIVER, code, text = %text, "the server closed the publishing channel");

        let waiting = {
            let mut pending = lock(&self.pending);
            pending.closed = Some((code, text.clone()));
            std::mem::take(&mut pending.waiting)
        };
        for waiter in waiting.into_values() {
            let _ = waiter.answer.send(Confirm::Closed {
                code,
                text: text.clone(),
            });
        }
        self.lost.cancel();
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        tracing::info!(
            driver = %DRIVER,
            active,
            "the server asked to pause or resume publishing"
        );
        Ok(true)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        self.settle(ack.delivery_tag(), ack.mutiple(), true);
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        self.settle(nack.delivery_tag(), nack.multiple(), false);
    }

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: Return,
        properties: BasicProperties,
        _content: Vec<u8>,
    ) {
        let message_id = properties.message_id().cloned().unwrap_or_default();
        let mut pending = lock(&self.pending);
        let waiter = pending
            .waiting
            .values_mut()
            .find(|waiter| waiter.returned.is_none() && waiter.message_id == message_id);
        match waiter {
            Some(waiter) => {
                waiter.returned = Some(ret.reply_text().clone());
            }
            None => tracing::warn!(
                driver = %DRIVER,
                exchange = %ret.exchange(),
                routing_key = %ret.routing_key(),
                message_id = %message_id,
                reason = %ret.reply_text(),
                "the server returned an unroutable message"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(tags: &[u64]) -> (ConfirmCallback, Vec<oneshot::Receiver<Confirm>>) {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let mut receivers = Vec::new();
        for &tag in tags {
            let (sender, receiver) = oneshot::channel();
            lock(&pending).waiting.insert(
                tag,
                Waiter {
                    message_id: format!("m{tag}"),
                    returned: None,
                    answer: sender,
                },
            );
            receivers.push(receiver);
        }
        let callback = ConfirmCallback {
            pending,
            lost: CancellationToken::new(),
        };
        (callback, receivers)
    }

    #[test]
    fn a_multiple_ack_settles_every_earlier_tag() {
        let (callback, mut receivers) = waiting(&[1, 2, 3, 4]);

        callback.settle(3, true, true);

        for receiver in &mut receivers[..3] {
            assert!(matches!(receiver.try_recv(), Ok(Confirm::Ack)));
        }
        assert!(receivers[3].try_recv().is_err());
        assert_eq!(lock(&callback.pending).waiting.len(), 1);
    }

    #[test]
    fn a_single_nack_settles_only_its_tag() {
        let (callback, mut receivers) = waiting(&[1, 2]);

        callback.settle(2, false, false);

        assert!(receivers[0].try_recv().is_err());
        assert!(matches!(receivers[1].try_recv(), Ok(Confirm::Nack)));
    }

    #[test]
    fn a_returned_message_is_reported_when_its_ack_arrives() {
        let (callback, mut receivers) = waiting(&[7]);
        if let Some(waiter) = lock(&callback.pending).waiting.get_mut(&7) {
            waiter.returned = Some("NO_ROUTE".to_owned());
        }

        callback.settle(7, false, true);

        assert!(matches!(
            receivers[0].try_recv(),
            Ok(Confirm::Returned { text }) if text == "NO_ROUTE"
        ));
    }
}
