//! How trace ids travel in message headers, and the headers a dead-lettered message carries.

use crate::context::Context;
use crate::handler::Source;
use crate::message::Message;

/// The header that carries the trace id from publisher to subscriber.
pub const TRACE_ID_HEADER: &str = "trace_id";

/// On a dead-lettered message: the last error of its handler.
pub const DEAD_LETTER_ERROR_HEADER: &str = "dead_letter_error";
/// On a dead-lettered message: the topic it was first published to.
pub const DEAD_LETTER_TOPIC_HEADER: &str = "dead_letter_topic";
/// On a dead-lettered message: how many times its handler ran.
pub const DEAD_LETTER_ATTEMPTS_HEADER: &str = "dead_letter_attempts";

/// Writes the context's request id into the message's `trace_id` header, unless the caller
/// already set one.
pub fn inject(ctx: &Context, message: &mut Message) {
    if !message.headers.contains_key(TRACE_ID_HEADER) {
        message.set_header(TRACE_ID_HEADER, ctx.request_id());
    }
}

/// The handler's context for a delivered message: its `trace_id` header as request and trace
/// id. A message without one starts a trace of its own, named by its id, so every delivery of
/// it (retries included) logs under the same trace id; only a message without an id gets a
/// fresh one.
pub fn extract(message: &Message) -> Context {
    match message.trace_id() {
        Some(trace_id) if !trace_id.is_empty() => Context::with_id(trace_id),
        _ if !message.id.is_empty() => Context::with_id(&message.id),
        _ => Context::new(),
    }
}

/// The span a handler runs in.
pub(crate) fn handler_span(ctx: &Context, source: &Source, message_id: &str) -> tracing::Span {
    tracing::info_span!(
        "handle",
        trace_id = %ctx.trace_id(),
        connection = %source.connection,
        driver = %source.driver,
        topic = %source.topic,
        message_id = %message_id,
    )
}

/// The message to dead-letter after every attempt to handle `message` from `topic` failed:
/// the same id, body, time and headers, plus the error, the topic and the attempt count.
pub fn dead_letter(message: &Message, topic: &str, error: &str, attempts: u32) -> Message {
    let mut dead = message.clone();
    dead.set_header(DEAD_LETTER_ERROR_HEADER, error);
    dead.set_header(DEAD_LETTER_TOPIC_HEADER, topic);
    dead.set_header(DEAD_LETTER_ATTEMPTS_HEADER, attempts.to_string());
    dead
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_writes_the_request_id_unless_the_caller_set_one() {
        let ctx = Context::from_request_id("req-1");
        let mut plain = Message::new("a");
        let mut preset = Message::new("b").with_header(TRACE_ID_HEADER, "caller");

        inject(&ctx, &mut plain);
        inject(&ctx, &mut preset);

        assert_eq!(plain.trace_id(), Some("req-1"));
        assert_eq!(preset.trace_id(), Some("caller"));
    }

    #[test]
    fn delivery_continues_the_trace_or_starts_one_named_by_the_message() {
        let traced = Message::new("a").with_header(TRACE_ID_HEADER, "req-2");
        let untraced = Message::new("b");
        let nameless = Message::new("c").with_id("");

        assert_eq!(extract(&traced).trace_id(), "req-2");
        assert_eq!(extract(&traced).request_id(), "req-2");
        assert_eq!(extract(&untraced).trace_id(), untraced.id);
        assert!(!extract(&nameless).trace_id().is_empty());
        assert_ne!(extract(&nameless).trace_id(), extract(&nameless).trace_id());
    }
}
