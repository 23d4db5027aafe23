//! The adapters a server offers, by name, loaded and unloaded while it runs. A request holds
//! its adapters while it runs: unloading one only stops new requests from choosing it.

use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;

use super::api::{AdapterId, ApiError, LoraRef};
use crate::lora::LoraAdapter;

/// One adapter the server offers.
#[derive(Clone)]
pub struct Entry {
    pub name: String,
    /// Where it was loaded from (`/v1/models` shows it as `root`).
    pub source: String,
    pub adapter: Arc<LoraAdapter>,
    /// Seconds since the epoch when it was added.
    pub created: u64,
}

/// The adapters chosen for one request, each with the user scale it applies.
pub struct Chosen {
    pub adapters: Vec<(Arc<LoraAdapter>, f32)>,
    /// The name responses and metrics give the request: the base's, the adapter's, or the
    /// adapters' joined by '+'.
    pub label: String,
}

/// Named adapters in load order (llama.cpp's `lora` ids are positions in it).
pub struct Registry {
    base: String,
    entries: RwLock<Vec<Entry>>,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Registry {
    /// `base`: the name of the base model, which no adapter may take.
    pub fn new(base: String) -> Registry {
        Registry {
            base,
            entries: RwLock::new(Vec::new()),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds `adapter` as `name`; refuses a name in use.
    pub fn add(
        &self,
        name: &str,
        source: String,
        adapter: Arc<LoraAdapter>,
    ) -> Result<(), ApiError> {
        if name.is_empty() || name == self.base {
            return Err(ApiError::param(
                "lora_name",
                format!("'{name}' cannot name an adapter (empty, or the base model's name)"),
            ));
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.iter().any(|e| e.name == name) {
            return Err(ApiError::param(
                "lora_name",
                format!("The lora adapter '{name}' has already been loaded."),
            ));
        }
        entries.push(Entry {
            name: name.to_string(),
            source,
            adapter,
            created: now(),
        });
        Ok(())
    }

    /// Removes `name`; requests running with it finish with it.
    pub fn remove(&self, name: &str) -> Result<(), ApiError> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        match entries.iter().position(|e| e.name == name) {
            Some(i) => {
                entries.remove(i);
                Ok(())
            }
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("The lora adapter '{name}' cannot be found."),
            )),
        }
    }

    /// The adapters a request asks for: `model` (vLLM: an adapter's name, or the base's) and
    /// `lora` (llama.cpp: names or load positions, with scales). An adapter chosen by `model`
    /// or without a scale applies at the scale it was loaded with.
    pub fn choose(&self, model: Option<&str>, lora: &[LoraRef]) -> Result<Chosen, ApiError> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut adapters = Vec::new();
        let mut names = Vec::new();
        if let Some(model) = model.filter(|m| *m != self.base) {
            let entry = entries
                .iter()
                .find(|e| e.name == model)
                .ok_or_else(|| ApiError::model_not_found(model))?;
            adapters.push((Arc::clone(&entry.adapter), entry.adapter.scale()));
            names.push(entry.name.clone());
        }
        for r in lora {
            let entry = match &r.id {
                AdapterId::Name(name) => entries.iter().find(|e| &e.name == name),
                AdapterId::Index(i) => entries.get(*i),
            }
            .ok_or_else(|| {
                let id = match &r.id {
                    AdapterId::Name(name) => name.clone(),
                    AdapterId::Index(i) => i.to_string(),
                };
                ApiError::model_not_found(&id)
            })?;
            let scale = r.scale.unwrap_or_else(|| entry.adapter.scale());
            if !scale.is_finite() {
                return Err(ApiError::param("lora", "an adapter's scale must be finite"));
            }
            // Each adapter once: a request cannot multiply the work of every step (or the
            // label sets of the metrics) by naming one adapter many times.
            if names.contains(&entry.name) {
                return Err(ApiError::param(
                    "lora",
                    format!("adapter '{}' is chosen twice", entry.name),
                ));
            }
            adapters.push((Arc::clone(&entry.adapter), scale));
            names.push(entry.name.clone());
        }
        let label = if names.is_empty() {
            self.base.clone()
        } else {
            names.join("+")
        };
        Ok(Chosen { adapters, label })
    }
}
