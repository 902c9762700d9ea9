//! Membership of a Kafka consumer group, spoken to the group coordinator: join, sync, heartbeat,
//! fetch and commit offsets, leave.
//!
//! Members use the standard `consumer` protocol type with the `range` or `roundrobin`
//! assignor, so members of other Kafka clients can share a group with ours.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedPartitions;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, FindCoordinatorRequest, GroupId,
    HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, OffsetCommitRequest, OffsetFetchRequest,
    SyncGroupRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::tls::ClientTls;
use super::wire::{Connection, WireError};
use crate::config::{Assignor, KafkaSasl};

/// What went wrong in the group protocol.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GroupError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{operation} for group `{group}` failed: {error}")]
    Kafka {
        operation: &'static str,
        group: String,
        error: ResponseError,
    },
    #[error("group `{group}`: {message}")]
    Protocol { group: String, message: String },
}

impl GroupError {
    /// Whether the member must join the group again before it can go on.
    pub(crate) fn needs_rejoin(&self) -> bool {
        matches!(
            self,
            GroupError::Kafka {
                error: ResponseError::RebalanceInProgress
                    | ResponseError::IllegalGeneration
                    | ResponseError::UnknownMemberId
                    | ResponseError::FencedInstanceId,
                ..
            }
        )
    }

    /// Whether the coordinator moved or went away, so it must be looked up again.
    fn lost_coordinator(&self) -> bool {
        matches!(
            self,
            GroupError::Wire(_)
                | GroupError::Kafka {
                    error: ResponseError::NotCoordinator
                        | ResponseError::CoordinatorNotAvailable
                        | ResponseError::CoordinatorLoadInProgress,
                    ..
                }
        )
    }
}

/// How a member talks to its coordinator.
#[derive(Debug, Clone)]
pub(crate) struct GroupSettings {
    pub(crate) bootstrap: Vec<String>,
    pub(crate) client_id: String,
    pub(crate) session_timeout: Duration,
    pub(crate) rebalance_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) assignor: Assignor,
    pub(crate) sasl: Option<KafkaSasl>,
    pub(crate) tls: Option<ClientTls>,
}

/// One member of one group, subscribed to one topic.
pub(crate) struct Member {
    group: String,
    topic: String,
    settings: GroupSettings,
    member_id: String,
    generation: i32,
    coordinator: Option<Connection>,
}

/// The partitions of one topic for each topic that members of a group subscribe to.
pub(crate) type PartitionCounts = HashMap<String, i32>;

impl Member {
    pub(crate) fn new(group: &str, topic: &str, settings: GroupSettings) -> Self {
        Member {
            group: group.to_owned(),
            topic: topic.to_owned(),
            settings,
            member_id: String::new(),
            generation: -1,
            coordinator: None,
        }
    }

    pub(crate) fn group(&self) -> &str {
        &self.group
    }

    pub(crate) fn generation(&self) -> i32 {
        self.generation
    }

    /// Joins the group (or joins again after a rebalance) and returns this member's partitions
    /// of its topic. The leader asks `counts` for the partition counts of every subscribed topic.
    pub(crate) async fn join<F, Fut>(&mut self, counts: F) -> Result<Vec<i32>, GroupError>
    where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = Result<PartitionCounts, String>>,
    {
        let joined = loop {
            match self.join_once().await {
                Ok(joined) => break joined,
                Err(JoinStep::MemberIdRequired(member_id)) => self.member_id = member_id,
                Err(JoinStep::Failed(error)) => {
                    if matches!(
                        &error,
                        GroupError::Kafka {
                            error: ResponseError::UnknownMemberId,
                            ..
                        }
                    ) {
                        self.member_id.clear();
                    }
                    self.forget_coordinator_if(&error);
                    return Err(error);
                }
            }
        };
        self.member_id = joined.member_id.to_string();
        self.generation = joined.generation_id;

        let assignments = if joined.leader == joined.member_id {
            let members = decode_members(&self.group, &joined.members)?;
            let mut topics: Vec<String> = members.values().flatten().cloned().collect();
            topics.sort();
            topics.dedup();
            let counts = counts(topics)
                .await
                .map_err(|message| GroupError::Protocol {
                    group: self.group.clone(),
                    message: format!("cannot read partition counts: {message}"),
                })?;
            assign(self.settings.assignor, &members, &counts)
        } else {
            BTreeMap::new()
        };

        let assignment = self.sync(assignments).await?;
        Ok(assignment
            .assigned_partitions
            .into_iter()
            .filter(|assigned| assigned.topic.0.as_str() == self.topic)
            .flat_map(|assigned| assigned.partitions)
            .collect())
    }

    async fn join_once(&mut self) -> Result<kafka_protocol::messages::JoinGroupResponse, JoinStep> {
        let subscription = encode_versioned(
            &ConsumerProtocolSubscription::default()
                .with_topics(vec![StrBytes::from_string(self.topic.clone())]),
        );
        let request = JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(self.group.clone())))
            .with_session_timeout_ms(millis(self.settings.session_timeout))
            .with_rebalance_timeout_ms(millis(self.settings.rebalance_timeout))
            .with_member_id(StrBytes::from_string(self.member_id.clone()))
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![
                JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str(assignor_name(
                        self.settings.assignor,
                    )))
                    .with_metadata(subscription),
            ]);
        // The coordinator holds a join until every member has joined, up to the rebalance
        // timeout.
        let timeout = self.settings.rebalance_timeout + self.settings.request_timeout;
        let group = self.group.clone();
        let connection = self.coordinator().await.map_err(JoinStep::Failed)?;
        let version = connection
            .version::<JoinGroupRequest>(4..=7)
            .map_err(|e| JoinStep::Failed(e.into()))?;
        let response = connection
            .send(&request, version, timeout)
            .await
            .map_err(|e| JoinStep::Failed(e.into()))?;

        match ResponseError::try_from_code(response.error_code) {
            None => Ok(response),
            Some(ResponseError::MemberIdRequired) => {
                Err(JoinStep::MemberIdRequired(response.member_id.to_string()))
            }
            Some(error) => Err(JoinStep::Failed(GroupError::Kafka {
                operation: "JoinGroup",
                group,
                error,
            })),
        }
    }

    async fn sync(
        &mut self,
        assignments: BTreeMap<String, Vec<(String, Vec<i32>)>>,
    ) -> Result<ConsumerProtocolAssignment, GroupError> {
        let assignments = assignments
            .into_iter()
            .map(|(member_id, topics)| {
                let assignment = ConsumerProtocolAssignment::default().with_assigned_partitions(
                    topics
                        .into_iter()
                        .map(|(topic, partitions)| {
                            AssignedPartitions::default()
                                .with_topic(TopicName(StrBytes::from_string(topic)))
                                .with_partitions(partitions)
                        })
                        .collect(),
                );
                SyncGroupRequestAssignment::default()
                    .with_member_id(StrBytes::from_string(member_id))
                    .with_assignment(encode_versioned(&assignment))
            })
            .collect();
        let request = SyncGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(self.group.clone())))
            .with_generation_id(self.generation)
            .with_member_id(StrBytes::from_string(self.member_id.clone()))
            .with_assignments(assignments);
        let timeout = self.settings.rebalance_timeout + self.settings.request_timeout;

        let response = self
            .call("SyncGroup", 3..=4, &request, timeout, |r| r.error_code)
            .await?;
        decode_assignment(&self.group, response.assignment)
    }

    /// Tells the coordinator this member is alive. An error that
    /// [`needs_rejoin`](GroupError::needs_rejoin) means a rebalance started.
    pub(crate) async fn heartbeat(&mut self) -> Result<(), GroupError> {
        let request = HeartbeatRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(self.group.clone())))
            .with_generation_id(self.generation)
            .with_member_id(StrBytes::from_string(self.member_id.clone()));
        let timeout = self.settings.request_timeout;
        self.call("Heartbeat", 1..=4, &request, timeout, |r| r.error_code)
            .await
            .map(drop)
    }

    /// The committed offsets of `partitions` of the member's topic; partitions without one
    /// are left out.
    pub(crate) async fn committed(
        &mut self,
        partitions: &[i32],
    ) -> Result<HashMap<i32, i64>, GroupError> {
        let request = OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(self.group.clone())))
            .with_topics(Some(vec![
                OffsetFetchRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_string(self.topic.clone())))
                    .with_partition_indexes(partitions.to_vec()),
            ]));
        let timeout = self.settings.request_timeout;
        let response = self
            .call("OffsetFetch", 1..=7, &request, timeout, |r| r.error_code)
            .await?;

        let mut offsets = HashMap::new();
        for topic in response.topics {
            for partition in topic.partitions {
                if let Some(error) = ResponseError::try_from_code(partition.error_code) {
                    return Err(self.kafka_error("OffsetFetch", error));
                }
                if partition.committed_offset >= 0 {
                    offsets.insert(partition.partition_index, partition.committed_offset);
                }
            }
        }
        Ok(offsets)
    }

    /// Commits `offsets` (partition, next offset to read) of the member's topic.
    pub(crate) async fn commit(&mut self, offsets: &[(i32, i64)]) -> Result<(), GroupError> {
        let partitions = offsets
            .iter()
            .map(|(partition, offset)| {
                OffsetCommitRequestPartition::default()
                    .with_partition_index(*partition)
                    .with_committed_offset(*offset)
            })
            .collect();
        let request = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(self.group.clone())))
            .with_generation_id_or_member_epoch(self.generation)
            .with_member_id(StrBytes::from_string(self.member_id.clone()))
            .with_topics(vec![
                OffsetCommitRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_string(self.topic.clone())))
                    .with_partitions(partitions),
            ]);
        let timeout = self.settings.request_timeout;
        let response = self
            .call("OffsetCommit", 2..=8, &request, timeout, |_| 0)
            .await?;

        let failed = response
            .topics
            .iter()
            .flat_map(|topic| &topic.partitions)
            .find_map(|partition| ResponseError::try_from_code(partition.error_code));
        match failed {
            Some(error) => Err(self.kafka_error("OffsetCommit", error)),
            None => Ok(()),
        }
    }

    /// Leaves the group, so its partitions move to the other members at once.
    pub(crate) async fn leave(&mut self) -> Result<(), GroupError> {
        if self.member_id.is_empty() {
            return Ok(());
        }
        let mut request = LeaveGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(self.group.clone())));
        let member_id = StrBytes::from_string(self.member_id.clone());
        let version = self
            .coordinator()
            .await?
            .version::<LeaveGroupRequest>(0..=4)?;
        if version >= 3 {
            request.members = vec![MemberIdentity::default().with_member_id(member_id)];
        } else {
            request.member_id = member_id;
        }
        let timeout = self.settings.request_timeout;
        let result = self
            .call("LeaveGroup", version..=version, &request, timeout, |r| {
                r.error_code
            })
            .await;
        self.member_id.clear();
        self.generation = -1;
        result.map(drop)
    }

    /// Sends `request` to the coordinator and checks the error code `code` reads off the
    /// response.
    async fn call<R: kafka_protocol::protocol::Request>(
        &mut self,
        operation: &'static str,
        versions: std::ops::RangeInclusive<i16>,
        request: &R,
        timeout: Duration,
        code: impl FnOnce(&R::Response) -> i16,
    ) -> Result<R::Response, GroupError> {
        let result = async {
            let connection = self.coordinator().await?;
            let version = connection.version::<R>(versions)?;
            let response = connection.send(request, version, timeout).await?;
            match ResponseError::try_from_code(code(&response)) {
                None => Ok(response),
                Some(error) => Err(self.kafka_error(operation, error)),
            }
        }
        .await;
        if let Err(error) = &result {
            self.forget_coordinator_if(error);
        }
        result
    }

    /// The connection to the group's coordinator, looked up and opened when there is none.
    async fn coordinator(&mut self) -> Result<&mut Connection, GroupError> {
        if self.coordinator.is_none() {
            let address = self.find_coordinator().await?;
            let settings = &self.settings;
            let connection = Connection::open(
                &address,
                &settings.client_id,
                settings.sasl.as_ref(),
                settings.tls.as_ref(),
                settings.request_timeout,
            )
            .await?;
            tracing::debug!(group = %self.group, coordinator = %address, "found the group coordinator");
            self.coordinator = Some(connection);
        }
        self.coordinator
            .as_mut()
            .ok_or_else(|| GroupError::Protocol {
                group: self.group.clone(),
                message: "no coordinator connection".to_owned(),
            })
    }

    /// Asks the bootstrap brokers, in turn, which broker coordinates the group.
    async fn find_coordinator(&self) -> Result<String, GroupError> {
        let request = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(self.group.clone()))
            .with_key_type(0);
        let timeout = self.settings.request_timeout;
        let mut last_error = None;
        for broker in &self.settings.bootstrap {
            let answer = async {
                let mut connection = Connection::open(
                    broker,
                    &self.settings.client_id,
                    self.settings.sasl.as_ref(),
                    self.settings.tls.as_ref(),
                    timeout,
                )
                .await?;
                let version = connection.version::<FindCoordinatorRequest>(1..=3)?;
                let response = connection.send(&request, version, timeout).await?;
                match ResponseError::try_from_code(response.error_code) {
                    None => Ok(format!("{}:{}", response.host, response.port)),
                    Some(error) => Err(self.kafka_error("FindCoordinator", error)),
                }
            }
            .await;
            match answer {
                Ok(address) => return Ok(address),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| GroupError::Protocol {
            group: self.group.clone(),
            message: "no bootstrap broker".to_owned(),
        }))
    }

    fn forget_coordinator_if(&mut self, error: &GroupError) {
        if error.lost_coordinator() {
            self.coordinator = None;
        }
    }

    fn kafka_error(&self, operation: &'static str, error: ResponseError) -> GroupError {
        GroupError::Kafka {
            operation,
            group: self.group.clone(),
            error,
        }
    }
}

enum JoinStep {
    MemberIdRequired(String),
    Failed(GroupError),
}

fn assignor_name(assignor: Assignor) -> &'static str {
    match assignor {
        Assignor::Range => "range",
        Assignor::Roundrobin => "roundrobin",
    }
}

fn millis(duration: Duration) -> i32 {
    i32::try_from(duration.as_millis()).unwrap_or(i32::MAX)
}

/// Encodes an embedded consumer-protocol message as version 0, behind its version number, as
/// every Kafka client can read it.
fn encode_versioned<M: Encodable>(message: &M) -> Bytes {
    let mut buffer = BytesMut::new();
    buffer.put_i16(0);
    // Encoding a version-0 message of plain strings and integers cannot fail.
    let _ = message.encode(&mut buffer, 0);
    buffer.freeze()
}

fn decode_versioned<M: Decodable>(group: &str, mut bytes: Bytes) -> Result<M, GroupError> {
    let malformed = |message: String| GroupError::Protocol {
        group: group.to_owned(),
        message,
    };
    if bytes.remaining() < 2 {
        return Err(malformed("empty consumer protocol message".to_owned()));
    }
    // Newer versions only add fields at the end, so reading as at most version 3 is safe.
    let version = bytes.get_i16().clamp(0, 3);
    M::decode(&mut bytes, version).map_err(|error| malformed(error.to_string()))
}

/// Each member's subscribed topics, by member id.
fn decode_members(
    group: &str,
    members: &[kafka_protocol::messages::join_group_response::JoinGroupResponseMember],
) -> Result<BTreeMap<String, Vec<String>>, GroupError> {
    members
        .iter()
        .map(|member| {
            let subscription: ConsumerProtocolSubscription =
                decode_versioned(group, member.metadata.clone())?;
            let topics = subscription
                .topics
                .iter()
                .map(ToString::to_string)
                .collect();
            Ok((member.member_id.to_string(), topics))
        })
        .collect()
}

fn decode_assignment(group: &str, bytes: Bytes) -> Result<ConsumerProtocolAssignment, GroupError> {
    if bytes.is_empty() {
        // A member the leader gave nothing gets an empty assignment.
        return Ok(ConsumerProtocolAssignment::default());
    }
    decode_versioned(group, bytes)
}

/// Shares each topic's partitions among the members subscribed to it: the result maps every
/// member to its (topic, partitions).
pub(crate) fn assign(
    assignor: Assignor,
    members: &BTreeMap<String, Vec<String>>,
    counts: &PartitionCounts,
) -> BTreeMap<String, Vec<(String, Vec<i32>)>> {
    let mut result: BTreeMap<String, Vec<(String, Vec<i32>)>> = members
        .keys()
        .map(|member| (member.clone(), Vec::new()))
        .collect();
    let mut topics: Vec<&String> = members.values().flatten().collect();
    topics.sort();
    topics.dedup();

    for topic in topics {
        let subscribers: Vec<&String> = members
            .iter()
            .filter(|(_, topics)| topics.contains(topic))
            .map(|(member, _)| member)
            .collect();
        let count = counts.get(topic).copied().unwrap_or(0).max(0);
        let mut shares: Vec<Vec<i32>> = vec![Vec::new(); subscribers.len()];
        match assignor {
            Assignor::Range => {
                let members = i32::try_from(subscribers.len()).unwrap_or(i32::MAX).max(1);
                let (each, extra) = (count / members, count % members);
                let mut next = 0;
                for (index, share) in shares.iter_mut().enumerate() {
                    let index = i32::try_from(index).unwrap_or(i32::MAX);
                    let size = each + i32::from(index < extra);
                    share.extend(next..next + size);
                    next += size;
                }
            }
            Assignor::Roundrobin => {
                for (turn, partition) in (0..count).enumerate() {
                    shares[turn % subscribers.len()].push(partition);
                }
            }
        }
        for (member, share) in subscribers.into_iter().zip(shares) {
            if let Some(assigned) = result.get_mut(member) {
                assigned.push((topic.clone(), share));
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(list: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        list.iter()
            .map(|(member, topics)| {
                (
                    member.to_string(),
                    topics.iter().map(|t| t.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn range_gives_consecutive_partitions_and_the_remainder_to_the_first() {
        let members = members(&[("a", &["orders"]), ("b", &["orders"])]);
        let counts = PartitionCounts::from([("orders".to_owned(), 5)]);

        let assigned = assign(Assignor::Range, &members, &counts);

        assert_eq!(assigned["a"], [("orders".to_owned(), vec![0, 1, 2])]);
        assert_eq!(assigned["b"], [("orders".to_owned(), vec![3, 4])]);
    }

    #[test]
    fn roundrobin_deals_partitions_in_turn_and_only_to_subscribers() {
        let members = members(&[
            ("a", &["orders"]),
            ("b", &["orders", "users"]),
            ("c", &["users"]),
        ]);
        let counts = PartitionCounts::from([("orders".to_owned(), 3), ("users".to_owned(), 2)]);

        let assigned = assign(Assignor::Roundrobin, &members, &counts);

        assert_eq!(assigned["a"], [("orders".to_owned(), vec![0, 2])]);
        assert_eq!(
            assigned["b"],
            [
                ("orders".to_owned(), vec![1]),
                ("users".to_owned(), vec![0])
            ]
        );
        assert_eq!(assigned["c"], [("users".to_owned(), vec![1])]);
    }

    #[test]
    fn consumer_protocol_messages_survive_encoding() {
        let subscription = ConsumerProtocolSubscription::default()
            .with_topics(vec![StrBytes::from_static_str("orders")]);

        let decoded: ConsumerProtocolSubscription =
            decode_versioned("g", encode_versioned(&subscription)).unwrap();

        assert_eq!(decoded.topics, subscription.topics);
    }
}
