//! Core NATS: flushed publishes and plain or queue-group subscriptions, at most once.

use std::cell::RefCell;
use std::sync::Arc;

use async_nats::{Client, HeaderMap, Subject, Subscriber};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{DEAD_LETTER_TIMEOUT, DRIVER, DeadLetter, Shared, codec};
use crate::error::{BoxError, Error, Operation, Result};
use crate::handler::{Dispatcher, Outcome};
use crate::message::{Fallback, Message};
use crate::propagation;

thread_local! {
    /// The subject this thread published to last.
    static LAST_SUBJECT: RefCell<Option<Subject>> = const { RefCell::new(None) };
}

/// `topic` as the client's subject. The client copies a subject given as text into one of its
/// own on every publish; publishes to the subject a thread published to before share its
/// bytes instead, with a reference count.
pub(super) fn shared_subject(topic: &str) -> Subject {
    LAST_SUBJECT.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some(subject) if subject.as_str() == topic => subject.clone(),
            _ => {
                let subject = Subject::from(topic);
                *last = Some(subject.clone());
                subject
            }
        }
    })
}

/// Sends a message and waits until the client has flushed it to the server.
pub(super) async fn publish(
    client: &Client,
    subject: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(), BoxError> {
    client
        .publish_with_headers(shared_subject(subject), headers, body)
        .await?;
    client.flush().await?;
    Ok(())
}

/// Sends a message to a fresh inbox of this client and waits until the server delivered it
/// back: a round trip through the server, after everything sent before it.
pub(super) async fn round_trip(client: &Client) -> Result<(), BoxError> {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, Bytes::new()).await?;
    client.flush().await?;
    let came_back = echo.next().await;
    // Best effort: the subscription ends with the client anyway.
    let _ = echo.unsubscribe().await;
    match came_back {
        Some(_) => Ok(()),
        None => Err("the connection closed before the server answered".into()),
    }
}

/// One core subscription.
pub(super) struct Consumer {
    shared: Arc<Shared>,
    topic: String,
    subscriber: Subscriber,
    dispatcher: Dispatcher,
}

impl Consumer {
    /// Subscribes to `topic`, in the queue group `group` if there is one, and returns once the
    /// server has the subscription.
    pub(super) async fn start(
        shared: &Arc<Shared>,
        topic: &str,
        group: Option<&str>,
        dispatcher: Dispatcher,
    ) -> Result<Consumer> {
        let origin = || shared.origin(Operation::Subscribe, topic);
        let subscribed = match group {
            Some(group) => {
                shared
                    .client
                    .queue_subscribe(topic.to_owned(), group.to_owned())
                    .await
            }
            None => shared.client.subscribe(topic.to_owned()).await,
        };
        let subscriber = subscribed.map_err(|error| Error::broker(origin(), error))?;

        // The server handles a connection's operations in order: once a message of ours has
        // come back, it has the subscription too.
        round_trip(&shared.client)
            .await
            .map_err(|error| Error::broker(origin(), error))?;

        Ok(Consumer {
            shared: Arc::clone(shared),
            topic: topic.to_owned(),
            subscriber,
            dispatcher,
        })
    }

    /// Handles messages one at a time until `stop` fires.
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
            let delivered = tokio::select! {
                biased;
                delivered = self.subscriber.next() => match delivered {
                    Some(delivered) => delivered,
                    None => break,
                },
                _ = &mut stopped => break,
            };
            let subject = delivered.subject;
            let fallback = Fallback::default();
            let message = || {
                codec::decode(
                    delivered.headers.as_ref(),
                    delivered.payload.clone(),
                    || fallback.id(),
                    || fallback.time(),
                )
            };

            match self.dispatcher.dispatch(message, &stop).await {
                Outcome::Handled => {}
                Outcome::Failed { error, attempts } => {
                    // Boxed: dead-lettering is rare, and its publish would otherwise weigh on
                    // every message's future.
                    Box::pin(self.dead_letter(&subject, &message(), &error.to_string(), attempts))
                        .await;
                }
                Outcome::Interrupted => {
                    let message = message();
                    tracing::warn!(
                        connection = %self.shared.name,
                        driver = %DRIVER,
                        topic = %self.topic,
                        message_id = %message.id,
                        trace_id = message.trace_id().unwrap_or_default(),
                        "subscription stopped while retrying: core NATS cannot redeliver, \
                         the message is dropped"
                    );
                    break;
                }
            }
        }
        self.leave().await;
    }

    /// Publishes a message from `subject` every attempt failed on to the dead-letter subject,
    /// and logs it.
    async fn dead_letter(&self, subject: &str, message: &Message, error: &str, attempts: u32) {
        let trace_id = message.trace_id().unwrap_or_default();
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
                    "handler failed on every attempt: message dropped"
                );
                return;
            }
        };

        let dead = propagation::dead_letter(message, subject, error, attempts);
        let sent = match codec::encode_dead_letter(&dead) {
            Ok(headers) => tokio::time::timeout(
                DEAD_LETTER_TIMEOUT,
                publish(&self.shared.client, &target, headers, dead.body.clone()),
            )
            .await
            .unwrap_or_else(|_| Err("timed out".into())),
            Err(reason) => Err(reason.into()),
        };
        match sent {
            Ok(()) => tracing::error!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                dead_letter_subject = %target,
                message_id = %message.id,
                trace_id,
                attempts,
                error,
                "handler failed on every attempt: message dead-lettered"
            ),
            Err(publish_error) => tracing::error!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                dead_letter_subject = %target,
                message_id = %message.id,
                trace_id,
                attempts,
                error,
                publish_error = %publish_error,
                "handler failed on every attempt and dead-lettering failed: message dropped"
            ),
        }
    }

    /// Unsubscribes, and counts the messages that arrived but were not handled.
    async fn leave(mut self) {
        if let Err(error) = self.subscriber.unsubscribe().await {
            tracing::debug!(connection = %self.shared.name, error = %error, "unsubscribe failed");
        }
        let mut dropped = 0_usize;
        while let Some(Some(_)) = self.subscriber.next().now_or_never() {
            dropped += 1;
        }
        if dropped > 0 {
            tracing::warn!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                dropped,
                "subscription stopped with messages not yet handled: core NATS cannot \
                 redeliver, they are dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_the_topics_given() {
        for topic in [
            "orders.created",
            "orders.created",
            "orders.paid",
            "orders.created",
        ] {
            assert_eq!(shared_subject(topic).as_str(), topic);
        }
    }
}
