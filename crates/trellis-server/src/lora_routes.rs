//! LoRA on the OpenAI server (spec §5.3, §5.4): the served adapters by name, how a request's
//! `model` picks one (loaded adapters, then the LoRA resolvers when runtime updating is on),
//! and `/v1/load_lora_adapter` / `/v1/unload_lora_adapter` with vLLM's texts and codes.
//!
//! Loads run under a per-name lock, so two loads of one name never race; unloading only
//! forgets the name (the engine keeps the weights in its CPU LRU until evicted, as vLLM).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use trellis_engine::{AsyncLLM, EngineError, LoraError, LoraRequest, LoraResolver};

use crate::error::ApiError;
use crate::{AppState, ServerConfig};

/// The served adapters and how to find more.
pub struct LoraModels {
    runtime_updating: bool,
    /// The `--model` value resolvers check `base_model_name_or_path` against.
    base_model_name: String,
    served_name: String,
    /// Loaded adapters, in load order.
    loaded: Mutex<Vec<LoraRequest>>,
    next_id: AtomicU32,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    resolvers: Vec<(String, Arc<dyn LoraResolver>)>,
}

impl LoraModels {
    /// The state for `config` (the resolvers are snapshotted now, as vLLM does).
    pub fn new(config: &ServerConfig) -> Self {
        if config.allow_runtime_lora_updating {
            eprintln!(
                "WARNING trellis: LoRA dynamic loading & unloading is enabled in the API server. \
                 This should ONLY be used for local development!"
            );
        }
        LoraModels {
            runtime_updating: config.allow_runtime_lora_updating,
            base_model_name: config.model_root.clone(),
            served_name: config.served_model_name.clone(),
            loaded: Mutex::new(Vec::new()),
            next_id: AtomicU32::new(1),
            locks: Mutex::new(HashMap::new()),
            resolvers: config.lora_resolvers.resolvers(),
        }
    }

    /// Whether the load/unload routes exist.
    pub fn runtime_updating(&self) -> bool {
        self.runtime_updating
    }

    /// The loaded adapters, in load order.
    pub fn loaded(&self) -> Vec<LoraRequest> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn find(&self, name: &str) -> Option<LoraRequest> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|l| l.lora_name == name)
            .cloned()
    }

    fn store(&self, req: LoraRequest) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        match loaded.iter_mut().find(|l| l.lora_name == req.lora_name) {
            Some(slot) => *slot = req,
            None => loaded.push(req),
        }
    }

    fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Loads the `--lora-modules` adapters at startup; any failure is returned (startup then
    /// fails, as in vLLM).
    pub async fn load_static(
        &self,
        engine: &AsyncLLM,
        modules: &[LoraRequest],
    ) -> Result<(), String> {
        for m in modules {
            let mut req = m.clone();
            req.lora_int_id = self.next_id();
            engine
                .add_lora(&req)
                .await
                .map_err(|e| format!("--lora-modules {}: {e}", req.lora_name))?;
            self.store(req);
        }
        Ok(())
    }

    /// The valid names for the 404 text: the served name, then the adapters.
    fn aliases(&self) -> String {
        std::iter::once(self.served_name.clone())
            .chain(self.loaded().into_iter().map(|l| l.lora_name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// vLLM's `_check_model`: the adapter a request's `model` selects (`None`: the base
    /// model), trying the resolvers on an unknown name when runtime updating is on.
    pub async fn resolve(
        &self,
        engine: &AsyncLLM,
        model: Option<&str>,
        skip_validation: bool,
    ) -> Result<Option<LoraRequest>, ApiError> {
        let Some(name) = model.filter(|m| !m.is_empty()) else {
            return Ok(None);
        };
        if name == self.served_name {
            return Ok(None);
        }
        if let Some(l) = self.find(name) {
            return Ok(Some(l));
        }
        if self.runtime_updating && engine.lora_enabled() {
            match self.resolve_with_resolvers(engine, name).await {
                Resolved::Loaded(l) => return Ok(Some(l)),
                Resolved::NotLoadable => {
                    let mut e = ApiError::bad_request(
                        format!("LoRA adapter '{name}' was found but could not be loaded."),
                        Some("model"),
                    );
                    e.param = Some("model".into());
                    return Err(e);
                }
                Resolved::NotFound => {}
            }
        }
        if skip_validation {
            return Ok(None);
        }
        Err(ApiError::model_not_found(name, &self.aliases()))
    }

    async fn resolve_with_resolvers(&self, engine: &AsyncLLM, name: &str) -> Resolved {
        let _guard = self.lock(name).await;
        if let Some(l) = self.find(name) {
            return Resolved::Loaded(l);
        }
        let id = self.next_id();
        let mut found = false;
        for (rname, resolver) in &self.resolvers {
            let Some(mut req) = resolver.resolve_lora(&self.base_model_name, name).await else {
                continue;
            };
            found = true;
            req.lora_int_id = id;
            match engine.add_lora(&req).await {
                Ok(()) => {
                    eprintln!(
                        "INFO trellis: Resolved and loaded LoRA adapter '{name}' using {rname}"
                    );
                    self.store(req.clone());
                    return Resolved::Loaded(req);
                }
                Err(e) => eprintln!(
                    "WARNING trellis: Failed to load LoRA '{name}' resolved by {rname}: {e}. \
                     Trying next resolver."
                ),
            }
        }
        match found {
            true => Resolved::NotLoadable,
            false => Resolved::NotFound,
        }
    }
}

enum Resolved {
    Loaded(LoraRequest),
    NotLoadable,
    NotFound,
}

/// An error of the load/unload routes: vLLM's status, type and message.
fn error(status: StatusCode, kind: &str, message: String) -> Response {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}
    });
    (status, axum::Json(body)).into_response()
}

fn invalid(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, "InvalidUserInput", message)
}

/// The JSON body of a load/unload request, or vLLM's 400.
fn json_body<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, Response> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            "Unsupported Media Type: Only 'application/json' is allowed".into(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            format!("Invalid JSON body: {e}"),
        )
    })
}

#[derive(Deserialize)]
struct LoadRequest {
    #[serde(default)]
    lora_name: String,
    #[serde(default)]
    lora_path: String,
    #[serde(default)]
    load_inplace: bool,
}

#[derive(Deserialize)]
struct UnloadRequest {
    #[serde(default)]
    lora_name: String,
}

/// `POST /v1/load_lora_adapter`.
pub async fn load(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let req: LoadRequest = match json_body(&headers, &body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (name, path) = (req.lora_name, req.lora_path);
    if name.is_empty() || path.is_empty() {
        return invalid("Both 'lora_name' and 'lora_path' must be provided.".into());
    }
    let lora = &state.lora;
    let _guard = lora.lock(&name).await;
    if name == lora.served_name {
        return invalid(format!(
            "The lora adapter '{name}' conflicts with a served base model."
        ));
    }
    let existing = lora.find(&name);
    if existing.is_some() && !req.load_inplace {
        return invalid(format!(
            "The lora adapter '{name}' has already been loaded. If you want to load the \
             adapter in place, set 'load_inplace' to True."
        ));
    }
    let same_path = existing.as_ref().is_some_and(|e| e.lora_path == path);
    let request = LoraRequest {
        lora_name: name.clone(),
        lora_int_id: existing
            .as_ref()
            .map_or_else(|| lora.next_id(), |e| e.lora_int_id),
        lora_path: path.clone(),
        base_model_name: None,
        load_inplace: req.load_inplace,
    };
    match state.engine.add_lora(&request).await {
        Ok(()) => {}
        Err(EngineError::Lora(LoraError::NotFound(p))) => {
            return error(
                StatusCode::NOT_FOUND,
                "NotFoundError",
                format!(
                    "Loading lora {name} failed: No adapter found for {}",
                    p.display()
                ),
            );
        }
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                e.to_string(),
            );
        }
    }
    if same_path {
        eprintln!(
            "WARNING trellis: LoRA adapter '{name}' was reloaded in place from the same path; \
             prefix-cache blocks computed with its old weights are not reused (they are keyed \
             by the weights' version)"
        );
    }
    lora.store(LoraRequest {
        load_inplace: false,
        ..request
    });
    eprintln!("INFO trellis: Loaded new LoRA adapter: name '{name}', path '{path}'");
    (
        StatusCode::OK,
        format!("Success: LoRA adapter '{name}' added successfully."),
    )
        .into_response()
}

/// `POST /v1/unload_lora_adapter`.
pub async fn unload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: UnloadRequest = match json_body(&headers, &body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let name = req.lora_name;
    if name.is_empty() {
        return invalid("'lora_name' needs to be provided to unload a LoRA adapter.".into());
    }
    let lora = &state.lora;
    let _guard = lora.lock(&name).await;
    let removed = {
        let mut loaded = lora.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let before = loaded.len();
        loaded.retain(|l| l.lora_name != name);
        before != loaded.len()
    };
    if !removed {
        return error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The lora adapter '{name}' cannot be found."),
        );
    }
    (
        StatusCode::OK,
        format!("Success: LoRA adapter '{name}' removed successfully."),
    )
        .into_response()
}
