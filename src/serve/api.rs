//! The OpenAI request bodies the server reads, and its error responses (`{"error": {...}}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

/// OpenAI's limit on stop sequences per request.
const MAX_STOP: usize = 4;
/// The most alternatives `logprobs` / `top_logprobs` may ask for (vLLM's default limit).
const MAX_LOGPROBS: usize = 20;

/// An error as an OpenAI-style body with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: "invalid_request_error", "not_found_error", ...
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400: the request is wrong.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one parameter.
    pub fn param(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param),
            ..ApiError::invalid(message)
        }
    }

    /// 404: no model (base or adapter) of that name.
    pub fn model_not_found(name: &str) -> ApiError {
        ApiError {
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("The model `{name}` does not exist."),
            )
        }
    }

    /// 413: the request body is over the server's limit.
    pub fn body_too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            message,
        )
        .with_code("request_too_large")
    }

    pub fn with_code(self, code: &'static str) -> ApiError {
        ApiError {
            code: Some(code),
            ..self
        }
    }

    /// The JSON body (also sent as a server-sent event when a stream fails).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A request body as JSON: 400 when it is not.
pub fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))
}

/// `body` read as `T`: 400 naming the field that is missing or of the wrong type.
pub fn parse<T: DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid(inner.to_string())
        } else {
            ApiError::invalid(format!("{path}: {inner}"))
        }
    })
}

/// One string or a list of them (`stop`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A prompt: text, or token ids (a one-element list of either is accepted too).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// An adapter in llama.cpp's per-request `lora` list: by name or by load order.
#[derive(Debug, Deserialize)]
pub struct LoraRef {
    pub id: AdapterId,
    pub scale: Option<f32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum AdapterId {
    Name(String),
    Index(usize),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What `/v1/completions` and `/v1/chat/completions` share: the model, the adapters, the
/// sampling and the stream (read from the same body as the endpoint's own fields).
#[derive(Debug, Deserialize)]
pub struct Common {
    pub model: Option<String>,
    pub lora: Option<Vec<LoraRef>>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// vLLM's and llama.cpp's extension; 0 (default) is off.
    pub top_k: Option<usize>,
    pub n: Option<usize>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's extension: generate past end-of-generation tokens.
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM's extension: log-probability tokens as "token_id:{id}" rather than their text.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// How many top alternatives to report per token (legacy completions form).
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<serde_json::Map<String, serde_json::Value>>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    pub tools: Option<serde_json::Value>,
    /// vLLM's extension: more template variables (`enable_thinking`, ...).
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Debug, Deserialize)]
pub struct LoadAdapterRequest {
    pub lora_name: String,
    pub lora_path: String,
}

#[derive(Debug, Deserialize)]
pub struct UnloadAdapterRequest {
    pub lora_name: String,
}

/// Sampling settings, checked.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    /// None: up to the context's end.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    /// Top alternatives per token to report, if any.
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
}

impl Common {
    /// The sampling settings, with OpenAI's ranges enforced; `logprobs` as the endpoint
    /// states it.
    pub fn sampling(&self, logprobs: Option<usize>) -> Result<Sampling, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::param("n", "only n=1 is supported"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::param(
                "temperature",
                format!("temperature must be in [0, 2], got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::param(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(ApiError::param(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        for (name, penalty) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if penalty.is_some_and(|p| p != 0.0) {
                return Err(ApiError::invalid(format!("{name} is not supported")));
            }
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(list)) => list.clone(),
        };
        if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
            return Err(ApiError::param(
                "stop",
                format!("stop takes at most {MAX_STOP} non-empty strings"),
            ));
        }
        if logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
            return Err(ApiError::param(
                "logprobs",
                format!("at most {MAX_LOGPROBS} alternatives per token"),
            ));
        }
        Ok(Sampling {
            temperature,
            top_p,
            top_k: self.top_k.unwrap_or(0),
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop,
            logprobs,
            ignore_eos: self.ignore_eos,
        })
    }
}
