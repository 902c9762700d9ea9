//! Subscribing: reading partitions in order, handling each record, committing offsets after the
//! handler succeeded, and following the consumer group through rebalances.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use rskafka::client::error::{Error as ClientError, ProtocolError};
use rskafka::client::partition::{OffsetAt, PartitionClient};
use rskafka::record::RecordAndOffset;
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::group::{GroupError, Member};
use super::producer::{partition_client, partition_counts};
use super::record::{take_body, to_message};
use super::{DRIVER, Shared};
use crate::config::{KafkaConfig, StartOffset};
use crate::error::BoxError;
use crate::handler::{Dispatcher, Outcome};
use crate::message::Message;
use crate::propagation;

/// On a dead-lettered record: the partition it was read from.
pub const DEAD_LETTER_PARTITION_HEADER: &str = "dead_letter_partition";
/// On a dead-lettered record: its offset in that partition.
pub const DEAD_LETTER_OFFSET_HEADER: &str = "dead_letter_offset";

/// The longest wait between two attempts to reach a broker again.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

/// Reads one topic for one subscription, as a group member or on its own.
pub(crate) struct Consumer {
    shared: Arc<Shared>,
    topic: String,
    dispatcher: Dispatcher,
    dead_letter_topic: Option<String>,
    partitions: HashMap<i32, Arc<PartitionClient>>,
}

/// Where each assigned partition starts: (partition, next offset to read).
type Positions = Vec<(i32, i64)>;

impl Consumer {
    pub(crate) fn new(shared: Arc<Shared>, topic: &str, dispatcher: Dispatcher) -> Self {
        let template = &shared.config.dead_letter_topic;
        let dead_letter_topic = (!template.is_empty()).then(|| template.replace("{topic}", topic));
        Consumer {
            shared,
            topic: topic.to_owned(),
            dispatcher,
            dead_letter_topic,
            partitions: HashMap::new(),
        }
    }

    /// The positions of a subscriber without a group: every partition, from its end now.
    pub(crate) async fn positions_alone(&mut self, count: i32) -> Result<Positions, BoxError> {
        let mut positions = Vec::new();
        for partition in 0..count {
            let client = self.partition(partition).await?;
            positions.push((partition, client.get_offset(OffsetAt::Latest).await?));
        }
        Ok(positions)
    }

    /// Joins the group and finds where each assigned partition starts.
    ///
    /// A partition without a committed offset starts at `start_offset`, and that position is
    /// committed at once, so whichever member reads the partition next starts there too.
    pub(crate) async fn join(&mut self, member: &mut Member) -> Result<Positions, BoxError> {
        let client = Arc::clone(&self.shared.client);
        let partitions = member
            .join(|topics| async move {
                partition_counts(&client, &topics)
                    .await
                    .map_err(|error| error.to_string())
            })
            .await?;
        let committed = member.committed(&partitions).await?;

        let mut positions = Vec::new();
        let mut fresh = Vec::new();
        for partition in partitions {
            let offset = match committed.get(&partition) {
                Some(offset) => *offset,
                None => {
                    let offset = self.start_of(partition).await?;
                    fresh.push((partition, offset));
                    offset
                }
            };
            positions.push((partition, offset));
        }
        if !fresh.is_empty() {
            member.commit(&fresh).await?;
        }

        tracing::info!(
            connection = %self.shared.name,
            driver = %DRIVER,
            topic = %self.topic,
            group = member.group(),
            generation = member.generation(),
            partitions = ?positions.iter().map(|(partition, _)| partition).collect::<Vec<_>>(),
            "joined the consumer group"
        );
        Ok(positions)
    }

    /// Reads until `stop` fires, without a group: nothing is committed.
    pub(crate) async fn run_alone(mut self, positions: Positions, stop: CancellationToken) {
        let readers = self.readers(&positions, None, &stop).await;
        run_all(readers).await;
    }

    /// Reads as a group member until `stop` fires, joining again after every rebalance, then
    /// leaves the group.
    pub(crate) async fn run_in_group(
        mut self,
        member: Member,
        mut positions: Positions,
        stop: CancellationToken,
    ) {
        let member = Arc::new(Mutex::new(member));
        loop {
            let generation = stop.child_token();
            let heartbeat = tokio::spawn(heartbeat(
                Arc::clone(&member),
                self.shared.config.heartbeat_interval,
                generation.clone(),
            ));

            let handled = Arc::new(Handled::default());
            let readers = self.readers(&positions, Some(&handled), &generation).await;
            let readers_done = CancellationToken::new();
            let committer = commit_handled(
                Arc::clone(&self.shared),
                self.topic.clone(),
                Arc::clone(&member),
                handled,
                readers_done.clone(),
                generation.clone(),
            );
            // The committer ends once the readers have ended and what they handled is
            // committed, so joining again or leaving sees every commit.
            tokio::join!(
                async {
                    run_all(readers).await;
                    readers_done.cancel();
                },
                committer
            );
            generation.cancelled().await;
            // The heartbeat ends at its next step; waiting for it keeps a request from being
            // cut off half-way on the coordinator connection.
            let _ = heartbeat.await;

            if stop.is_cancelled() {
                break;
            }
            match self.rejoin(&member, &stop).await {
                Some(next) => positions = next,
                None => break,
            }
        }

        let mut member = member.lock().await;
        match member.leave().await {
            Ok(()) => tracing::info!(
                connection = %self.shared.name,
                driver = %DRIVER,
                topic = %self.topic,
                group = member.group(),
                "left the consumer group"
            ),
            Err(error) => tracing::warn!(
                connection = %self.shared.name,
                driver = %DRIVER,
                group = member.group(),
                error = %error,
                "could not leave the consumer group; the coordinator will drop the member"
            ),
        }
    }

    /// Joins again after a rebalance, retrying with capped backoff; `None` once `stop` fired.
    async fn rejoin(
        &mut self,
        member: &Mutex<Member>,
        stop: &CancellationToken,
    ) -> Option<Positions> {
        let mut attempt = 0;
        loop {
            let joined = {
                let mut member = member.lock().await;
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    joined = self.join(&mut member) => joined,
                }
            };
            match joined {
                Ok(positions) => return Some(positions),
                Err(error) => {
                    attempt += 1;
                    let delay = reconnect_delay(attempt);
                    tracing::info!(
                        connection = %self.shared.name,
                        driver = %DRIVER,
                        topic = %self.topic,
                        attempt,
                        delay = ?delay,
                        error = %error,
                        "joining the consumer group failed; trying again"
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn readers(
        &mut self,
        positions: &Positions,
        handled: Option<&Arc<Handled>>,
        stop: &CancellationToken,
    ) -> Vec<impl Future<Output = ()> + use<>> {
        let mut readers = Vec::new();
        for (partition, offset) in positions {
            match self.partition(*partition).await {
                Ok(client) => readers.push(read_partition(
                    Arc::clone(&self.shared),
                    self.topic.clone(),
                    self.dispatcher.clone(),
                    self.dead_letter_topic.clone(),
                    client,
                    *offset,
                    handled.cloned(),
                    stop.clone(),
                )),
                Err(error) => {
                    // Without this partition the member cannot do its share; joining again
                    // gets a fresh start.
                    tracing::warn!(
                        connection = %self.shared.name,
                        driver = %DRIVER,
                        topic = %self.topic,
                        partition,
                        error = %error,
                        "cannot reach the partition's leader"
                    );
                    stop.cancel();
                }
            }
        }
        readers
    }

    async fn partition(&mut self, partition: i32) -> Result<Arc<PartitionClient>, ClientError> {
        if let Some(client) = self.partitions.get(&partition) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(partition_client(&self.shared.client, &self.topic, partition).await?);
        self.partitions.insert(partition, Arc::clone(&client));
        Ok(client)
    }

    async fn start_of(&mut self, partition: i32) -> Result<i64, ClientError> {
        let at = match self.shared.config.start_offset {
            StartOffset::Earliest => OffsetAt::Earliest,
            StartOffset::Latest => OffsetAt::Latest,
        };
        self.partition(partition).await?.get_offset(at).await
    }
}

/// Runs each partition's reader as a task of its own, so partitions are handled in parallel,
/// and waits for all of them. Dropping this stops them; a reader's panic goes on to the
/// caller.
async fn run_all(readers: Vec<impl Future<Output = ()> + Send + 'static>) {
    let mut tasks = JoinSet::new();
    for reader in readers {
        tasks.spawn(reader);
    }
    while let Some(ended) = tasks.join_next().await {
        forward_panic(ended);
    }
}

/// Lets a task's panic unwind on in the task that waited for it, as if it had run there.
fn forward_panic(ended: Result<(), JoinError>) {
    if let Err(error) = ended
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// The offsets (next to read) after the records handled in one generation and not yet
/// committed, per partition: the readers fill it and the committer drains it.
#[derive(Default)]
struct Handled {
    offsets: std::sync::Mutex<HashMap<i32, i64>>,
    added: Notify,
}

impl Handled {
    fn add(&self, partition: i32, offset: i64) {
        self.offsets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(partition, offset);
        self.added.notify_one();
    }

    fn take(&self) -> Vec<(i32, i64)> {
        self.offsets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect()
    }
}

/// Commits the offsets the readers of one generation hand over, every partition's in one
/// request, until `readers_done` fires and all they handled is committed. The readers do not
/// wait for a commit: what they handle while one is in flight goes with the next. A commit the
/// coordinator refuses because the group is rebalancing ends the generation.
async fn commit_handled(
    shared: Arc<Shared>,
    topic: String,
    member: Arc<Mutex<Member>>,
    handled: Arc<Handled>,
    readers_done: CancellationToken,
    generation: CancellationToken,
) {
    loop {
        // Read before taking: once the readers are done, nothing is added after the take.
        let finished = readers_done.is_cancelled();
        let offsets = handled.take();
        if offsets.is_empty() {
            if finished {
                return;
            }
            tokio::select! {
                _ = handled.added.notified() => {}
                _ = readers_done.cancelled() => {}
            }
            continue;
        }

        let committed = member.lock().await.commit(&offsets).await;
        if let Err(error) = committed {
            log_commit_failure(&shared, &topic, &offsets, &error);
            if error.needs_rejoin() {
                generation.cancel();
            }
        }
    }
}

/// Heartbeats until the generation ends; a rebalance or an eviction ends it.
async fn heartbeat(member: Arc<Mutex<Member>>, interval: Duration, generation: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = generation.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let mut member = member.lock().await;
        match member.heartbeat().await {
            Ok(()) => {}
            Err(error) if error.needs_rejoin() => {
                tracing::info!(group = member.group(), reason = %error, "the consumer group is rebalancing");
                generation.cancel();
                return;
            }
            Err(error) => {
                tracing::warn!(group = member.group(), error = %error, "heartbeat failed");
            }
        }
    }
}

/// Reads one partition in order until `stop` fires, handling each record and handing the offset
/// after the handled records to the committer after each fetched batch. The next batch is
/// fetched (and decoded, which costs about as much as handling) by a task of its own while the
/// current one is handled, so at most two batches of the partition are in memory.
#[allow(clippy::too_many_arguments)]
async fn read_partition(
    shared: Arc<Shared>,
    topic: String,
    dispatcher: Dispatcher,
    dead_letter_topic: Option<String>,
    client: Arc<PartitionClient>,
    mut offset: i64,
    handled: Option<Arc<Handled>>,
    stop: CancellationToken,
) {
    let partition = client.partition();
    let (batches, mut fetched) = mpsc::channel(1);
    let fetching = stop.child_token();
    let fetcher = AbortOnDropHandle::new(tokio::spawn(fetch_batches(
        Arc::clone(&shared),
        topic.clone(),
        Arc::clone(&client),
        offset,
        fetching.clone(),
        batches,
    )));

    let handler = async {
        let mut handed_over = offset;
        loop {
            let records = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                batch = fetched.recv() => match batch {
                    Some(records) => records,
                    None => break,
                },
            };

            let mut interrupted = false;
            for mut record in records {
                if record.offset < offset {
                    continue;
                }
                if stop.is_cancelled() {
                    interrupted = true;
                    break;
                }
                let record_offset = record.offset;
                // The record's value and headers move into the message without a copy: the
                // first attempt nearly always succeeds, and a retry reads the record again.
                let body = take_body(&mut record);
                let message = to_message(&topic, partition, record, body);
                let done = match dispatcher.attempt(message, 1).await {
                    Ok(()) => true,
                    // Boxed: reading the record again and the retries would otherwise weigh
                    // on every record's future.
                    Err(error) => {
                        let failed = FailedRecord {
                            client: &client,
                            offset: record_offset,
                            error,
                        };
                        let retry = retry_record(
                            &shared,
                            &topic,
                            &dispatcher,
                            dead_letter_topic.as_deref(),
                            failed,
                            &stop,
                        );
                        Box::pin(retry).await
                    }
                };
                if !done {
                    interrupted = true;
                    break;
                }
                offset = record_offset + 1;
            }

            if let Some(handled) = &handled
                && offset > handed_over
            {
                handled.add(partition, offset);
                handed_over = offset;
            }
            if interrupted {
                break;
            }
        }
        fetching.cancel();
    };

    handler.await;
    forward_panic(fetcher.await);
}

/// Fetches batches of records from `offset` on and sends them to `batches` until `stop`
/// fires, retrying failed fetches with capped backoff.
async fn fetch_batches(
    shared: Arc<Shared>,
    topic: String,
    client: Arc<PartitionClient>,
    mut offset: i64,
    stop: CancellationToken,
    batches: mpsc::Sender<Vec<RecordAndOffset>>,
) {
    let topic = topic.as_str();
    let partition = client.partition();
    let config = &shared.config;
    let max_wait = max_wait_millis(config);
    let mut failures = 0;

    while !stop.is_cancelled() {
        let fetched = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            fetched = client.fetch_records(offset, 1..config.fetch_max_bytes, max_wait) => fetched,
        };
        let records = match fetched {
            Ok((records, _high_watermark)) => {
                failures = 0;
                records
            }
            Err(ClientError::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            }) => {
                let at = match config.start_offset {
                    StartOffset::Earliest => OffsetAt::Earliest,
                    StartOffset::Latest => OffsetAt::Latest,
                };
                if let Ok(reset) = client.get_offset(at).await {
                    tracing::warn!(
                        topic,
                        partition,
                        offset,
                        reset,
                        "offset out of range; starting over"
                    );
                    offset = reset;
                }
                continue;
            }
            Err(error) => {
                failures += 1;
                let delay = fetch_failed(&shared, topic, partition, failures, &error);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };

        let Some(last) = records.last() else {
            continue;
        };
        offset = last.offset + 1;
        tokio::select! {
            _ = stop.cancelled() => break,
            sent = batches.send(records) => if sent.is_err() { break },
        }
    }
}

/// A record whose handler failed on its first attempt.
struct FailedRecord<'a> {
    client: &'a PartitionClient,
    offset: i64,
    error: BoxError,
}

/// Retries a record whose first attempt failed, and dead-letters it when every attempt fails;
/// whether the record is done with: handled, dead-lettered, or gone from the log.
///
/// The first attempt took the record's contents, so the retries read it again from the log.
/// A failed first attempt is rare; keeping a copy of every record in case of one cost each
/// record its headers and body twice.
async fn retry_record(
    shared: &Shared,
    topic: &str,
    dispatcher: &Dispatcher,
    dead_letter_topic: Option<&str>,
    failed: FailedRecord<'_>,
    stop: &CancellationToken,
) -> bool {
    let FailedRecord {
        client,
        offset,
        error,
    } = failed;
    let partition = client.partition();
    let mut record = match read_again(shared, topic, client, offset, stop).await {
        Reread::Found(record) => record,
        Reread::Gone => {
            tracing::error!(
                connection = %shared.name,
                driver = %DRIVER,
                topic,
                partition,
                offset,
                error = %error,
                "handler failed and the record is no longer in the log (retention or \
                 compaction removed it): it is not retried"
            );
            return true;
        }
        Reread::Stopped => return false,
    };

    let body = take_body(&mut record);
    let delivered = || to_message(topic, partition, record.clone(), body.clone());
    match dispatcher.retry_after(&delivered, error, stop).await {
        Outcome::Handled => true,
        Outcome::Failed { error, attempts } => {
            let dead = dead_letter(&delivered(), topic, partition, offset, &error, attempts);
            send_dead_letter(shared, dead_letter_topic, dead, stop).await
        }
        Outcome::Interrupted => false,
    }
}

/// What reading one record again found.
enum Reread {
    Found(RecordAndOffset),
    /// The log no longer holds the offset.
    Gone,
    /// The subscription is stopping.
    Stopped,
}

/// Fetches the record at `offset` again, retrying failed fetches with capped backoff.
async fn read_again(
    shared: &Shared,
    topic: &str,
    client: &PartitionClient,
    offset: i64,
    stop: &CancellationToken,
) -> Reread {
    let max_wait = max_wait_millis(&shared.config);
    let mut failures = 0;
    loop {
        let fetched = tokio::select! {
            biased;
            _ = stop.cancelled() => return Reread::Stopped,
            fetched = client.fetch_records(offset, 1..shared.config.fetch_max_bytes, max_wait) => {
                fetched
            }
        };
        match fetched {
            // A fetch returns whole batches, which may start before the offset.
            Ok((records, _high_watermark)) => {
                return records
                    .into_iter()
                    .find(|record| record.offset == offset)
                    .map_or(Reread::Gone, Reread::Found);
            }
            Err(ClientError::ServerError {
                protocol_error: ProtocolError::OffsetOutOfRange,
                ..
            }) => return Reread::Gone,
            Err(error) => {
                failures += 1;
                let delay = fetch_failed(shared, topic, client.partition(), failures, &error);
                tokio::select! {
                    _ = stop.cancelled() => return Reread::Stopped,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The configured fetch wait, in the milliseconds a fetch request takes.
fn max_wait_millis(config: &KafkaConfig) -> i32 {
    i32::try_from(config.fetch_max_wait.as_millis()).unwrap_or(i32::MAX)
}

/// Logs the failed fetch number `failures` in a row and returns how long to wait before the
/// next.
fn fetch_failed(
    shared: &Shared,
    topic: &str,
    partition: i32,
    failures: u32,
    error: &ClientError,
) -> Duration {
    let delay = reconnect_delay(failures);
    tracing::warn!(
        connection = %shared.name,
        driver = %DRIVER,
        topic,
        partition,
        attempt = failures,
        delay = ?delay,
        error = %error,
        "fetch failed; trying again"
    );
    delay
}

fn log_commit_failure(shared: &Shared, topic: &str, offsets: &[(i32, i64)], error: &GroupError) {
    tracing::warn!(
        connection = %shared.name,
        driver = %DRIVER,
        topic,
        offsets = ?offsets,
        error = %error,
        "offset commit failed; records after the last commit will be delivered again"
    );
}

fn dead_letter(
    message: &Message,
    topic: &str,
    partition: i32,
    offset: i64,
    error: &BoxError,
    attempts: u32,
) -> Message {
    let mut dead = propagation::dead_letter(message, topic, &error.to_string(), attempts);
    dead.set_header(DEAD_LETTER_PARTITION_HEADER, partition.to_string());
    dead.set_header(DEAD_LETTER_OFFSET_HEADER, offset.to_string());
    dead
}

/// Publishes a dead letter, retrying until it is stored or `stop` fires; whether it was
/// stored (or dead-lettering is off, which is logged).
async fn send_dead_letter(
    shared: &Shared,
    target: Option<&str>,
    dead: Message,
    stop: &CancellationToken,
) -> bool {
    let Some(target) = target else {
        tracing::error!(
            connection = %shared.name,
            driver = %DRIVER,
            message_id = %dead.id,
            "handler failed on every attempt and no dead-letter topic is set: record skipped"
        );
        return true;
    };

    let mut attempt = 0;
    loop {
        match shared.producer.send(target, &dead).await {
            Ok(_) => {
                tracing::warn!(
                    connection = %shared.name,
                    driver = %DRIVER,
                    dead_letter_topic = target,
                    message_id = %dead.id,
                    "message dead-lettered"
                );
                return true;
            }
            Err(error) => {
                attempt += 1;
                let delay = reconnect_delay(attempt);
                tracing::warn!(
                    connection = %shared.name,
                    driver = %DRIVER,
                    dead_letter_topic = target,
                    attempt,
                    error = %error,
                    "dead-lettering failed; trying again"
                );
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// 100 ms doubling per attempt, at most [`MAX_RECONNECT_DELAY`].
pub(crate) fn reconnect_delay(attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(16);
    Duration::from_millis(100u64 << exponent).min(MAX_RECONNECT_DELAY)
}
