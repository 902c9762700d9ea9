//! One async interface to Apache Kafka, RabbitMQ and NATS, in pure Rust.
//!
//! A [`Manager`] owns every named connection of a TOML configuration and hands out
//! [`Provider`]s by name. Every driver implements the same four operations — [`publish`],
//! [`subscribe`], [`ping`] and [`close`] — on the same [`Message`].
//!
//! ```
//! use broker::{Context, Manager, Message, ProviderExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker::Error> {
//! let manager = Manager::from_toml(r#"
//!     [brokers.events]
//!     driver = "memory"
//! "#).await?;
//! let events = manager.get("events")?;
//!
//! // The handler runs inside a span that carries the publisher's request id as `trace_id`.
//! let subscription = events
//!     .subscribe_fn(&Context::new(), "orders", |ctx: Context, message: Message| async move {
//!         tracing::info!(trace_id = ctx.trace_id(), bytes = message.body.len(), "order");
//!         Ok::<(), std::io::Error>(())
//!     })
//!     .await?;
//!
//! let ctx = Context::from_request_id("request-42");
//! events.publish(&ctx, "orders", Message::new("one order")).await?;
//!
//! subscription.stop().await;
//! manager.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Drivers
//!
//! | driver | module | Cargo feature | native client (the escape hatch) |
//! |---|---|---|---|
//! | `kafka` | `kafka` | `kafka` | rskafka's `Client` |
//! | `rabbitmq` | `rabbitmq` | `rabbitmq` | amqprs's `Connection` and `Channel` |
//! | `nats` | `nats` | `nats` | async-nats's `Client` and JetStream context |
//! | `memory` | [`memory`] | always built | none: topics live in this process |
//!
//! The three network drivers are on by default; turn off default features and pick the ones
//! a service uses to compile only those. [`Manager::get_as`] (or
//! [`downcast`](Provider#method.downcast) on a provider) gives the concrete driver type.
//!
//! # Delivery
//!
//! A handler's `Ok` acknowledges its message. An `Err` (or a panic) is retried with backoff as
//! the connection's `retry` table says, then the message is dead-lettered where the driver can.
//! Each driver's module documents how it maps topics, headers and acknowledgements onto its
//! broker and which guarantees follow.
//!
//! # Tracing
//!
//! [`Provider::publish`] writes the context's request id into the `trace_id` header. A
//! subscriber reads it back, gives the handler a [`Context`] with it as request and trace id,
//! and runs the handler in a `handle` span with `trace_id`, `connection`, `driver` and `topic`
//! fields.
//!
//! [`publish`]: Provider::publish
//! [`subscribe`]: Provider::subscribe
//! [`ping`]: Provider::ping
//! [`close`]: Provider::close

pub mod config;
mod context;
mod error;
mod handler;
#[cfg(feature = "kafka")]
pub mod kafka;
mod manager;
pub mod memory;
mod message;
#[cfg(feature = "nats")]
pub mod nats;
pub mod propagation;
mod provider;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
mod subscription;
#[cfg(any(feature = "kafka", feature = "rabbitmq", feature = "nats"))]
mod tls;

pub use config::{Config, ConfigError, ConfigErrorKind};
pub use context::Context;
pub use error::{BoxError, Error, Operation, Origin, Result, Stop};
pub use handler::{Dispatcher, Handler, HandlerResult, Outcome, RetryPolicy, Source};
pub use manager::{DEFAULT_CONNECT_TIMEOUT, Manager};
pub use memory::MemoryProvider;
pub use message::{Headers, Message};
pub use provider::{AsAny, Provider, ProviderExt, SubscribeOptions};
pub use subscription::{Subscription, Subscriptions};

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
