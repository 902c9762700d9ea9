//! `[brokers.<name>.memory]`.

use serde::Deserialize;

use super::*;
use crate::config::{DriverTable, ValueKind};
use crate::handler::RetryPolicy;

/// `[brokers.<name>.memory]`: in-process topics. Every key is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// How many messages each consumer group holds before `publish` waits for room.
    pub buffer: usize,
    /// Retries of a failing handler before the message is dead-lettered.
    pub retry: RetryPolicy,
    /// Where failed messages go; `{topic}` is replaced by their topic. Empty: nowhere.
    pub dead_letter_topic: String,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            buffer: 1024,
            retry: RetryPolicy::default(),
            dead_letter_topic: default_dead_letter(),
        }
    }
}

impl DriverTable for MemoryConfig {
    const TABLE: &'static str = "memory";
    const KEYS: &'static [(&'static str, ValueKind)] = &[
        ("buffer", ValueKind::Integer),
        RETRY_KEYS[0],
        RETRY_KEYS[1],
        RETRY_KEYS[2],
        RETRY_KEYS[3],
        ("dead_letter_topic", ValueKind::Text),
    ];

    fn validate(&self) -> Result<(), (String, String)> {
        if self.buffer == 0 {
            return Err(invalid("buffer", "must be at least 1"));
        }
        validate_retry(&self.retry)
    }
}
