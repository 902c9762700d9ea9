//! The request context every operation takes: request id, trace id, cancellation, deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{self, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
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
    /// A context that has already stopped does not start the operation at all. The operation
    /// is polled first, and the waits for a cancellation or the deadline are made only once it
    /// has to wait: an operation that finishes at once never registers with the cancellation
    /// token nor the timer.
    pub fn run<T, O, F>(
        &self,
        origin: O,
        operation: F,
    ) -> impl Future<Output = Result<T, Error>> + use<'_, T, O, F>
    where
        O: FnOnce() -> Origin,
        F: Future<Output = Result<T, Error>>,
    {
        // A future of its own rather than an `async` block, which would keep the operation
        // twice (as its argument and as the future it polls); operations such as a publish
        // are most of a kilobyte.
        Run {
            ctx: self,
            origin: Some(origin),
            started: false,
            operation,
            cancelled: None,
            deadline: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Context::run`].
    struct Run<'a, O, F> {
        ctx: &'a Context,
        origin: Option<O>,
        started: bool,
        #[pin]
        operation: F,
        #[pin]
        cancelled: Option<WaitForCancellationFuture<'a>>,
        // Boxed: a timer is most of the size of a small operation, and only contexts with a
        // deadline need one.
        deadline: Option<Pin<Box<Sleep>>>,
    }
}

impl<T, O, F> Future for Run<'_, O, F>
where
    O: FnOnce() -> Origin,
    F: Future<Output = Result<T, Error>>,
{
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut stopped = |stop| {
            let origin = this
                .origin
                .take()
                .expect("`Context::run` polled after it finished");
            Poll::Ready(Err(Error::stopped(stop, origin())))
        };

        if !*this.started {
            *this.started = true;
            if let Some(stop) = this.ctx.stopped() {
                return stopped(stop);
            }
        }

        if let Poll::Ready(result) = this.operation.poll(cx) {
            return Poll::Ready(result);
        }

        if this.cancelled.is_none() {
            this.cancelled.set(Some(this.ctx.token().cancelled()));
            if let Some(deadline) = this.ctx.deadline {
                *this.deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
            }
        }
        // A cancellation wins over a deadline that passed at the same time, as in `done`.
        if let Some(cancelled) = this.cancelled.as_pin_mut()
            && cancelled.poll(cx).is_ready()
        {
            return stopped(Stop::Cancelled);
        }
        if let Some(deadline) = this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return stopped(Stop::DeadlineExceeded);
        }
        Poll::Pending
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

    fn origin() -> Origin {
        Origin::new("test", "conn", crate::error::Operation::Publish, "topic")
    }

    #[tokio::test]
    async fn run_does_not_start_an_operation_once_the_context_stopped() {
        let ctx = Context::new();
        ctx.cancel();

        let ran = ctx
            .run(origin, async { unreachable!("the operation started") })
            .await;

        assert!(matches!(ran, Err::<(), _>(Error::Cancelled { .. })));
    }

    #[tokio::test]
    async fn run_stops_a_waiting_operation_at_the_deadline_or_cancellation() {
        let late = Context::new().with_timeout(Duration::from_millis(20));
        let ran = late
            .run(origin, std::future::pending::<Result<(), _>>())
            .await;
        assert!(matches!(ran, Err(Error::DeadlineExceeded { .. })));

        let cancelled = Context::new().with_timeout(Duration::from_secs(60));
        let waiting = cancelled.run(origin, std::future::pending::<Result<(), _>>());
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            cancelled.cancel();
        };
        let (ran, ()) = tokio::join!(waiting, cancel);
        assert!(matches!(ran, Err(Error::Cancelled { .. })));
    }

    #[tokio::test]
    async fn run_returns_what_the_operation_returns() {
        let ctx = Context::new().with_timeout(Duration::from_secs(60));

        let at_once = ctx.run(origin, async { Ok(1) }).await;
        let after_waiting = ctx
            .run(origin, async {
                tokio::task::yield_now().await;
                Ok(2)
            })
            .await;

        assert_eq!(at_once.unwrap(), 1);
        assert_eq!(after_waiting.unwrap(), 2);
    }
}
