//! The three-broker demo: one subscriber per connection, a publisher that sends one message to
//! each connection every second, and a graceful stop on Ctrl+C or SIGTERM.
//!
//! ```text
//! scripts/brokers                                   # Kafka, RabbitMQ and NATS on loopback
//! cargo run --example main                          # config.toml
//! cargo run --example main -- --config testdata/memory.toml
//! ```
//!
//! Every publish gets a fresh request id. The log shows it three times more: once in each
//! subscriber's `handle{trace_id=…}` span, so the id can be followed through every broker.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use broker::{Context, Manager, Message, ProviderExt, Subscription};
use tokio::sync::watch;

/// The topic (subject, routing key) every connection uses.
const TOPIC: &str = "demo.events";

/// How long the stop waits for messages still on their way before it closes anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "the demo failed");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let path = config_path()?;
    let manager = Manager::from_file(&path).await?;
    let names: Vec<String> = manager.names().map(str::to_owned).collect();
    tracing::info!(config = %path, connections = ?names, "connected");

    let mut counters = BTreeMap::new();
    let mut subscriptions = Vec::new();
    for name in &names {
        let counter = Arc::new(Counter::default());
        subscriptions.push(subscribe(&manager, name, Arc::clone(&counter)).await?);
        counters.insert(name.clone(), counter);
    }
    let counters = Arc::new(counters);

    let (stop, stopped) = watch::channel(false);
    let publisher = tokio::spawn(publish_every_second(
        Arc::new(manager),
        Arc::clone(&counters),
        stopped,
    ));

    let signal = shutdown_signal().await;
    tracing::info!(signal, "stopping: no more publishing");
    let _ = stop.send(true);
    let manager = publisher.await??;

    wait_for_in_flight(&counters).await;
    for subscription in subscriptions {
        subscription.stop().await;
    }
    manager.close().await?;
    tracing::info!("closed every connection");
    Ok(())
}

/// Messages published to and received from one connection.
#[derive(Default)]
struct Counter {
    published: AtomicU64,
    received: AtomicU64,
}

async fn subscribe(
    manager: &Manager,
    name: &str,
    counter: Arc<Counter>,
) -> Result<Subscription, broker::Error> {
    let provider = manager.get(name)?;
    provider
        .subscribe_fn(
            &Context::new(),
            TOPIC,
            move |_ctx: Context, message: Message| {
                let counter = Arc::clone(&counter);
                async move {
                    // The span around this handler carries trace_id, connection, driver and topic.
                    tracing::info!(body = %String::from_utf8_lossy(&message.body), "received");
                    counter.received.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), broker::Error>(())
                }
            },
        )
        .await
}

/// Publishes one message to every connection each second until `stopped` turns true, then
/// hands the manager back.
async fn publish_every_second(
    manager: Arc<Manager>,
    counters: Arc<BTreeMap<String, Arc<Counter>>>,
    mut stopped: watch::Receiver<bool>,
) -> Result<Manager, broker::Error> {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            _ = ticks.tick() => {}
        }
        round += 1;
        let ctx = Context::new().with_timeout(Duration::from_secs(5));
        for (name, counter) in counters.iter() {
            let message = Message::new(format!("round {round}"));
            match manager.get(name)?.publish(&ctx, TOPIC, message).await {
                Ok(()) => {
                    counter.published.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(request_id = %ctx.request_id(), connection = %name, "published");
                }
                Err(error) => tracing::error!(connection = %name, error = %error, "publish failed"),
            }
        }
    }
    Ok(Arc::into_inner(manager).expect("the publisher holds the last handle"))
}

/// Waits until every published message has been received, or [`DRAIN_TIMEOUT`] passed.
async fn wait_for_in_flight(counters: &BTreeMap<String, Arc<Counter>>) {
    let all_received = || {
        counters.values().all(|counter| {
            counter.received.load(Ordering::SeqCst) >= counter.published.load(Ordering::SeqCst)
        })
    };
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while !all_received() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("stopping with messages still on their way");
    }
}

/// Waits for Ctrl+C (SIGINT) or SIGTERM and names it.
async fn shutdown_signal() -> &'static str {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

fn config_path() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok("config.toml".to_owned()),
        (Some("--config"), Some(path)) => Ok(path),
        _ => Err("usage: main [--config PATH]".to_owned()),
    }
}
