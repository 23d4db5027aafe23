//! The HTTP endpoints: OpenAI's completions, chat completions and models, vLLM's adapter
//! loading, health and metrics; the API key check; OpenAI-style errors for everything else.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::adapters::{now, Registry};
use super::api::{
    json_body, parse, ApiError, ChatRequest, Common, CompletionRequest, LoadAdapterRequest, Prompt,
    Sampling, UnloadAdapterRequest,
};
use super::metrics::Metrics;
use super::scheduler::{Event, Finish, Job, TokenLogprobs};
use super::text::TextStream;
use crate::infer::Inference;
use crate::lora;
use crate::tokenizer::Tokenizer;

/// What every handler shares.
pub struct AppState {
    pub inference: Arc<Inference>,
    pub tokenizer: Arc<Tokenizer>,
    /// Replaces the GGUF's chat template when set.
    pub chat_template: Option<String>,
    pub adapters: Registry,
    pub jobs: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
    /// The most tokens one request may ask for.
    pub max_tokens: usize,
    pub api_key: Option<String>,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    pub created: u64,
    pub next_id: AtomicU64,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Checks every request's headers (`refusal`) and counts error responses. A body announced
/// too long is refused before it is read: the client learns it at once, rather than when the
/// server closes on it half-way.
async fn guard(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let response = match refusal(&state, request.headers()) {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    };
    if response.status().is_client_error() || response.status().is_server_error() {
        state.metrics.error(response.status().as_u16());
    }
    response
}

/// Why a request is refused from its headers alone: a wrong API key, or a body announced
/// over the limit.
fn refusal(state: &AppState, headers: &HeaderMap) -> Option<ApiError> {
    if let Some(key) = &state.api_key {
        if !authorized(headers, key) {
            return Some(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "Incorrect API key provided (Authorization: Bearer <key>).",
                )
            });
        }
    }
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > state.max_body_bytes as u64)?;
    let message = format!(
        "the request body ({announced} bytes) is over the length limit ({} bytes)",
        state.max_body_bytes
    );
    Some(ApiError::body_too_large(message))
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared in time independent of where they differ.
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint")
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// The base model and every adapter, as vLLM lists them.
async fn models(State(state): State<Shared>) -> Json<Value> {
    let base = state.adapters.base();
    let mut data = vec![json!({
        "id": base,
        "object": "model",
        "created": state.created,
        "owned_by": "lugh",
        "root": state.inference.model().path().display().to_string(),
        "parent": null,
        "max_model_len": state.inference.n_ctx(),
    })];
    data.extend(state.adapters.entries().into_iter().map(|e| {
        json!({
            "id": e.name,
            "object": "model",
            "created": e.created,
            "owned_by": "lugh",
            "root": e.source,
            "parent": base,
        })
    }));
    Json(json!({"object": "list", "data": data}))
}

/// The body, or the limit's 413 as an OpenAI error.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::body_too_large(rejection.body_text()),
        status => ApiError::new(status, "invalid_request_error", rejection.body_text()),
    })
}

async fn load_adapter(
    State(state): State<Shared>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let request: LoadAdapterRequest = parse(&json_body(&body(raw)?)?)?;
    let model = Arc::clone(state.inference.model());
    let path = request.lora_path.clone();
    let loaded = tokio::task::spawn_blocking(move || lora::load(path.as_ref(), &model, 1.0))
        .await
        .map_err(|_| ApiError::invalid("loading the adapter failed"))?
        .map_err(|e| ApiError::param("lora_path", e.to_string()))?;
    state.adapters.add(
        &request.lora_name,
        request.lora_path,
        Arc::new(loaded.adapter),
    )?;
    Ok(format!(
        "Success: LoRA adapter '{}' added successfully.",
        request.lora_name
    ))
}

async fn unload_adapter(
    State(state): State<Shared>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let request: UnloadAdapterRequest = parse(&json_body(&body(raw)?)?)?;
    state.adapters.remove(&request.lora_name)?;
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        request.lora_name
    ))
}

/// Which endpoint a generation answers, which shapes its chunks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

async fn completions(State(state): State<Shared>, raw: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> Result<Generation, ApiError> {
        let value = json_body(&body(raw)?)?;
        let request: CompletionRequest = parse(&value)?;
        let common: Common = parse(&value)?;
        if request.echo {
            return Err(ApiError::param("echo", "echo is not supported"));
        }
        let prompt = match request.prompt {
            Prompt::Text(text) => state.tokenizer.encode(&text, true, true),
            Prompt::Tokens(ids) => ids,
            Prompt::Texts(mut texts) if texts.len() == 1 => {
                state.tokenizer.encode(&texts.remove(0), true, true)
            }
            Prompt::TokenLists(mut lists) if lists.len() == 1 => lists.remove(0),
            _ => return Err(ApiError::param("prompt", "one prompt per request")),
        };
        let sampling = common.sampling(request.logprobs)?;
        start(&state, Endpoint::Completions, &common, sampling, prompt)
    };
    match run() {
        Ok(generation) => generation.respond().await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(
    State(state): State<Shared>,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Result<Generation, ApiError> {
        let value = json_body(&body(raw)?)?;
        let mut request: ChatRequest = parse(&value)?;
        let mut common: Common = parse(&value)?;
        let messages = request
            .messages
            .into_iter()
            .map(flatten_content)
            .collect::<Result<Vec<_>, _>>()?;
        let mut extra = request.chat_template_kwargs.take().unwrap_or_default();
        if let Some(tools) = request.tools.take() {
            extra.insert("tools".into(), tools);
        }
        let template = state.chat_template.as_deref();
        if template.is_none() && state.tokenizer.chat_template().is_none() {
            return Err(ApiError::invalid(
                "this model's GGUF has no chat template: start the server with --chat-template FILE",
            ));
        }
        let text = state
            .tokenizer
            .apply_chat_template(&Value::Array(messages), true, template, &extra)
            .map_err(|e| ApiError::param("messages", e.to_string()))?;
        let prompt = state.tokenizer.encode(&text, false, true);
        if common.max_tokens.is_none() {
            common.max_tokens = request.max_completion_tokens;
        }
        let top = request.logprobs.then(|| request.top_logprobs.unwrap_or(0));
        let mut sampling = common.sampling(top)?;
        if let Some(end) = state.tokenizer.end_of_turn(template).ok().flatten() {
            sampling.stop.push(end);
        }
        start(&state, Endpoint::Chat, &common, sampling, prompt)
    };
    match run() {
        Ok(generation) => generation.respond().await,
        Err(e) => e.into_response(),
    }
}

/// A message whose `content` is a list of parts, as one string (text parts only).
fn flatten_content(mut message: serde_json::Map<String, Value>) -> Result<Value, ApiError> {
    if let Some(Value::Array(parts)) = message.get("content") {
        let mut texts = Vec::new();
        for part in parts {
            match (part.get("type").and_then(Value::as_str), part.get("text")) {
                (Some("text"), Some(Value::String(text))) => texts.push(text.as_str()),
                _ => {
                    return Err(ApiError::param(
                        "messages",
                        "only text content parts are supported",
                    ))
                }
            }
        }
        let text = texts.join("\n");
        message.insert("content".into(), Value::String(text));
    }
    Ok(Value::Object(message))
}

/// Checks a request against the model and the server's limits, and queues it.
fn start(
    state: &Shared,
    endpoint: Endpoint,
    common: &Common,
    sampling: Sampling,
    prompt: Vec<u32>,
) -> Result<Generation, ApiError> {
    let chosen = state.adapters.choose(
        common.model.as_deref(),
        common.lora.as_deref().unwrap_or(&[]),
    )?;
    if prompt.is_empty() {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    state
        .inference
        .check_tokens(&prompt)
        .map_err(|e| ApiError::param("prompt", e.to_string()))?;
    let n_ctx = state.inference.n_ctx();
    if prompt.len() >= n_ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "This model's maximum context length is {n_ctx} tokens. However, your prompt has {} tokens.",
                    prompt.len()
                ),
            )
        });
    }
    let room = n_ctx - prompt.len();
    let max_tokens = match (sampling.max_tokens, endpoint) {
        (Some(n), _) => n,
        // OpenAI's legacy default.
        (None, Endpoint::Completions) => 16.min(room),
        (None, Endpoint::Chat) => room.min(state.max_tokens),
    };
    if max_tokens > state.max_tokens {
        return Err(ApiError::param(
            "max_tokens",
            format!(
                "max_tokens is {max_tokens}; this server allows at most {}",
                state.max_tokens
            ),
        ));
    }
    if max_tokens > room {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::param(
                "max_tokens",
                format!(
                    "This model's maximum context length is {n_ctx} tokens. However, you requested {} tokens ({} in the prompt, {max_tokens} for the completion).",
                    prompt.len() + max_tokens,
                    prompt.len()
                ),
            )
        });
    }
    let stop_tokens = if sampling.ignore_eos {
        Vec::new()
    } else {
        state.inference.model().end_of_generation().to_vec()
    };
    let (events, receiver) = unbounded_channel();
    let text = TextStream::new(Arc::clone(&state.tokenizer), &prompt, sampling.stop.clone());
    let prompt_tokens = prompt.len();
    let job = Job {
        prompt,
        adapters: chosen.adapters,
        label: chosen.label.clone(),
        sampling: sampling.clone(),
        stop_tokens,
        max_tokens,
        events,
        queued: Instant::now(),
    };
    state.jobs.send(job).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        )
    })?;
    state.metrics.accepted(&chosen.label, prompt_tokens);
    let serial = state.next_id.fetch_add(1, Ordering::Relaxed);
    Ok(Generation {
        state: Arc::clone(state),
        endpoint,
        id: match endpoint {
            Endpoint::Completions => format!("cmpl-{serial}"),
            Endpoint::Chat => format!("chatcmpl-{serial}"),
        },
        created: now(),
        model: common.model.clone().unwrap_or(chosen.label),
        stream: common.stream,
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
        logprobs: sampling.logprobs.is_some(),
        token_ids: common.return_tokens_as_token_ids,
        prompt_tokens,
        completion_tokens: 0,
        text,
        receiver,
    })
}

/// A request the scheduler is working on, turned into the endpoint's responses.
struct Generation {
    state: Shared,
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
    /// Log-probability tokens as "token_id:{id}".
    token_ids: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    text: TextStream,
    receiver: UnboundedReceiver<Event>,
}

/// What one event adds to the response.
#[derive(Default)]
struct Update {
    text: String,
    logprobs: Vec<(u32, TokenLogprobs)>,
    finish: Option<Finish>,
    error: Option<String>,
}

impl Generation {
    async fn respond(self) -> Response {
        if self.stream {
            Sse::new(self.events())
                .keep_alive(KeepAlive::default())
                .into_response()
        } else {
            self.whole().await
        }
    }

    /// The next update; None once the generation has ended.
    async fn next(&mut self) -> Update {
        let event = self.receiver.recv().await;
        let mut update = Update::default();
        match event {
            Some(Event::Token(generated)) => {
                self.completion_tokens += 1;
                update.text = self.text.push(generated.token);
                if let Some(logprobs) = generated.logprobs {
                    update.logprobs.push((generated.token, logprobs));
                }
                if self.text.stopped() {
                    update.finish = Some(Finish::Stop);
                }
            }
            Some(Event::Finished(finish)) => {
                update.text = self.text.finish();
                update.finish = Some(finish);
            }
            Some(Event::Failed(message)) => update.error = Some(message),
            None => update.error = Some("the server is shutting down".into()),
        }
        update
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    /// The whole response, once the generation has ended.
    async fn whole(mut self) -> Response {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        let finish = loop {
            let update = self.next().await;
            text.push_str(&update.text);
            logprobs.extend(update.logprobs);
            if let Some(message) = update.error {
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
                    .into_response();
            }
            if let Some(finish) = update.finish {
                break finish;
            }
        };
        let logprobs = self.logprobs.then(|| self.logprobs_json(&logprobs));
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish.reason(),
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish.reason(),
            }),
        };
        Json(json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completions => "text_completion",
                Endpoint::Chat => "chat.completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
        }))
        .into_response()
    }

    /// The response as server-sent events: a chunk per piece of text, the last with the
    /// finish reason, usage if asked, then `[DONE]`.
    fn events(self) -> impl Stream<Item = Result<SseEvent, Infallible>> {
        let opening = (self.endpoint == Endpoint::Chat)
            .then(|| self.chunk(json!({"role": "assistant", "content": ""}), None, None));
        let body = stream::unfold(Some(self), |generation| async move {
            let mut generation = generation?;
            let update = generation.next().await;
            let mut events = Vec::new();
            if let Some(message) = update.error {
                let error =
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message);
                events.push(SseEvent::default().data(error.body().to_string()));
                events.push(SseEvent::default().data("[DONE]"));
                return Some((events, None));
            }
            let logprobs = (!update.logprobs.is_empty() && generation.logprobs)
                .then(|| generation.logprobs_json(&update.logprobs));
            if !update.text.is_empty() || logprobs.is_some() || update.finish.is_some() {
                let delta = match generation.endpoint {
                    Endpoint::Completions => Value::String(update.text),
                    Endpoint::Chat if update.text.is_empty() => json!({}),
                    Endpoint::Chat => json!({"content": update.text}),
                };
                let finish = update.finish.map(Finish::reason);
                events.push(sse(generation.chunk(delta, logprobs, finish)));
            }
            if update.finish.is_none() {
                return Some((events, Some(generation)));
            }
            if generation.include_usage {
                let mut usage = generation.chunk(Value::Null, None, None);
                usage["choices"] = json!([]);
                usage["usage"] = generation.usage();
                events.push(sse(usage));
            }
            events.push(SseEvent::default().data("[DONE]"));
            Some((events, None))
        });
        stream::iter(opening.map(sse))
            .chain(body.flat_map(stream::iter))
            .map(Ok)
    }

    /// One streamed chunk: `delta` is the text (completions) or the message delta (chat).
    fn chunk(&self, delta: Value, logprobs: Option<Value>, finish: Option<&str>) -> Value {
        let (object, choice) = match self.endpoint {
            Endpoint::Completions => (
                "text_completion",
                json!({"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}),
            ),
            Endpoint::Chat => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// Log-probabilities in the endpoint's form.
    fn logprobs_json(&self, tokens: &[(u32, TokenLogprobs)]) -> Value {
        let tokenizer = &self.state.tokenizer;
        let text = |t: u32| {
            String::from_utf8_lossy(tokenizer.token_to_piece(t, true).unwrap_or_default())
                .into_owned()
        };
        let piece = |t: u32| {
            if self.token_ids {
                format!("token_id:{t}")
            } else {
                text(t)
            }
        };
        match self.endpoint {
            Endpoint::Completions => {
                let mut offset = 0;
                let mut offsets = Vec::new();
                for (token, _) in tokens {
                    offsets.push(offset);
                    offset += text(*token).chars().count();
                }
                json!({
                    "tokens": tokens.iter().map(|(t, _)| piece(*t)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|(_, l)| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|(_, l)| {
                        l.top.iter().map(|&(t, lp)| (piece(t), json!(lp))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
            Endpoint::Chat => {
                let entry = |t: u32, logprob: f32| {
                    let bytes = tokenizer
                        .token_to_piece(t, true)
                        .unwrap_or_default()
                        .to_vec();
                    json!({"token": piece(t), "logprob": logprob, "bytes": bytes})
                };
                json!({"content": tokens.iter().map(|(t, l)| {
                    let mut e = entry(*t, l.logprob);
                    e["top_logprobs"] = l.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
                    e
                }).collect::<Vec<_>>()})
            }
        }
    }
}

fn sse(chunk: Value) -> SseEvent {
    SseEvent::default().data(chunk.to_string())
}
