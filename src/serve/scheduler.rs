//! Continuous batching: one thread owns the running sequences and runs them in steps. Each
//! step feeds every running sequence (a new one its whole prompt, the others their last
//! token) through one `Inference::step`, whatever adapters each uses, then samples a token
//! for each. Requests join between steps and leave as soon as they finish or their client
//! goes away.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::Sampling;
use super::metrics::Metrics;
use crate::infer::{Inference, Sampler, Workspace};
use crate::lora::{LoraAdapter, Scaled};
use crate::model::KvCache;

/// A request for the scheduler: prompt, adapters, sampling, and where its tokens go.
pub struct Job {
    pub prompt: Vec<u32>,
    pub adapters: Vec<(Arc<LoraAdapter>, f32)>,
    /// The request's adapters as metrics name them.
    pub label: String,
    pub sampling: Sampling,
    /// Tokens that end the generation (not sent).
    pub stop_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub events: UnboundedSender<Event>,
    pub queued: Instant,
}

/// What a request hears from the scheduler.
#[derive(Debug)]
pub enum Event {
    Token(Generated),
    Finished(Finish),
    Failed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (or, decided by the request, a stop string).
    Stop,
    /// `max_tokens` or the context's end.
    Length,
}

impl Finish {
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// A sampled token, with its log-probability and the top alternatives when asked.
#[derive(Debug)]
pub struct Generated {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Debug)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The most likely tokens, best first.
    pub top: Vec<(u32, f32)>,
}

/// Batch limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences per step.
    pub max_batch: usize,
    /// Prompt tokens that may start in one step (a longer prompt still runs, alone among the
    /// new ones): bounds how long one step holds up the running sequences.
    pub max_prefill_tokens: usize,
}

/// A running request.
struct Sequence {
    job: Job,
    cache: KvCache,
    sampler: Sampler,
    /// What the next step feeds: the prompt, then each sampled token.
    pending: Vec<u32>,
    produced: usize,
    started: Instant,
}

impl Sequence {
    fn cancelled(&self) -> bool {
        self.job.events.is_closed()
    }

    /// Samples from `logits` and tells the request; true when it has finished.
    fn advance(&mut self, logits: &[f32], metrics: &Metrics) -> bool {
        let token = self.sampler.sample(logits);
        if self.produced == 0 {
            metrics.first_token(&self.job.label, self.started.elapsed());
        }
        if self.job.stop_tokens.contains(&token) {
            return self.finish(Finish::Stop, metrics);
        }
        let logprobs = self
            .job
            .sampling
            .logprobs
            .map(|n| logprobs(logits, token, n));
        self.produced += 1;
        metrics.generated(&self.job.label);
        if self
            .job
            .events
            .send(Event::Token(Generated { token, logprobs }))
            .is_err()
        {
            metrics.finished(&self.job.label, "cancelled");
            return true;
        }
        if self.produced >= self.job.max_tokens || self.cache.check_room(1).is_err() {
            return self.finish(Finish::Length, metrics);
        }
        self.pending = vec![token];
        false
    }

    fn finish(&self, finish: Finish, metrics: &Metrics) -> bool {
        metrics.finished(&self.job.label, finish.reason());
        let _ = self.job.events.send(Event::Finished(finish));
        true
    }

    fn fail(&self, message: &str, metrics: &Metrics) {
        metrics.finished(&self.job.label, "error");
        let _ = self.job.events.send(Event::Failed(message.to_string()));
    }
}

/// The log-probability of `token` under `logits` and the `n` most likely tokens.
fn logprobs(logits: &[f32], token: u32, n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_total = logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let n = n.min(order.len());
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if n > 0 && n < order.len() {
        order.select_nth_unstable_by(n - 1, by_logit);
    }
    order.truncate(n);
    order.sort_unstable_by(by_logit);
    TokenLogprobs {
        logprob: logits[token as usize] - log_total,
        top: order
            .into_iter()
            .map(|t| (t, logits[t as usize] - log_total))
            .collect(),
    }
}

/// Runs the scheduler until every sender of `jobs` is gone. Once `stopping` is set, every
/// request fails at once ("the server is shutting down") instead of running to its end.
pub fn run(
    inference: Arc<Inference>,
    jobs: mpsc::Receiver<Job>,
    limits: Limits,
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Sequence> = Vec::new();
    let mut ws = Workspace::default();
    loop {
        if running.is_empty() && waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        waiting.extend(jobs.try_iter());
        if stopping.load(Ordering::Relaxed) {
            const SHUTDOWN: &str = "the server is shutting down";
            fail_all(&running, SHUTDOWN, &metrics);
            running.clear();
            for job in waiting.drain(..) {
                metrics.finished(&job.label, "error");
                let _ = job.events.send(Event::Failed(SHUTDOWN.into()));
            }
            continue;
        }
        waiting.retain(|job| {
            let gone = job.events.is_closed();
            if gone {
                metrics.finished(&job.label, "cancelled");
            }
            !gone
        });
        running.retain(|seq| {
            let gone = seq.cancelled();
            if gone {
                metrics.finished(&seq.job.label, "cancelled");
            }
            !gone
        });
        admit(&inference, &mut waiting, &mut running, limits, &metrics);
        metrics.set_load(running.len(), waiting.len());
        if running.is_empty() {
            continue;
        }
        let finished = step(&inference, &mut running, &mut ws, &metrics);
        let mut finished = finished.into_iter();
        running.retain(|_| !finished.next().unwrap_or(true));
    }
}

/// Moves waiting jobs into the batch while it has room and the step's prefill budget lasts.
fn admit(
    inference: &Inference,
    waiting: &mut VecDeque<Job>,
    running: &mut Vec<Sequence>,
    limits: Limits,
    metrics: &Metrics,
) {
    let mut budget = limits.max_prefill_tokens;
    let mut admitted = 0;
    while running.len() < limits.max_batch {
        let Some(job) = waiting.front() else { break };
        if admitted > 0 && job.prompt.len() > budget {
            break;
        }
        let job = waiting.pop_front().expect("front exists");
        budget = budget.saturating_sub(job.prompt.len());
        admitted += 1;
        metrics.queued(&job.label, job.queued.elapsed());
        let sampler = Sampler::new(
            job.sampling.temperature,
            job.sampling.top_k,
            job.sampling.top_p,
            job.sampling.seed,
        );
        let sampler = match sampler {
            Ok(sampler) => sampler,
            Err(e) => {
                metrics.finished(&job.label, "error");
                let _ = job.events.send(Event::Failed(e.to_string()));
                continue;
            }
        };
        let n_ctx = (job.prompt.len() + job.max_tokens).min(inference.n_ctx());
        running.push(Sequence {
            cache: inference.create_kv_cache(Some(n_ctx)),
            sampler,
            pending: job.prompt.clone(),
            produced: 0,
            started: job.queued,
            job,
        });
    }
}

/// One forward over every running sequence, then a token for each. Returns which finished.
/// A failure (or a panic) of the forward fails the requests of this batch, not the server.
fn step(
    inference: &Inference,
    running: &mut [Sequence],
    ws: &mut Workspace,
    metrics: &Metrics,
) -> Vec<bool> {
    metrics.batch(running.len());
    let outcome = {
        let mut sequences: Vec<&[u32]> = Vec::new();
        let mut lora: Vec<Vec<Scaled>> = Vec::new();
        let mut caches: Vec<&mut KvCache> = Vec::new();
        for Sequence {
            pending,
            job,
            cache,
            ..
        } in running.iter_mut()
        {
            sequences.push(pending);
            lora.push(job.adapters.iter().map(|(a, s)| (a.as_ref(), *s)).collect());
            caches.push(cache);
        }
        let lora: Vec<&[Scaled]> = lora.iter().map(Vec::as_slice).collect();
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            inference.step(&sequences, &lora, &mut caches, ws)
        }))
    };
    match outcome {
        Ok(Ok(logits)) => running
            .iter_mut()
            .zip(&logits)
            .map(|(seq, logits)| seq.advance(logits, metrics))
            .collect(),
        Ok(Err(e)) => fail_all(running, &e.to_string(), metrics),
        Err(_) => {
            *ws = Workspace::default();
            fail_all(running, "internal error: the forward panicked", metrics)
        }
    }
}

fn fail_all(running: &[Sequence], message: &str, metrics: &Metrics) -> Vec<bool> {
    running
        .iter()
        .map(|seq| {
            seq.fail(message, metrics);
            true
        })
        .collect()
}
