//! A `tracing` layer that records which `trace_id` span field encloses each probe event, so a
//! check can see the span its handler ran in.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

/// The field a handler sets on an event to ask which trace id its span carries.
pub const PROBE_FIELD: &str = "probe";

static SEEN: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();

fn seen() -> &'static Mutex<HashMap<String, String>> {
    SEEN.get_or_init(Default::default)
}

/// Installs the recording layer (and a log printer filtered by `RUST_LOG`) once per process.
pub fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let printer = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(EnvFilter::from_default_env());
        let _ = Registry::default()
            .with(ProbeLayer)
            .with(printer)
            .try_init();
    });
}

/// The trace id of the span that enclosed the event with `probe = <probe>`.
pub fn span_trace_id(probe: &str) -> Option<String> {
    seen().lock().unwrap().get(probe).cloned()
}

struct ProbeLayer;

struct TraceId(String);

#[derive(Default)]
struct Fields {
    trace_id: Option<String>,
    probe: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "trace_id" => self.trace_id = Some(value),
            PROBE_FIELD => self.probe = Some(value),
            _ => {}
        }
    }
}

impl<S> Layer<S> for ProbeLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(trace_id), Some(span)) = (fields.trace_id, ctx.span(id)) {
            span.extensions_mut().insert(TraceId(trace_id));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(probe) = fields.probe else { return };
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(TraceId(trace_id)) = span.extensions().get::<TraceId>() {
                seen().lock().unwrap().insert(probe, trace_id.clone());
                return;
            }
        }
    }
}
