//! The request context every operation takes: request id, trace id, cancellation, deadline.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Origin, Stop};

/// The context of one request, passed by reference to every operation.
///
/// It carries the request id (written into the `trace_id` header of published messages), the
/// trace id (the id a handler's logs carry), a cancellation token and an optional deadline.
/// Operations stop as soon as the context is cancelled or its deadline passes, and their
/// error says which of the two stopped them.
///
/// Cloning is cheap; clones share the cancellation token.
#[derive(Debug)]
pub struct Context {
    // Shared rather than owned: a context is cloned for every operation and built for every
    // delivered message, and the request and trace ids are usually the same text.
    request_id: Arc<str>,
    trace_id: Arc<str>,
    // Made on first use: most contexts of delivered messages are never cloned, cancelled nor
    // waited on, and a token costs a lock when it is dropped. The outer cell is filled when the
    // context is first cloned or needs its token; clones share the inner one, so a token made
    // through one clone is the one every clone sees.
    cancel: OnceLock<Arc<OnceLock<CancellationToken>>>,
    deadline: Option<Instant>,
}

impl Default for Context {
    fn default() -> Self {
        Context::new()
    }
}

impl Context {
    /// A context with a fresh request id, used as its trace id too, no deadline.
    pub fn new() -> Self {
        Context::with_id(
            Uuid::now_v7()
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer()),
        )
    }

    /// A context that continues the request `id`: both its request id and trace id are `id`.
    pub fn from_request_id(id: impl Into<String>) -> Self {
        Context::with_id(&id.into())
    }

    /// A context whose request id and trace id are both `id`.
    pub(crate) fn with_id(id: &str) -> Self {
        let id = Arc::<str>::from(id);
        Context {
            request_id: Arc::clone(&id),
            trace_id: id,
            cancel: OnceLock::new(),
            deadline: None,
        }
    }

    /// This context with another trace id.
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = trace_id.into().into();
        self
    }

    /// This context with a deadline `timeout` from now, or the current deadline if it is earlier.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        self.with_deadline(Instant::now() + timeout)
    }

    /// This context with the deadline `deadline`, or the current deadline if it is earlier.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(match self.deadline {
            Some(current) => current.min(deadline),
            None => deadline,
        });
        self
    }

    /// A context with the same ids and deadline whose cancellation does not reach this one.
    ///
    /// Cancelling this context cancels the child too.
    pub fn child(&self) -> Self {
        Context {
            cancel: OnceLock::from(Arc::new(OnceLock::from(self.token().child_token()))),
            ..self.clone()
        }
    }

    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The trace id.
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// The deadline, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The time left before the deadline; `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// Cancels this context, its clones and its children.
    pub fn cancel(&self) {
        self.token().cancel();
    }

    /// The cancellation token, for code that selects on it directly.
    pub fn cancellation_token(&self) -> &CancellationToken {
        self.token()
    }

    fn token(&self) -> &CancellationToken {
        self.shared_cell().get_or_init(CancellationToken::new)
    }

    fn shared_cell(&self) -> &Arc<OnceLock<CancellationToken>> {
        self.cancel.get_or_init(Arc::default)
    }

    /// Why the context has stopped, or `None` while it is still live.
    pub fn stopped(&self) -> Option<Stop> {
        if self
            .cancel
            .get()
            .and_then(|cell| cell.get())
            .is_some_and(CancellationToken::is_cancelled)
        {
            Some(Stop::Cancelled)
        } else if self
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            Some(Stop::DeadlineExceeded)
        } else {
            None
        }
    }

    /// Waits until the context is cancelled or its deadline passes, and says which.
    pub async fn done(&self) -> Stop {
        match self.deadline {
            Some(deadline) => tokio::select! {
                biased;
                _ = self.token().cancelled() => Stop::Cancelled,
                _ = tokio::time::sleep_until(deadline) => Stop::DeadlineExceeded,
            },
            None => {
                self.token().cancelled().await;
                Stop::Cancelled
            }
        }
    }

    /// Fails with the stop reason at `origin` if the context has already stopped.
    pub fn check(&self, origin: impl FnOnce() -> Origin) -> Result<(), Error> {
        match self.stopped() {
            Some(stop) => Err(Error::stopped(stop, origin())),
            None => Ok(()),
        }
    }

    /// Runs `operation` until it finishes or the context stops it.
    ///
    /// A context that has already stopped does not start the operation at all.
    pub async fn run<T, F>(&self, origin: impl FnOnce() -> Origin, operation: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        if let Some(stop) = self.stopped() {
            return Err(Error::stopped(stop, origin()));
        }
        // The operation is polled first: one that finishes without waiting never registers
        // with the cancellation token, and one that finishes on a later poll skips the
        // token's lock on that poll.
        tokio::select! {
            biased;
            result = operation => result,
            stop = self.done() => Err(Error::stopped(stop, origin())),
        }
    }
}

impl Clone for Context {
    fn clone(&self) -> Self {
        Context {
            request_id: Arc::clone(&self.request_id),
            trace_id: Arc::clone(&self.trace_id),
            cancel: OnceLock::from(Arc::clone(self.shared_cell())),
            deadline: self.deadline,
        }
    }
}

/// A new unique, time-ordered id (UUID v7) as text.
pub(crate) fn new_id() -> String {
    // Encoded into a buffer rather than through `Display`: ids are made per message.
    Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut Uuid::encode_buffer())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_clone_cancelled_before_anyone_waited_stops_every_clone() {
        let ctx = Context::new();
        let renamed = ctx.clone().with_trace_id("other");

        renamed.cancel();

        assert_eq!(ctx.stopped(), Some(Stop::Cancelled));
        assert_eq!(ctx.done().await, Stop::Cancelled);
    }

    #[test]
    fn cancelling_a_context_stops_the_clones_made_before() {
        let ctx = Context::new();
        let clone = ctx.clone();
        let clone_of_clone = clone.clone();

        ctx.cancel();

        assert_eq!(clone.stopped(), Some(Stop::Cancelled));
        assert_eq!(clone_of_clone.stopped(), Some(Stop::Cancelled));
        assert_eq!(Context::new().stopped(), None);
    }

    #[tokio::test]
    async fn a_waiting_context_wakes_when_a_clone_is_cancelled() {
        let ctx = Context::new();
        let waiting = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.done().await }
        });
        tokio::task::yield_now().await;

        ctx.clone().cancel();

        assert_eq!(waiting.await.unwrap(), Stop::Cancelled);
    }

    #[test]
    fn cancelling_a_child_leaves_the_parent_live_and_not_the_other_way() {
        let parent = Context::new();
        let child = parent.child();
        let other_child = parent.child();

        child.cancel();
        assert_eq!(parent.stopped(), None);
        assert_eq!(other_child.stopped(), None);

        parent.cancel();
        assert_eq!(other_child.stopped(), Some(Stop::Cancelled));
    }
}
