//! The in-process driver: topics inside this process, with the semantics of the real drivers.
//!
//! - **Topics and groups.** A topic delivers each message to every consumer group subscribed to
//!   it; within a group, each message goes to one member (competing consumers). A subscription
//!   without a group is a group of its own.
//! - **Retention.** A message published to a topic nobody subscribes to is dropped, as in core
//!   NATS or an unbound RabbitMQ exchange. A named group keeps its queue when its last member
//!   leaves, like a durable queue, so messages wait for the next member.
//! - **Flow control.** Each group holds at most `buffer` messages; `publish` waits for room, up
//!   to the context's deadline.
//! - **Acks.** A message is done when its handler returns `Ok`. A failing handler is retried
//!   with the connection's `retry` policy, then the message is published to the dead-letter
//!   topic (`{topic}.dlq` by default) with the error and attempt count in its headers. A message
//!   whose retries were cut short by a stopping subscription goes back to its group's queue.
//! - **Durability.** None: everything lives in this process and is gone when it exits.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_channel::{Receiver, Sender};
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::config::MemoryConfig;
use crate::context::{Context, new_id};
use crate::error::{Operation, Origin, Result};
use crate::handler::{Dispatcher, Handler, Outcome, Source};
use crate::message::Message;
use crate::propagation;
use crate::provider::{Provider, SubscribeOptions};
use crate::subscription::{Subscription, Subscriptions};

const DRIVER: &str = "memory";

/// How long dead-lettering waits for room in the dead-letter topic's groups.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);

/// The in-process driver.
pub struct MemoryProvider {
    shared: Arc<Shared>,
    config: MemoryConfig,
    subscriptions: Subscriptions,
}

struct Shared {
    name: String,
    topics: Mutex<HashMap<String, Topic>>,
}

#[derive(Default)]
struct Topic {
    groups: HashMap<GroupKey, Group>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum GroupKey {
    Named(String),
    /// The private group of a subscription that named none.
    Own(String),
}

struct Group {
    sender: Sender<Message>,
    receiver: Receiver<Message>,
    members: usize,
}

impl MemoryProvider {
    /// A provider for the connection `name`.
    pub fn new(name: impl Into<String>, config: MemoryConfig) -> Self {
        MemoryProvider {
            shared: Arc::new(Shared {
                name: name.into(),
                topics: Mutex::new(HashMap::new()),
            }),
            config,
            subscriptions: Subscriptions::new(),
        }
    }

    /// The connection's settings.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// How many messages wait in `group`'s queue on `topic`, for tests and diagnostics.
    pub fn pending(&self, topic: &str, group: &str) -> usize {
        let topics = self.shared.lock();
        topics
            .get(topic)
            .and_then(|topic| topic.groups.get(&GroupKey::Named(group.to_owned())))
            .map_or(0, |group| group.receiver.len())
    }

    fn origin(&self, operation: Operation, target: &str) -> Origin {
        Origin::new(DRIVER, &self.shared.name, operation, target)
    }

    fn check_open(&self, operation: Operation, target: &str) -> Result<()> {
        self.subscriptions
            .check_open(|| self.origin(operation, target))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Topic>> {
        // The map stays consistent even if a holder panicked: every change is one insert or
        // remove.
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts `message` in the queue of every group subscribed to `topic`, waiting for room.
    async fn deliver(&self, topic: &str, message: Message) {
        let senders: Vec<Sender<Message>> = {
            let topics = self.lock();
            topics.get(topic).map_or_else(Vec::new, |topic| {
                topic
                    .groups
                    .values()
                    .map(|group| group.sender.clone())
                    .collect()
            })
        };
        for sender in senders {
            // A group whose last private member just left has no receiver; skipping it is right.
            let _ = sender.send(message.clone()).await;
        }
    }

    /// Joins `group` on `topic` and returns its queue.
    fn join(
        &self,
        topic: &str,
        group: &GroupKey,
        buffer: usize,
    ) -> (Sender<Message>, Receiver<Message>) {
        let mut topics = self.lock();
        let group = topics
            .entry(topic.to_owned())
            .or_default()
            .groups
            .entry(group.clone())
            .or_insert_with(|| {
                let (sender, receiver) = async_channel::bounded(buffer);
                Group {
                    sender,
                    receiver,
                    members: 0,
                }
            });
        group.members += 1;
        (group.sender.clone(), group.receiver.clone())
    }

    /// Leaves `group` on `topic`; a private group goes away with its member.
    fn leave(&self, topic: &str, group: &GroupKey) {
        let mut topics = self.lock();
        let Some(entry) = topics.get_mut(topic) else {
            return;
        };
        if let Some(state) = entry.groups.get_mut(group) {
            state.members = state.members.saturating_sub(1);
            if state.members == 0 && matches!(group, GroupKey::Own(_)) {
                entry.groups.remove(group);
            }
        }
        if entry.groups.is_empty() {
            topics.remove(topic);
        }
    }
}

#[async_trait]
impl Provider for MemoryProvider {
    fn driver(&self) -> &'static str {
        DRIVER
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    async fn publish(&self, ctx: &Context, topic: &str, mut message: Message) -> Result<()> {
        self.check_open(Operation::Publish, topic)?;
        propagation::inject(ctx, &mut message);
        ctx.run(|| self.origin(Operation::Publish, topic), async {
            self.shared.deliver(topic, message).await;
            Ok(())
        })
        .await
    }

    async fn subscribe(
        &self,
        ctx: &Context,
        topic: &str,
        options: SubscribeOptions,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription> {
        self.check_open(Operation::Subscribe, topic)?;
        ctx.check(|| self.origin(Operation::Subscribe, topic))?;

        let group = match options.group {
            Some(group) => GroupKey::Named(group),
            None => GroupKey::Own(new_id()),
        };
        let (sender, receiver) = self.shared.join(topic, &group, self.config.buffer);
        let dispatcher = Dispatcher::new(
            handler,
            self.config.retry.clone(),
            Source {
                driver: DRIVER,
                connection: self.shared.name.as_str().into(),
                topic: topic.into(),
            },
        );
        let consumer = Consumer {
            shared: Arc::clone(&self.shared),
            topic: topic.to_owned(),
            group,
            sender,
            receiver,
            dispatcher,
            dead_letter_topic: dead_letter_topic(&self.config.dead_letter_topic, topic),
        };

        tracing::debug!(connection = %self.shared.name, driver = %DRIVER, topic, "subscribed");
        Ok(self
            .subscriptions
            .spawn(ctx, topic, |stop| consumer.run(stop)))
    }

    async fn ping(&self, _ctx: &Context) -> Result<()> {
        self.check_open(Operation::Ping, "")
    }

    async fn close(&self) -> Result<()> {
        self.subscriptions.close().await;
        tracing::info!(connection = %self.shared.name, driver = %DRIVER, "closed");
        Ok(())
    }
}

/// One subscription's consumer loop.
struct Consumer {
    shared: Arc<Shared>,
    topic: String,
    group: GroupKey,
    sender: Sender<Message>,
    receiver: Receiver<Message>,
    dispatcher: Dispatcher,
    dead_letter_topic: Option<String>,
}

impl Consumer {
    async fn run(self, stop: CancellationToken) {
        loop {
            let message = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                received = self.receiver.recv() => match received {
                    Ok(message) => message,
                    Err(_) => break,
                },
            };

            match self.dispatcher.dispatch(|| message.clone(), &stop).await {
                Outcome::Handled => {}
                Outcome::Failed { error, attempts } => {
                    self.dead_letter(&message, &error.to_string(), attempts)
                        .await;
                }
                Outcome::Interrupted => {
                    self.give_back(message);
                    break;
                }
            }
        }
        self.shared.leave(&self.topic, &self.group);
    }

    async fn dead_letter(&self, message: &Message, error: &str, attempts: u32) {
        let Some(target) = &self.dead_letter_topic else {
            tracing::error!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                message_id = %message.id,
                attempts,
                error,
                "handler failed on every attempt and no dead-letter topic is set: message dropped"
            );
            return;
        };

        let dead = propagation::dead_letter(message, &self.topic, error, attempts);
        let delivered =
            tokio::time::timeout(DEAD_LETTER_TIMEOUT, self.shared.deliver(target, dead)).await;
        match delivered {
            Ok(()) => tracing::warn!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                dead_letter_topic = %target,
                message_id = %message.id,
                attempts,
                "message dead-lettered"
            ),
            Err(_) => tracing::error!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                dead_letter_topic = %target,
                message_id = %message.id,
                "the dead-letter topic had no room: message dropped"
            ),
        }
    }

    /// Returns a message this member did not finish to its group, for another member or the
    /// next one that joins.
    fn give_back(&self, message: Message) {
        if let Err(error) = self.sender.try_send(message) {
            let message = error.into_inner();
            let sender = self.sender.clone();
            tokio::spawn(async move {
                let _ = sender.send(message).await;
            });
        }
    }
}

fn dead_letter_topic(template: &str, topic: &str) -> Option<String> {
    (!template.is_empty()).then(|| template.replace("{topic}", topic))
}

impl fmt::Display for MemoryProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DRIVER}({})", self.shared.name)
    }
}

impl fmt::Debug for MemoryProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryProvider")
            .field("name", &self.shared.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
