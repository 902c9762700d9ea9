//! The handle of a live subscription, and the set of subscriptions a provider drains on close.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::Context;
use crate::error::{Error, Origin};

/// A live subscription.
///
/// Stopping it (with [`Subscription::stop`]) or dropping it ends the subscription gracefully:
/// no new message is taken, in-flight handlers finish and their acknowledgements are sent.
/// `stop` waits for that; dropping lets it finish in the background. Call
/// [`Subscription::detach`] to keep a subscription running without its handle.
#[must_use = "dropping a Subscription stops it"]
#[derive(Debug)]
pub struct Subscription {
    topic: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    detached: bool,
}

impl Subscription {
    /// The topic subscribed to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether the subscription has ended or been asked to stop.
    pub fn is_stopped(&self) -> bool {
        self.stop.is_cancelled() || self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the subscription and waits until in-flight handlers finished and were
    /// acknowledged.
    pub async fn stop(mut self) {
        self.stop.cancel();
        self.join().await;
    }

    /// Waits until the subscription ends by itself: its context is cancelled or past its
    /// deadline, or its provider is closed.
    pub async fn wait(mut self) {
        self.join().await;
    }

    /// Lets the subscription run on without this handle, until its context stops or its
    /// provider is closed.
    pub fn detach(mut self) {
        self.detached = true;
    }

    async fn join(&mut self) {
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
            && error.is_panic()
        {
            tracing::error!(topic = %self.topic, "subscription task panicked");
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.detached {
            self.stop.cancel();
        }
    }
}

/// The subscriptions of one provider: each runs as a task that [`Subscriptions::close`]
/// stops and waits for.
#[derive(Debug, Default)]
pub struct Subscriptions {
    closing: CancellationToken,
    tasks: TaskTracker,
}

impl Subscriptions {
    /// An empty set.
    pub fn new() -> Self {
        Subscriptions::default()
    }

    /// Starts a subscription's consumer loop and returns its handle.
    ///
    /// `consume` gets a token that fires when the subscription must stop: its handle was
    /// stopped or dropped, `ctx` was cancelled or passed its deadline, or the set is closing.
    /// It should then stop taking messages, finish the ones in flight, and return.
    pub fn spawn<F, Fut>(&self, ctx: &Context, topic: &str, consume: F) -> Subscription
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.closing.child_token();

        let watched = stop.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = ctx.done() => watched.cancel(),
                _ = watched.cancelled() => {}
            }
        });

        let task = self.tasks.spawn(consume(stop.clone()));
        Subscription {
            topic: topic.to_owned(),
            stop,
            task: Some(task),
            detached: false,
        }
    }

    /// Whether [`Subscriptions::close`] has been called.
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Fails with [`Error::Closed`] at `origin` once [`Subscriptions::close`] has been called,
    /// for providers whose operations end with their subscriptions.
    pub fn check_open(&self, origin: impl FnOnce() -> Origin) -> Result<(), Error> {
        if self.is_closing() {
            return Err(Error::Closed { origin: origin() });
        }
        Ok(())
    }

    /// Stops every subscription and waits until all of them have drained.
    pub async fn close(&self) {
        self.closing.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
