//! Runs the same workloads through `broker` and through each driver's native client, in the
//! same run and interleaved, and reports how close `broker` stays: a table on stdout, JSON,
//! and an SVG chart.
//!
//! ```text
//! scripts/brokers
//! cargo bench --bench compare -- [--messages N] [--drivers kafka,rabbitmq,nats] [--out DIR]
//!     [--latency-seconds N] [--soak-seconds N]
//! ```
//!
//! `--soak-seconds` adds, for each driver, a sustained publish-and-consume run that samples
//! the resident memory every five seconds, to show it stays flat however many messages pass.
//!
//! Workloads use 256-byte bodies with one header. Throughput is messages per second (higher
//! is better); latency is end-to-end, publish to handler, at a fixed rate (lower is better).

mod kafka;
mod nats;
mod rabbitmq;
mod report;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use broker::{Context, Message, Provider, SubscribeOptions};
use futures_util::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use report::{Figure, Report, Soak};
use tokio::sync::Notify;

/// The body of every benchmark message.
const BODY: [u8; 256] = [b'x'; 256];

/// How many times each side of a throughput workload runs, in turn; the median run counts, so
/// one lucky or unlucky round on either side moves nothing.
const ROUNDS: usize = 5;

/// How many times each side of a latency workload runs, in turn; each percentile's median
/// counts.
const LATENCY_ROUNDS: usize = 3;

/// Settings from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Messages per throughput run.
    pub(crate) messages: usize,
    /// Messages per second in the latency runs.
    pub(crate) latency_rate: u32,
    /// How long each latency run lasts.
    pub(crate) latency_duration: Duration,
    /// How many publishes are in flight at once in the publish workloads.
    pub(crate) concurrency: usize,
    /// How long the sustained publish-and-consume run lasts; none when zero.
    pub(crate) soak: Duration,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (settings, drivers, out) = parse_args()?;
    let mut report = Report::new(&settings);

    for driver in &drivers {
        match driver.as_str() {
            "kafka" => kafka::run(&settings, &mut report).await?,
            "rabbitmq" => rabbitmq::run(&settings, &mut report).await?,
            "nats" => nats::run(&settings, &mut report).await?,
            other => return Err(format!("no benchmark for driver `{other}`").into()),
        }
    }

    report.peak_memory();
    print!("{}", report.table());
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("bench.json"), report.json())?;
    std::fs::write(out.join("bench.svg"), report.svg())?;
    println!("wrote {0}/bench.json and {0}/bench.svg", out.display());
    Ok(())
}

fn parse_args() -> Result<(Settings, Vec<String>, std::path::PathBuf), String> {
    let mut settings = Settings {
        messages: 100_000,
        latency_rate: 1_000,
        latency_duration: Duration::from_secs(5),
        concurrency: 256,
        soak: Duration::ZERO,
    };
    let mut drivers = vec!["kafka".to_owned(), "rabbitmq".to_owned(), "nats".to_owned()];
    let mut out = std::path::PathBuf::from("target/bench");

    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--messages" => settings.messages = value()?.parse().map_err(|e| format!("{e}"))?,
            "--drivers" => drivers = value()?.split(',').map(str::to_owned).collect(),
            "--out" => out = value()?.into(),
            "--latency-seconds" => {
                settings.latency_duration =
                    Duration::from_secs(value()?.parse().map_err(|e| format!("{e}"))?)
            }
            "--soak-seconds" => {
                settings.soak = Duration::from_secs(value()?.parse().map_err(|e| format!("{e}"))?)
            }
            // `cargo bench` passes this to every bench target.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((settings, drivers, out))
}

/// Runs `native_side` and `broker_side` in turn, [`ROUNDS`] times each, and records the median
/// throughput of each.
pub(crate) async fn compare_throughput<B, N, BF, NF>(
    report: &mut Report,
    driver: &str,
    workload: &str,
    messages: usize,
    mut broker_side: B,
    mut native_side: N,
) -> Result<(), Box<dyn std::error::Error>>
where
    B: FnMut() -> BF,
    N: FnMut() -> NF,
    BF: Future<Output = Result<Duration, Box<dyn std::error::Error>>>,
    NF: Future<Output = Result<Duration, Box<dyn std::error::Error>>>,
{
    let rate = |elapsed: Duration| messages as f64 / elapsed.as_secs_f64();
    let (mut brokers, mut natives) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let native = rate(native_side().await?);
        let broker = rate(broker_side().await?);
        eprintln!("{driver} {workload} round {round}: broker {broker:.0}/s, native {native:.0}/s");
        brokers.push(broker);
        natives.push(native);
    }
    report.add(Figure::throughput(
        driver,
        workload,
        median(brokers),
        median(natives),
    ));
    Ok(())
}

/// Runs `native_side` and `broker_side` in turn, [`LATENCY_ROUNDS`] times each, and records
/// the median of each side's p50 and p99.
pub(crate) async fn compare_latency<B, N, BF, NF>(
    report: &mut Report,
    driver: &str,
    workload: &str,
    mut broker_side: B,
    mut native_side: N,
) -> Result<(), Box<dyn std::error::Error>>
where
    B: FnMut() -> BF,
    N: FnMut() -> NF,
    BF: Future<Output = Result<Histogram<u64>, Box<dyn std::error::Error>>>,
    NF: Future<Output = Result<Histogram<u64>, Box<dyn std::error::Error>>>,
{
    let (mut brokers, mut natives) = (Vec::new(), Vec::new());
    for round in 1..=LATENCY_ROUNDS {
        let native = native_side().await?;
        let broker = broker_side().await?;
        eprintln!(
            "{driver} {workload} round {round}: p50/p99 broker {}/{} µs, native {}/{} µs",
            broker.value_at_quantile(0.5),
            broker.value_at_quantile(0.99),
            native.value_at_quantile(0.5),
            native.value_at_quantile(0.99),
        );
        brokers.push(broker);
        natives.push(native);
    }
    for (name, quantile) in [("p50", 0.5), ("p99", 0.99)] {
        let at = |runs: &[Histogram<u64>]| {
            median(
                runs.iter()
                    .map(|run| run.value_at_quantile(quantile) as f64)
                    .collect(),
            )
        };
        report.add(Figure::latency(
            driver,
            &format!("{workload} {name}"),
            at(&brokers),
            at(&natives),
        ));
    }
    Ok(())
}

/// The middle value of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

/// Subscribes `group` to `topic`, where `messages` messages already wait for it, and returns
/// how long the handler took to get them all, timed from when the subscription was live.
pub(crate) async fn time_consume(
    provider: &dyn Provider,
    topic: &str,
    group: SubscribeOptions,
    messages: usize,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let handled = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (count, all) = (Arc::clone(&handled), Arc::clone(&done));
    let handler = move |_: Context, _: Message| {
        if count.fetch_add(1, Ordering::Relaxed) + 1 == messages {
            all.notify_one();
        }
        async { Ok::<(), broker::Error>(()) }
    };
    let subscription = provider
        .subscribe(&Context::new(), topic, group, Arc::new(handler))
        .await?;

    let start = Instant::now();
    done.notified().await;
    let elapsed = start.elapsed();
    subscription.stop().await;
    Ok(elapsed)
}

/// A benchmark message: the 256-byte body and one header.
pub(crate) fn message() -> Message {
    Message::new(bytes::Bytes::from_static(&BODY)).with_header("bench", "1")
}

/// Nanoseconds since the benchmark started, to time messages within this process.
pub(crate) fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Publishes to `topic` and consumes it in a new group for `settings.soak`, as fast as the
/// handler keeps up, sampling the resident memory every five seconds.
pub(crate) async fn soak(
    provider: &dyn Provider,
    driver: &str,
    topic: &str,
    settings: &Settings,
) -> Result<Soak, Box<dyn std::error::Error>> {
    let handled = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&handled);
    let handler = move |_: Context, _: Message| {
        count.fetch_add(1, Ordering::Relaxed);
        async { Ok::<(), broker::Error>(()) }
    };
    let subscription = provider
        .subscribe(&Context::new(), topic, new_group(), Arc::new(handler))
        .await?;

    let ctx = Context::new();
    let start = Instant::now();
    let mut samples = vec![(0, resident_kib())];
    let mut next_sample = Duration::from_secs(5);
    let mut published: usize = 0;
    while start.elapsed() < settings.soak {
        // Publishing pauses while the handler is far behind: the check is about memory that
        // would grow with the number of messages, not about a backlog that builds up when
        // publishes outrun the handler (core NATS buffers it in the subscriber).
        if published.saturating_sub(handled.load(Ordering::Relaxed)) > SOAK_BACKLOG {
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            futures_util::stream::iter(0..settings.concurrency)
                .map(|_| provider.publish(&ctx, topic, message()))
                .buffer_unordered(settings.concurrency)
                .try_collect::<()>()
                .await?;
            published += settings.concurrency;
        }
        if start.elapsed() >= next_sample {
            samples.push((next_sample.as_secs(), resident_kib()));
            next_sample += Duration::from_secs(5);
        }
    }
    subscription.stop().await;
    Ok(Soak {
        driver: driver.to_owned(),
        messages: handled.load(Ordering::Relaxed),
        samples,
    })
}

/// How many published messages a sustained run lets wait for the handler before it pauses.
const SOAK_BACKLOG: usize = 10_000;

/// The header that carries a message's send time ([`now_ns`]) in the latency workloads.
pub(crate) const SENT_HEADER: &str = "sent_ns";

/// A histogram of latencies in microseconds, up to a minute.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Records the time since `sent` (from [`now_ns`]) in `latencies`.
pub(crate) fn record(latencies: &Mutex<Histogram<u64>>, sent: Option<u64>) {
    if let Some(sent) = sent {
        let micros = now_ns().saturating_sub(sent) / 1_000;
        let _ = latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(micros.max(1));
    }
}

/// End-to-end latency through `broker`: a subscriber without a group on `topic`, and
/// publishes at the settings' fixed rate, each carrying its send time.
pub(crate) async fn latency_through(
    provider: Arc<dyn Provider>,
    topic: &str,
    settings: &Settings,
) -> Result<Histogram<u64>, Box<dyn std::error::Error>> {
    let latencies = Arc::new(Mutex::new(histogram()));
    let recorded = Arc::clone(&latencies);
    let handler = move |_: Context, message: Message| {
        let sent = message
            .header(SENT_HEADER)
            .and_then(|sent| sent.parse().ok());
        record(&recorded, sent);
        async { Ok::<(), broker::Error>(()) }
    };
    let subscription = provider
        .subscribe(
            &Context::new(),
            topic,
            SubscribeOptions::default(),
            Arc::new(handler),
        )
        .await?;

    paced(settings.latency_rate, settings.latency_duration, |_, _| {
        let provider = Arc::clone(&provider);
        let topic = topic.to_owned();
        async move {
            // Spawned, so a slow acknowledgement does not hold back the next send.
            tokio::spawn(async move {
                let message = message().with_header(SENT_HEADER, now_ns().to_string());
                let _ = provider.publish(&Context::new(), &topic, message).await;
            });
            Ok(())
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    subscription.stop().await;
    let histogram = latencies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(histogram)
}

/// A consumer group no earlier run used.
pub(crate) fn new_group() -> SubscribeOptions {
    SubscribeOptions::group(format!("bench-{}", uuid::Uuid::now_v7().simple()))
}

/// The process's resident memory now, in KiB.
pub(crate) fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Sends at `rate` per second for `duration`, calling `send(sequence, sent_at)`, and returns
/// how many were sent.
pub(crate) async fn paced<F, Fut>(
    rate: u32,
    duration: Duration,
    mut send: F,
) -> Result<usize, Box<dyn std::error::Error>>
where
    F: FnMut(usize, Instant) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    let interval = Duration::from_secs(1) / rate.max(1);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < duration {
        let due = start + interval * u32::try_from(sent).unwrap_or(u32::MAX);
        tokio::time::sleep_until(due.into()).await;
        send(sent, Instant::now()).await?;
        sent += 1;
    }
    Ok(sent)
}
