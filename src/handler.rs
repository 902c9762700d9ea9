//! Message handlers, and how drivers run them: inside the message's span, with panics caught,
//! retried with backoff, and dead-lettered when every attempt failed.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::Context;
use crate::error::BoxError;
use crate::message::Message;
use crate::propagation;

/// What a handler returns: `Ok` acknowledges the message, `Err` asks for a retry.
pub type HandlerResult = Result<(), BoxError>;

/// Processes delivered messages.
///
/// Any `async fn(Context, Message) -> Result<(), E>` with `E` convertible into a boxed error is a
/// handler. The context carries the message's trace id and runs inside a `tracing` span with the
/// `trace_id`, `connection`, `driver` and `topic` fields.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    fn call(&self, ctx: Context, message: Message) -> BoxFuture<'static, HandlerResult>;
}

impl<F, Fut, E> Handler for F
where
    F: Fn(Context, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn call(&self, ctx: Context, message: Message) -> BoxFuture<'static, HandlerResult> {
        let future = self(ctx, message);
        Box::pin(async move { future.await.map_err(Into::into) })
    }
}

/// A shared handler is a handler too, so one can serve several subscriptions.
impl Handler for Arc<dyn Handler> {
    fn call(&self, ctx: Context, message: Message) -> BoxFuture<'static, HandlerResult> {
        (**self).call(ctx, message)
    }
}

/// How often and how patiently a failed message is retried before it is dead-lettered.
///
/// In configuration this is the `retry` table of a connection, for example
/// `retry = { attempts = 5, initial_backoff = "200ms", max_backoff = "10s" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// How many times the handler runs for one message, the first time included (at least 1).
    pub attempts: u32,
    /// The wait before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How much the wait grows after each failed attempt.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The wait after the failed attempt number `attempt` (1 for the first).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.multiplier.max(1.0).powi(exponent);
        self.initial_backoff
            .mul_f64(factor.min(1e9))
            .min(self.max_backoff)
    }
}

/// Where the messages a [`Dispatcher`] handles come from, for its spans and logs.
#[derive(Debug, Clone)]
pub struct Source {
    /// The driver's name.
    pub driver: &'static str,
    /// The connection's name.
    pub connection: Arc<str>,
    /// The topic, subject or routing key subscribed to.
    pub topic: Arc<str>,
}

/// How handling one message ended.
#[derive(Debug)]
pub enum Outcome {
    /// The handler succeeded: acknowledge the message.
    Handled,
    /// Every attempt failed: dead-letter the message.
    Failed {
        /// The last attempt's error.
        error: BoxError,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The subscription is stopping and the message was not handled: leave it unacknowledged
    /// so the broker delivers it again.
    Interrupted,
}

/// Runs a subscription's handler on delivered messages.
#[derive(Clone)]
pub struct Dispatcher {
    handler: Arc<dyn Handler>,
    retry: RetryPolicy,
    source: Source,
}

impl Dispatcher {
    /// A dispatcher for messages from `source`.
    pub fn new(handler: Arc<dyn Handler>, retry: RetryPolicy, source: Source) -> Self {
        Dispatcher {
            handler,
            retry,
            source,
        }
    }

    /// Where the messages come from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Runs the handler once, in the message's context and span; a panic becomes an error.
    ///
    /// Drivers whose broker redelivers by itself (with its own delay) call this once per
    /// delivery; the others call [`Dispatcher::dispatch`].
    pub async fn attempt(&self, message: Message, attempt: u32) -> HandlerResult {
        let ctx = propagation::extract(&message);
        let span = propagation::handler_span(&ctx, &self.source, &message.id);
        let handled = AssertUnwindSafe(self.handler.call(ctx, message))
            .catch_unwind()
            .instrument(span.clone())
            .await;

        let result = match handled {
            Ok(result) => result,
            Err(panic) => Err(BoxError::from(format!(
                "the handler panicked: {}",
                panic_text(panic.as_ref())
            ))),
        };
        if let Err(error) = &result {
            span.in_scope(|| tracing::warn!(attempt, error = %error, "handler failed"));
        }
        result
    }

    /// Runs the handler until it succeeds or the retry policy gives up, waiting between
    /// attempts. A stop requested while waiting interrupts the retries.
    ///
    /// `delivered` makes the message for each attempt, because the handler takes it and a
    /// retry needs it again. A driver that rebuilds it from what the broker delivered copies
    /// nothing when the first attempt succeeds, as nearly every attempt does.
    pub async fn dispatch<F>(&self, delivered: F, stop: &CancellationToken) -> Outcome
    where
        F: Fn() -> Message + Sync,
    {
        match self.attempt(delivered(), 1).await {
            Ok(()) => Outcome::Handled,
            // Boxed: the retries' timer would otherwise weigh on every message's future.
            Err(error) => Box::pin(self.retry_after(&delivered, error, stop)).await,
        }
    }

    /// The attempts after a failed first one, as [`Dispatcher::dispatch`] makes them. A driver
    /// that runs the first attempt itself, with a message it can build only once, calls this
    /// with the first attempt's error and another way to build the message.
    pub(crate) async fn retry_after(
        &self,
        delivered: &(dyn Fn() -> Message + Sync),
        mut error: BoxError,
        stop: &CancellationToken,
    ) -> Outcome {
        let mut attempt = 1;
        loop {
            if attempt >= self.retry.attempts.max(1) {
                return Outcome::Failed {
                    error,
                    attempts: attempt,
                };
            }

            let delay = self.retry.backoff(attempt);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Outcome::Interrupted,
                _ = tokio::time::sleep(delay) => {}
            }
            attempt += 1;

            error = match self.attempt(delivered(), attempt).await {
                Ok(()) => return Outcome::Handled,
                Err(error) => error,
            };
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "no message"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shared_handler_is_a_handler() {
        fn handle_with(
            handler: impl Handler,
            message: Message,
        ) -> BoxFuture<'static, HandlerResult> {
            handler.call(Context::new(), message)
        }
        let shared: Arc<dyn Handler> = Arc::new(|_: Context, message: Message| async move {
            if message.body.is_empty() {
                Err(BoxError::from("empty"))
            } else {
                Ok(())
            }
        });

        assert!(
            handle_with(Arc::clone(&shared), Message::new("x"))
                .await
                .is_ok()
        );
        assert!(handle_with(shared, Message::new("")).await.is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            multiplier: 2.0,
        };

        assert_eq!(policy.backoff(1), Duration::from_millis(100));
        assert_eq!(policy.backoff(2), Duration::from_millis(200));
        assert_eq!(policy.backoff(3), Duration::from_millis(350));
        assert_eq!(policy.backoff(40), Duration::from_millis(350));
    }
}
