//! What `/metrics` reports, in Prometheus' text format: requests, tokens, batch sizes, queue
//! time and time to first token, per adapter.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdapterLabel {
    adapter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishLabels {
    adapter: String,
    /// stop, length, cancelled (client gone) or error.
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

/// Latency buckets from 1 ms to about 65 s.
#[derive(Clone)]
struct Seconds;

impl MetricConstructor<Histogram> for Seconds {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.001, 2.0, 17))
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<AdapterLabel, Counter>,
    finished: Family<FinishLabels, Counter>,
    prompt_tokens: Family<AdapterLabel, Counter>,
    generation_tokens: Family<AdapterLabel, Counter>,
    queue_seconds: Family<AdapterLabel, Histogram, Seconds>,
    first_token_seconds: Family<AdapterLabel, Histogram, Seconds>,
    batch_size: Histogram,
    running: Gauge,
    waiting: Gauge,
    errors: Family<StatusLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("lugh"),
            requests: Family::default(),
            finished: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            queue_seconds: Family::new_with_constructor(Seconds),
            first_token_seconds: Family::new_with_constructor(Seconds),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            running: Gauge::default(),
            waiting: Gauge::default(),
            errors: Family::default(),
        };
        let r = &mut metrics.registry;
        r.register(
            "requests",
            "Generation requests accepted",
            metrics.requests.clone(),
        );
        r.register(
            "requests_finished",
            "Generation requests ended, by reason",
            metrics.finished.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens accepted",
            metrics.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            metrics.generation_tokens.clone(),
        );
        r.register(
            "queue_seconds",
            "Time from arrival to joining the batch",
            metrics.queue_seconds.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            metrics.first_token_seconds.clone(),
        );
        r.register(
            "batch_size",
            "Sequences per decode step",
            metrics.batch_size.clone(),
        );
        r.register(
            "requests_running",
            "Sequences in the batch",
            metrics.running.clone(),
        );
        r.register(
            "requests_waiting",
            "Requests waiting for a place in the batch",
            metrics.waiting.clone(),
        );
        r.register(
            "http_errors",
            "Error responses, by HTTP status",
            metrics.errors.clone(),
        );
        metrics
    }
}

fn label(adapter: &str) -> AdapterLabel {
    AdapterLabel {
        adapter: adapter.to_string(),
    }
}

impl Metrics {
    pub fn accepted(&self, adapter: &str, prompt_tokens: usize) {
        self.requests.get_or_create(&label(adapter)).inc();
        self.prompt_tokens
            .get_or_create(&label(adapter))
            .inc_by(prompt_tokens as u64);
    }

    pub fn finished(&self, adapter: &str, reason: &str) {
        self.finished
            .get_or_create(&FinishLabels {
                adapter: adapter.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn generated(&self, adapter: &str) {
        self.generation_tokens.get_or_create(&label(adapter)).inc();
    }

    pub fn queued(&self, adapter: &str, wait: Duration) {
        self.queue_seconds
            .get_or_create(&label(adapter))
            .observe(wait.as_secs_f64());
    }

    pub fn first_token(&self, adapter: &str, after: Duration) {
        self.first_token_seconds
            .get_or_create(&label(adapter))
            .observe(after.as_secs_f64());
    }

    pub fn batch(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    pub fn set_load(&self, running: usize, waiting: usize) {
        self.running.set(running as i64);
        self.waiting.set(waiting as i64);
    }

    pub fn error(&self, status: u16) {
        self.errors.get_or_create(&StatusLabel { status }).inc();
    }

    /// Everything, in the OpenMetrics text format Prometheus scrapes.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String does not fail");
        text
    }
}
