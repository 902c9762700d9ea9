//! Exchanges, queues and bindings: what is declared, and how a refusal is reported.
//!
//! A server that refuses a declaration (say, an exchange that exists with another type) closes
//! the channel, and the client only sees its pending request fail. So every channel used for
//! declarations carries a [`ChannelWatch`] that keeps the server's reply code and text, and
//! the error is built from those.

use std::sync::{Arc, Mutex, PoisonError};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    Channel, ExchangeDeclareArguments, ExchangeType, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use async_trait::async_trait;

use super::DRIVER;
use super::codec::check_short;
use super::error::RabbitMqError;
use crate::config::{ExchangeKind, RabbitMqConfig};

/// Why the server closed a channel, once it has.
#[derive(Clone, Default)]
pub(super) struct ChannelWatch {
    closed: Arc<Mutex<Option<(u16, String)>>>,
}

impl ChannelWatch {
    /// Registers a watch on `channel`.
    pub(super) async fn register(channel: &Channel) -> Result<Self, RabbitMqError> {
        let watch = ChannelWatch::default();
        channel.register_callback(watch.clone()).await?;
        Ok(watch)
    }

    /// The server's reply code and text, if it closed the channel.
    pub(super) fn closed(&self) -> Option<(u16, String)> {
        self.closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The error for a failed declaration of `kind` `name`: the server's reason when it gave
    /// one, else the client's error.
    pub(super) fn explain(
        &self,
        error: amqprs::error::Error,
        kind: &'static str,
        name: &str,
    ) -> RabbitMqError {
        match self.closed() {
            Some((code, text)) => RabbitMqError::from_close(code, &text, kind, name),
            None => RabbitMqError::Client(error),
        }
    }
}

#[async_trait]
impl ChannelCallback for ChannelWatch {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        tracing::debug!(
            driver = %DRIVER,
            code = close.reply_code(),
            text = %close.reply_text(),
            "the server closed a channel"
        );
        *self.closed.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((close.reply_code(), close.reply_text().clone()));
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        tracing::warn!(
            driver = %DRIVER,
            consumer_tag = %cancel.consumer_tag(),
            "the server cancelled a consumer"
        );
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        _active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(true)
    }

    async fn publish_ack(&mut self, _channel: &Channel, _ack: Ack) {}

    async fn publish_nack(&mut self, _channel: &Channel, _nack: Nack) {}

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        _ret: Return,
        _properties: BasicProperties,
        _content: Vec<u8>,
    ) {
    }
}

/// Declares the configured exchange (durable, of the configured type) and the dead-letter
/// exchange (durable, topic).
pub(super) async fn declare_exchanges(
    channel: &Channel,
    watch: &ChannelWatch,
    config: &RabbitMqConfig,
) -> Result<(), RabbitMqError> {
    let kind = match config.exchange_type {
        ExchangeKind::Topic => ExchangeType::Topic,
        ExchangeKind::Direct => ExchangeType::Direct,
        ExchangeKind::Fanout => ExchangeType::Fanout,
    };
    declare_exchange(channel, watch, &config.exchange, kind).await?;
    declare_exchange(
        channel,
        watch,
        &config.dead_letter_exchange_name(),
        ExchangeType::Topic,
    )
    .await
}

async fn declare_exchange(
    channel: &Channel,
    watch: &ChannelWatch,
    name: &str,
    kind: ExchangeType,
) -> Result<(), RabbitMqError> {
    check_short("an exchange name", name)?;
    let args = ExchangeDeclareArguments::of_type(name, kind)
        .durable(true)
        .finish();
    channel
        .exchange_declare(args)
        .await
        .map_err(|error| watch.explain(error, "exchange", name))
}

/// Which queue a subscription reads.
pub(super) enum QueueSpec {
    /// The durable queue of a consumer group.
    Group(String),
    /// A private, exclusive queue named by the server.
    Private,
}

/// Declares a subscription's queue, binds it to the exchange with `topic`, and, when
/// `dead_letter_queue` is on, declares the durable queue named after the topic's dead-letter
/// topic, bound to the dead-letter exchange. Returns the queue's name.
pub(super) async fn declare_subscription(
    channel: &Channel,
    watch: &ChannelWatch,
    config: &RabbitMqConfig,
    topic: &str,
    queue: &QueueSpec,
) -> Result<String, RabbitMqError> {
    let dead_letter_exchange = config.dead_letter_exchange_name();
    let dead_letter_topic = config.dead_letter_topic_for(topic);
    check_short("a dead-letter topic", &dead_letter_topic)?;
    let mut arguments = FieldTable::new();
    for (key, value) in [
        ("x-dead-letter-exchange", &dead_letter_exchange),
        ("x-dead-letter-routing-key", &dead_letter_topic),
    ] {
        if let (Ok(key), Ok(value)) = (key.try_into(), value.as_str().try_into()) {
            arguments.insert(key, FieldValue::S(value));
        }
    }

    let declare = match queue {
        QueueSpec::Group(name) => {
            check_short("a queue name", name)?;
            let expires = u32::try_from(config.queue_expires.as_millis()).unwrap_or(u32::MAX);
            if expires > 0
                && let Ok(key) = "x-expires".try_into()
            {
                arguments.insert(key, FieldValue::l(i64::from(expires)));
            }
            QueueDeclareArguments::durable_client_named(name)
                .arguments(arguments)
                .finish()
        }
        QueueSpec::Private => QueueDeclareArguments::exclusive_server_named()
            .auto_delete(true)
            .arguments(arguments)
            .finish(),
    };
    let wanted = match queue {
        QueueSpec::Group(name) => name.as_str(),
        QueueSpec::Private => "(server-named)",
    };
    let declared = channel
        .queue_declare(declare)
        .await
        .map_err(|error| watch.explain(error, "queue", wanted))?;
    let Some((name, _, _)) = declared else {
        return Err(RabbitMqError::ChannelClosed {
            code: 0,
            text: "the server did not answer the queue declaration".to_owned(),
        });
    };
    channel
        .queue_bind(QueueBindArguments::new(&name, &config.exchange, topic))
        .await
        .map_err(|error| watch.explain(error, "queue", &name))?;

    if config.dead_letter_queue {
        channel
            .queue_declare(QueueDeclareArguments::durable_client_named(
                &dead_letter_topic,
            ))
            .await
            .map_err(|error| watch.explain(error, "queue", &dead_letter_topic))?;
        channel
            .queue_bind(QueueBindArguments::new(
                &dead_letter_topic,
                &dead_letter_exchange,
                &dead_letter_topic,
            ))
            .await
            .map_err(|error| watch.explain(error, "queue", &dead_letter_topic))?;
    }
    Ok(name)
}
