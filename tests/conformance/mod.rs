//! The conformance suite: the behaviour every driver must show, as checks over
//! `&dyn Provider`.
//!
//! A driver's test file implements [`Driver`] and calls [`conformance_tests!`], which makes one
//! `#[tokio::test]` per check. A check that cannot apply to a driver (core NATS keeps
//! nothing for absent members) asserts what the driver does instead and reports "not
//! applicable" with the driver's reason, never a silent pass.

#![allow(dead_code, unreachable_pub)]

pub mod trace;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use broker::propagation::{DEAD_LETTER_ATTEMPTS_HEADER, DEAD_LETTER_ERROR_HEADER, TRACE_ID_HEADER};
use broker::{Context, Error, Message, Provider, ProviderExt, SubscribeOptions, Subscription};
use tokio::sync::Notify;

/// How long a check waits for anything before it fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The retry attempts every driver under test is configured with.
pub const ATTEMPTS: u32 = 3;

/// What the suite needs from a driver's tests.
#[async_trait]
pub trait Driver: Send + Sync {
    /// A connected provider whose retry policy makes [`ATTEMPTS`] attempts with a short
    /// backoff and dead-letters to [`Driver::dead_letter_topic`].
    async fn connect(&self) -> Arc<dyn Provider>;

    /// The error a provider gives when it tries to reach a broker where none listens (from
    /// connecting or from `ping`), or why that does not apply to this driver.
    async fn dead_broker_error(&self) -> Result<Error, &'static str>;

    /// The topic failed messages of `topic` are dead-lettered to, as a topic to subscribe to.
    fn dead_letter_topic(&self, topic: &str) -> String {
        format!("{topic}.dlq")
    }

    /// Whether the driver redelivers and dead-letters failed messages, or why not.
    fn redelivery(&self) -> Result<(), &'static str> {
        Ok(())
    }

    /// Whether a group keeps what is published while it has no member, or why not.
    fn durable_groups(&self) -> Result<(), &'static str> {
        Ok(())
    }

    /// A topic name no other test uses.
    fn topic(&self) -> String {
        format!("conformance.{}", uuid::Uuid::now_v7().simple())
    }
}

/// How a check ended, when it did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    NotApplicable(&'static str),
}

/// Makes one test per check for the driver `$driver` (an expression of a type implementing
/// [`Driver`]).
#[macro_export]
macro_rules! conformance_tests {
    ($driver:expr) => {
        $crate::conformance_tests!(@checks $driver;
            round_trip_keeps_every_field,
            request_id_becomes_the_handlers_trace_id_and_span,
            message_published_after_subscribe_is_delivered,
            group_members_share_messages_and_groups_each_get_all,
            group_resumes_with_what_was_published_while_no_member_listened,
            failing_handler_is_retried_then_dead_lettered,
            every_attempt_gets_the_message_as_published,
            panicking_handler_is_retried_and_the_subscription_lives_on,
            close_waits_for_in_flight_handler,
            stopping_a_subscription_waits_for_in_flight_handler,
            cancelled_or_expired_context_stops_operations,
            ping_answers_live_and_fails_clearly_on_a_dead_broker,
        );
    };
    (@checks $driver:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::conformance::trace::install();
                let driver = $driver;
                let verdict = tokio::time::timeout(
                    $crate::conformance::TIMEOUT * 4,
                    $crate::conformance::$check(&driver),
                )
                .await
                .expect("the check did not finish in time");
                match verdict {
                    $crate::conformance::Verdict::Passed => {}
                    $crate::conformance::Verdict::NotApplicable(reason) => {
                        println!("{}: not applicable: {reason}", stringify!($check));
                    }
                }
            }
        )*
    };
}

/// Messages a test handler received, with a way to wait for them.
#[derive(Clone, Default)]
pub struct Inbox {
    messages: Arc<Mutex<Vec<(Context, Message)>>>,
    arrived: Arc<Notify>,
}

impl Inbox {
    /// A handler that records every message it gets and acknowledges it.
    pub fn handler(&self) -> impl broker::Handler {
        let inbox = self.clone();
        move |ctx: Context, message: Message| {
            let inbox = inbox.clone();
            async move {
                inbox.messages.lock().unwrap().push((ctx, message));
                inbox.arrived.notify_waiters();
                Ok::<(), Error>(())
            }
        }
    }

    /// Waits until at least `count` messages arrived; panics after [`TIMEOUT`].
    pub async fn wait_for(&self, count: usize) -> Vec<(Context, Message)> {
        let waited = tokio::time::timeout(TIMEOUT, async {
            loop {
                let notified = self.arrived.notified();
                if self.len() >= count {
                    return;
                }
                notified.await;
            }
        })
        .await;
        let messages = self.messages.lock().unwrap().clone();
        assert!(
            waited.is_ok(),
            "expected {count} messages, got {} in {TIMEOUT:?}",
            messages.len()
        );
        messages
    }

    /// How many messages arrived so far.
    pub fn len(&self) -> usize {
        self.messages.lock().unwrap().len()
    }

    /// The ids of the messages that arrived so far.
    pub fn ids(&self) -> Vec<String> {
        let messages = self.messages.lock().unwrap();
        messages
            .iter()
            .map(|(_, message)| message.id.clone())
            .collect()
    }
}

/// Gives a subscription a moment to settle, then checks that nothing more arrives.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

fn numbered(count: usize) -> Vec<Message> {
    (0..count)
        .map(|index| Message::new(format!("message {index}")))
        .collect()
}

async fn publish_all(provider: &dyn Provider, topic: &str, messages: &[Message]) {
    let ctx = Context::new().with_timeout(TIMEOUT);
    for message in messages {
        provider
            .publish(&ctx, topic, message.clone())
            .await
            .unwrap_or_else(|error| panic!("publish to {topic} failed: {error}"));
    }
}

async fn subscribe(
    provider: &dyn Provider,
    topic: &str,
    options: SubscribeOptions,
    handler: impl broker::Handler,
) -> Subscription {
    let ctx = Context::new();
    let setup = Context::new().with_timeout(TIMEOUT);
    tokio::select! {
        subscribed = provider.subscribe(&ctx, topic, options, Arc::new(handler)) => {
            subscribed.unwrap_or_else(|error| panic!("subscribe to {topic} failed: {error}"))
        }
        stop = setup.done() => panic!("subscribe to {topic} did not finish: {stop}"),
    }
}

/// All four fields of a message arrive as they were sent, plus the `trace_id` header.
pub async fn round_trip_keeps_every_field(driver: &dyn Driver) -> Verdict {
    let provider = driver.connect().await;
    let topic = driver.topic();
    let inbox = Inbox::default();
    let _subscription = subscribe(&*provider, &topic, Default::default(), inbox.handler()).await;

    let sent = Message::new(vec![0u8, 1, 2, 255])
        .with_header("kind", "round-trip")
        .with_header("empty", "")
        .with_header("unicode", "grüße ✓");
    let ctx = Context::from_request_id("round-trip-request");
    provider.publish(&ctx, &topic, sent.clone()).await.unwrap();

    let (_, received) = inbox.wait_for(1).await.remove(0);
    let mut expected_headers = sent.headers.clone();
    expected_headers.insert(TRACE_ID_HEADER.into(), "round-trip-request".into());
    assert_eq!(received.id, sent.id, "id");
    assert_eq!(received.body, sent.body, "body");
    assert_eq!(received.timestamp, sent.timestamp, "timestamp");
    assert_eq!(received.headers, expected_headers, "headers");

    provider.close().await.unwrap();
    Verdict::Passed
}

/// The publisher's request id is the handler's trace id, and the handler's span carries it.
pub async fn request_id_becomes_the_handlers_trace_id_and_span(driver: &dyn Driver) -> Verdict {
    let provider = driver.connect().await;
    let topic = driver.topic();
    let request_id = format!("request-{}", uuid::Uuid::now_v7().simple());
    let seen = Arc::new(Mutex::new(None));

    let recorded = seen.clone();
    let _subscription = subscribe(
        &*provider,
        &topic,
        Default::default(),
        move |ctx: Context, _message: Message| {
            let recorded = recorded.clone();
            async move {
                tracing::info!(probe = %ctx.request_id(), "probe");
                *recorded.lock().unwrap() =
                    Some((ctx.request_id().to_owned(), ctx.trace_id().to_owned()));
                Ok::<(), Error>(())
            }
        },
    )
    .await;

    let ctx = Context::from_request_id(&request_id).with_timeout(TIMEOUT);
    provider
        .publish(&ctx, &topic, Message::new("traced"))
        .await
        .unwrap();

    let waited = tokio::time::timeout(TIMEOUT, async {
        while seen.lock().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the handler never ran");
    let (handler_request_id, handler_trace_id) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(handler_trace_id, request_id);
    assert_eq!(handler_request_id, request_id);
    assert_eq!(
        trace::span_trace_id(&request_id).as_deref(),
        Some(request_id.as_str()),
        "the handler's span carries the trace id"
    );

    provider.close().await.unwrap();
    Verdict::Passed
}

/// Every message published after `subscribe` returned is delivered.
pub async fn message_published_after_subscribe_is_delivered(driver: &dyn Driver) -> Verdict {
    let provider = driver.connect().await;
    let topic = driver.topic();
    let inbox = Inbox::default();
    let _subscription = subscribe(&*provider, &topic, Default::default(), inbox.handler()).await;

    let sent = numbered(20);
    publish_all(&*provider, &topic, &sent).await;

    inbox.wait_for(sent.len()).await;
    let expected: HashSet<String> = sent.iter().map(|message| message.id.clone()).collect();
    let received: HashSet<String> = inbox.ids().into_iter().collect();
    assert_eq!(received, expected);

    provider.close().await.unwrap();
    Verdict::Passed
}

/// Two members of one group get each message once between them; a second group and an
/// independent subscriber each get every message.
pub async fn group_members_share_messages_and_groups_each_get_all(driver: &dyn Driver) -> Verdict {
    let provider = driver.connect().await;
    let topic = driver.topic();
    let group = format!("group-{}", uuid::Uuid::now_v7().simple());
    let other_group = format!("other-{}", uuid::Uuid::now_v7().simple());
    let (first, second) = (Inbox::default(), Inbox::default());
    let (other, independent) = (Inbox::default(), Inbox::default());

    let _a = subscribe(
        &*provider,
        &topic,
        SubscribeOptions::group(&group),
        first.handler(),
    )
    .await;
    let _b = subscribe(
        &*provider,
        &topic,
        SubscribeOptions::group(&group),
        second.handler(),
    )
    .await;
    let _c = subscribe(
        &*provider,
        &topic,
        SubscribeOptions::group(&other_group),
        other.handler(),
    )
    .await;
    let _d = subscribe(
        &*provider,
        &topic,
        Default::default(),
        independent.handler(),
    )
    .await;

    let sent = numbered(40);
    publish_all(&*provider, &topic, &sent).await;

    other.wait_for(sent.len()).await;
    independent.wait_for(sent.len()).await;
    let shared = tokio::time::timeout(TIMEOUT, async {
        while first.len() + second.len() < sent.len() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        shared.is_ok(),
        "the group got {} of {}",
        first.len() + second.len(),
        sent.len()
    );
    settle().await;

    let expected: HashSet<String> = sent.iter().map(|message| message.id.clone()).collect();
    let mut group_ids = first.ids();
    group_ids.extend(second.ids());
    assert_eq!(
        group_ids.len(),
        sent.len(),
        "no message went to both members"
    );
    assert_eq!(group_ids.into_iter().collect::<HashSet<_>>(), expected);
    assert_eq!(other.ids().len(), sent.len());
    assert_eq!(other.ids().into_iter().collect::<HashSet<_>>(), expected);
    assert_eq!(
        independent.ids().into_iter().collect::<HashSet<_>>(),
        expected
    );

    provider.close().await.unwrap();
    Verdict::Passed
}

/// A group outlives its members: what was published while none listened goes to the next
/// member, and what an earlier member handled is not delivered again. Drivers without durable
/// groups show the opposite (nothing of the gap arrives) and report "not applicable".
pub async fn group_resumes_with_what_was_published_while_no_member_listened(
    driver: &dyn Driver,
) -> Verdict {
    let provider = driver.connect().await;
    let topic = driver.topic();
    let group = format!("group-{}", uuid::Uuid::now_v7().simple());

    let earlier = Inbox::default();
    let first = subscribe(
        &*provider,
        &topic,
        SubscribeOptions::group(&group),
        earlier.handler(),
    )
    .await;
    let handled = numbered(3);
    publish_all(&*provider, &topic, &handled).await;
    earlier.wait_for(handled.len()).await;
    first.stop().await;

    let gap = numbered(3);
    publish_all(&*provider, &topic, &gap).await;

    let later = Inbox::default();
    let _second = subscribe(
        &*provider,
        &topic,
        SubscribeOptions::group(&group),
        later.handler(),
    )
    .await;
    let after = numbered(1);
    publish_all(&*provider, &topic, &after).await;

    // With durable groups the gap's messages come first, in order; without, only the last.
    let (expected, verdict): (Vec<&Message>, _) = match driver.durable_groups() {
        Ok(()) => (gap.iter().chain(&after).collect(), Verdict::Passed),
        Err(reason) => (after.iter().collect(), Verdict::NotApplicable(reason)),
    };
    let expected: Vec<String> = expected.iter().map(|message| message.id.clone()).collect();
    later.wait_for(expected.len()).await;
    settle().await;
    assert_eq!(
        later.ids(),
        expected,
        "the new member gets what the group kept for it, then the new message, and nothing the \
         earlier member handled"
    );

    provider.close().await.unwrap();
    verdict
}

/// A handler that always fails runs [`ATTEMPTS`] times, then the message is dead-lettered with
/// the error, and the next message is handled.
pub async fn failing_handler_is_retried_then_dead_lettered(driver: &dyn Driver) -> Verdict {
    if let Err(reason) = driver.redelivery() {
        return Verdict::NotApplicable(reason);
    }
    let provider = driver.connect().await;
    let topic = driver.topic();
    let dead = Inbox::default();
    let _dead = subscribe(
        &*provider,
        &driver.dead_letter_topic(&topic),
        Default::default(),
        dead.handler(),
    )
    .await;

    let attempts = Arc::new(AtomicU32::new(0));
    let handled = Inbox::default();
    let counter = attempts.clone();
    let good = handled.handler();
    let _subscription = subscribe(
        &*provider,
        &topic,
        Default::default(),
        move |ctx: Context, message: Message| {
            let poison = message.header("poison").is_some();
            if poison {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let handled = broker::Handler::call(&good, ctx, message);
            async move {
                if poison {
                    Err(broker::BoxError::from("poison message"))
                } else {
                    handled.await
                }
            }
        },
    )
    .await;

    let poison = Message::new("poison").with_header("poison", "yes");
    let after = Message::new("fine");
    publish_all(&*provider, &topic, &[poison.clone(), after.clone()]).await;

    let (_, dead_lettered) = dead.wait_for(1).await.remove(0);
    assert_eq!(dead_lettered.id, poison.id);
    assert_eq!(dead_lettered.body, poison.body);
    assert!(
        dead_lettered
            .header(DEAD_LETTER_ERROR_HEADER)
            .is_some_and(|error| error.contains("poison")),
        "the dead letter names the error: {:?}",
        dead_lettered.headers
    );
    assert_eq!(
        dead_lettered.header(DEAD_LETTER_ATTEMPTS_HEADER),
        Some(ATTEMPTS.to_string().as_str())
    );
    assert_eq!(attempts.load(Ordering::SeqCst), ATTEMPTS);
    let (_, handled_after) = handled.wait_for(1).await.remove(0);
    assert_eq!(handled_after.id, after.id);

    provider.close().await.unwrap();
    Verdict::Passed
}

/// A handler that panics counts as failed: the message is retried and the subscription keeps
/// handling later messages.
/// A retried message is the message that was published, on every attempt: drivers may build
/// it anew for each one.
pub async fn every_attempt_gets_the_message_as_published(driver: &dyn Driver) -> Verdict {
    if let Err(reason) = driver.redelivery() {
        return Verdict::NotApplicable(reason);
    }
    let provider = driver.connect().await;
    let topic = driver.topic();
    let attempts = Inbox::default();
    let record = attempts.handler();
    let _subscription = subscribe(
        &*provider,
        &topic,
        Default::default(),
        move |ctx: Context, message: Message| {
            let recorded = broker::Handler::call(&record, ctx, message);
            async move {
                recorded.await?;
                Err::<(), _>(broker::BoxError::from("every attempt fails"))
            }
        },
    )
    .await;

    let sent = Message::new("retried").with_header("kind", "retry");
    let ctx = Context::from_request_id("retry-request");
    provider.publish(&ctx, &topic, sent.clone()).await.unwrap();

    let seen = attempts.wait_for(ATTEMPTS as usize).await;
    let mut expected_headers = sent.headers.clone();
    expected_headers.insert(TRACE_ID_HEADER.into(), "retry-request".into());
    for (attempt, (ctx, received)) in seen.iter().enumerate() {
        assert_eq!(received.id, sent.id, "id on attempt {}", attempt + 1);
        assert_eq!(received.body, sent.body, "body on attempt {}", attempt + 1);
        assert_eq!(
            received.timestamp,
            sent.timestamp,
            "timestamp on attempt {}",
            attempt + 1
        );
        assert_eq!(
            received.headers,
            expected_headers,
            "headers on attempt {}",
            attempt + 1
        );
        assert_eq!(
            ctx.trace_id(),
            "retry-request",
            "trace id on attempt {}",
            attempt + 1
        );
    }

    provider.close().await.unwrap();
    Verdict::Passed
}

pub async fn panicking_handler_is_retried_and_the_subscription_lives_on(
    driver: &dyn Driver,
) -> Verdict {
    if let Err(reason) = driver.redelivery() {
        return Verdict::NotApplicable(reason);
    }
    let provider = driver.connect().await;
    let topic = driver.topic();
    let inbox = Inbox::default();
    let panicked = Arc::new(AtomicBool::new(false));

    let record = inbox.handler();
    let first_time = panicked.clone();
    let _subscription = subscribe(
        &*provider,
        &topic,
        Default::default(),
        move |ctx: Context, message: Message| {
            let panic_now = !first_time.swap(true, Ordering::SeqCst);
            let recorded = broker::Handler::call(&record, ctx, message);
            async move {
                if panic_now {
                    panic!("the handler panics on its first message");
                }
                recorded.await
            }
        },
    )
    .await;

    let sent = numbered(2);
    publish_all(&*provider, &topic, &sent).await;

    inbox.wait_for(2).await;
    let expected: HashSet<String> = sent.iter().map(|message| message.id.clone()).collect();
    assert_eq!(inbox.ids().into_iter().collect::<HashSet<_>>(), expected);

    provider.close().await.unwrap();
    Verdict::Passed
}

/// A handler that is running when the provider is closed finishes before `close` returns.
pub async fn close_waits_for_in_flight_handler(driver: &dyn Driver) -> Verdict {
    in_flight_handler_finishes_before(driver, Stopping::Provider).await
}

/// Stopping a subscription waits for its running handler.
pub async fn stopping_a_subscription_waits_for_in_flight_handler(driver: &dyn Driver) -> Verdict {
    in_flight_handler_finishes_before(driver, Stopping::Subscription).await
}

/// What a graceful-stop check stops while a handler runs.
enum Stopping {
    Provider,
    Subscription,
}

async fn in_flight_handler_finishes_before(driver: &dyn Driver, stopping: Stopping) -> Verdict {
    let provider = driver.connect().await;
    let topic = driver.topic();
    let (started, finished) = slow_handler_flags();
    let subscription = subscribe(
        &*provider,
        &topic,
        Default::default(),
        slow_handler(&started, &finished),
    )
    .await;

    publish_all(&*provider, &topic, &[Message::new("slow")]).await;
    wait_until(&started).await;
    match stopping {
        Stopping::Provider => provider.close().await.unwrap(),
        Stopping::Subscription => subscription.stop().await,
    }

    assert!(
        finished.load(Ordering::SeqCst),
        "stopping returned before the handler finished"
    );
    provider.close().await.unwrap();
    Verdict::Passed
}

fn slow_handler_flags() -> (Arc<AtomicBool>, Arc<AtomicBool>) {
    (Arc::default(), Arc::default())
}

fn slow_handler(started: &Arc<AtomicBool>, finished: &Arc<AtomicBool>) -> impl broker::Handler {
    let (started, finished) = (started.clone(), finished.clone());
    move |_ctx: Context, _message: Message| {
        let (started, finished) = (started.clone(), finished.clone());
        async move {
            started.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(700)).await;
            finished.store(true, Ordering::SeqCst);
            Ok::<(), Error>(())
        }
    }
}

async fn wait_until(flag: &AtomicBool) {
    let waited = tokio::time::timeout(TIMEOUT, async {
        while !flag.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the handler never started");
}

/// A cancelled context stops publish and subscribe with `Cancelled`, an expired one with
/// `DeadlineExceeded`, and cancelling a subscription's context ends the subscription.
pub async fn cancelled_or_expired_context_stops_operations(driver: &dyn Driver) -> Verdict {
    let provider = driver.connect().await;
    let topic = driver.topic();

    let cancelled = Context::new();
    cancelled.cancel();
    let published = provider
        .publish(&cancelled, &topic, Message::new("no"))
        .await;
    assert!(
        matches!(published, Err(Error::Cancelled { .. })),
        "{published:?}"
    );

    let expired = Context::new().with_timeout(Duration::ZERO);
    let published = provider.publish(&expired, &topic, Message::new("no")).await;
    assert!(
        matches!(published, Err(Error::DeadlineExceeded { .. })),
        "{published:?}"
    );
    let origin = published.unwrap_err().origin().cloned().unwrap();
    assert_eq!(origin.driver, provider.driver());
    assert_eq!(origin.operation, broker::Operation::Publish);
    assert_eq!(origin.target, topic);

    let subscribed = provider
        .subscribe_fn(&cancelled, &topic, Inbox::default().handler())
        .await;
    assert!(
        matches!(subscribed, Err(Error::Cancelled { .. })),
        "{subscribed:?}"
    );

    let ctx = Context::new();
    let subscription = provider
        .subscribe_fn(&ctx, &topic, Inbox::default().handler())
        .await
        .unwrap();
    ctx.cancel();
    let ended = tokio::time::timeout(TIMEOUT, subscription.wait()).await;
    assert!(
        ended.is_ok(),
        "the subscription did not end with its context"
    );

    provider.close().await.unwrap();
    Verdict::Passed
}

/// `ping` succeeds against the live broker and fails with an error that names the driver
/// when no broker answers.
pub async fn ping_answers_live_and_fails_clearly_on_a_dead_broker(driver: &dyn Driver) -> Verdict {
    let provider = driver.connect().await;
    provider
        .ping(&Context::new().with_timeout(TIMEOUT))
        .await
        .unwrap();
    provider.close().await.unwrap();

    let error = match driver.dead_broker_error().await {
        Ok(error) => error,
        Err(reason) => return Verdict::NotApplicable(reason),
    };
    let origin = error
        .origin()
        .unwrap_or_else(|| panic!("no origin in {error:?}"));
    assert_eq!(origin.driver, provider.driver());
    assert!(!error.to_string().is_empty());
    Verdict::Passed
}
