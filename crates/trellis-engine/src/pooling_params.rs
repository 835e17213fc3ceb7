//! `PoolingParams`: what a pooling request asks for (vLLM's `PoolingParams`).

/// The pooling task of a request (vLLM's `PoolingTask`, the ones Trellis serves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolingTask {
    /// One embedding vector per input (`/v1/embeddings`, `LLM::embed`).
    #[default]
    Embed,
    /// The pooler's raw output (`LLM::encode`, `/pooling`).
    Encode,
    /// An IO processor plugin's request (`/pooling` with `data`).
    Plugin,
}

impl PoolingTask {
    /// vLLM's name.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolingTask::Embed => "embed",
            PoolingTask::Encode => "encode",
            PoolingTask::Plugin => "plugin",
        }
    }

    /// Parses vLLM's name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "embed" => Some(PoolingTask::Embed),
            "encode" | "token_embed" => Some(PoolingTask::Encode),
            "plugin" => Some(PoolingTask::Plugin),
            _ => None,
        }
    }
}

/// Parameters of a pooling request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolingParams {
    /// The task.
    pub task: PoolingTask,
    /// L2-normalise the embedding; `None`: the model's pooler decides (sentence-transformers'
    /// `Normalize` module; on for decoder models turned into embedding models).
    pub normalize: Option<bool>,
    /// Matryoshka output dimensions: refused, none of Trellis' models supports them.
    pub dimensions: Option<usize>,
}

/// Why pooling parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolingParamsError {
    /// `dimensions` on a model without Matryoshka representations (vLLM's text).
    #[error(
        "Model \"{model}\" does not support matryoshka representation, changing output dimensions will lead to poor results."
    )]
    Dimensions {
        /// The served model name.
        model: String,
    },
}

impl PoolingParams {
    /// Embedding parameters (task `embed`, the model's normalisation).
    pub fn embed() -> Self {
        Self::default()
    }

    /// Checks the parameters against the model `model` (its served name, for the message).
    pub fn verify(&self, model: &str) -> Result<(), PoolingParamsError> {
        if self.dimensions.is_some() {
            return Err(PoolingParamsError::Dimensions {
                model: model.to_string(),
            });
        }
        Ok(())
    }
}
