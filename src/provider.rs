//! The `Provider` trait every driver implements, and the typed way back to a concrete driver.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::context::Context;
use crate::error::Result;
use crate::handler::Handler;
use crate::message::Message;
use crate::subscription::Subscription;

/// What a subscription asks for besides its topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// The consumer group. Subscriptions of one group share its messages, each message going
    /// to one of them; every group gets every message. `None` takes the connection's
    /// configured group (Kafka's `group_id`), or else makes an independent subscriber that
    /// gets every message.
    pub group: Option<String>,
}

impl SubscribeOptions {
    /// Options for a member of the consumer group `group`.
    pub fn group(group: impl Into<String>) -> Self {
        SubscribeOptions {
            group: Some(group.into()),
        }
    }
}

/// A connection to one broker, behind one interface for every driver.
///
/// Providers are shared as `Arc<dyn Provider>`. `Display` names the driver, the connection and
/// its address, for example `kafka(user_events: localhost:9092)`, never a secret.
#[async_trait]
pub trait Provider: AsAny + fmt::Display + fmt::Debug {
    /// The driver's name: `kafka`, `rabbitmq`, `nats` or `memory`.
    fn driver(&self) -> &'static str;

    /// The connection's name in the configuration.
    fn name(&self) -> &str;

    /// Publishes `message` to `topic` and returns once the broker has taken responsibility for
    /// it (acknowledged, confirmed or flushed, as the driver's docs say).
    ///
    /// The context's request id goes into the `trace_id` header unless the message has one.
    async fn publish(&self, ctx: &Context, topic: &str, message: Message) -> Result<()>;

    /// Subscribes `handler` to `topic` and returns once the subscription is live at the
    /// broker, so a message published after this returns is delivered.
    ///
    /// The subscription runs until its handle is stopped or dropped, `ctx` is cancelled or
    /// past its deadline, or the provider is closed; then in-flight handlers finish and their
    /// acknowledgements are sent before it ends.
    async fn subscribe(
        &self,
        ctx: &Context,
        topic: &str,
        options: SubscribeOptions,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription>;

    /// Checks that the broker answers.
    async fn ping(&self, ctx: &Context) -> Result<()>;

    /// Stops every subscription (letting in-flight handlers finish), then closes the
    /// connection. Later operations fail with [`Error::Closed`](crate::Error::Closed).
    async fn close(&self) -> Result<()>;
}

impl dyn Provider {
    /// The concrete driver behind this provider, if it is a `T`.
    pub fn downcast_ref<T: Provider>(&self) -> Option<&T> {
        <dyn Provider as AsAny>::as_any(self).downcast_ref()
    }

    /// The concrete driver behind a shared provider, or the provider back if it is not a `T`.
    pub fn downcast<T: Provider>(self: Arc<Self>) -> Result<Arc<T>, Arc<Self>> {
        // Called through the trait by name: `Arc<dyn Provider>` is itself `Any`, and method
        // syntax would pick the `Arc` instead of the driver inside it.
        if <dyn Provider as AsAny>::as_any(&*self).is::<T>() {
            Ok(<dyn Provider as AsAny>::into_any(self)
                .downcast()
                .unwrap_or_else(|_| unreachable!("the type was checked above")))
        } else {
            Err(self)
        }
    }
}

/// Conversion to [`Any`], implemented for every provider so it can be downcast.
pub trait AsAny: Any + Send + Sync {
    /// This value as `&dyn Any`.
    fn as_any(&self) -> &dyn Any;

    /// This shared value as `Arc<dyn Any>`.
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: Any + Send + Sync> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// Conveniences over [`Provider`] for handlers written as closures.
#[async_trait]
pub trait ProviderExt: Provider {
    /// Subscribes `handler` to `topic` with default options (see [`SubscribeOptions`]).
    async fn subscribe_fn<H: Handler>(
        &self,
        ctx: &Context,
        topic: &str,
        handler: H,
    ) -> Result<Subscription> {
        self.subscribe(ctx, topic, SubscribeOptions::default(), Arc::new(handler))
            .await
    }

    /// Subscribes `handler` to `topic` as a member of the consumer group `group`.
    async fn subscribe_group_fn<H: Handler>(
        &self,
        ctx: &Context,
        topic: &str,
        group: &str,
        handler: H,
    ) -> Result<Subscription> {
        self.subscribe(
            ctx,
            topic,
            SubscribeOptions::group(group),
            Arc::new(handler),
        )
        .await
    }
}

impl<P: Provider + ?Sized> ProviderExt for P {}
