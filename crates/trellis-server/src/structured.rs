//! OpenAI's `response_format` on chat completions, turned into the engine's
//! `structured_outputs` (vLLM's mapping): `json_object` → any JSON object, `json_schema` → the
//! schema, `text` → no constraint.

use serde::Deserialize;
use trellis_engine::StructuredOutputsParams;

use crate::error::ApiError;

/// `response_format.json_schema`.
#[derive(Debug, Clone, Deserialize)]
pub struct JsonSchemaFormat {
    /// The schema's name (accepted, unused).
    pub name: Option<String>,
    /// What the schema describes (accepted, unused).
    pub description: Option<String>,
    /// The JSON schema.
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode: the output always follows the schema here, strict or not.
    pub strict: Option<bool>,
}

/// `response_format`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormat {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The schema of `json_schema`.
    pub json_schema: Option<JsonSchemaFormat>,
}

/// The parameter errors of a `response_format` are reported under.
pub const RESPONSE_FORMAT: &str = "response_format";

impl ResponseFormat {
    /// The constraint it asks for (`None` for `text`).
    pub fn constraint(&self) -> Result<Option<StructuredOutputsParams>, ApiError> {
        match self.kind.as_str() {
            "text" => Ok(None),
            "json_object" => Ok(Some(StructuredOutputsParams {
                json_object: Some(true),
                ..Default::default()
            })),
            "json_schema" => {
                let schema = self
                    .json_schema
                    .as_ref()
                    .and_then(|j| j.schema.clone())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "response_format of type \"json_schema\" needs json_schema.schema.",
                            Some(RESPONSE_FORMAT),
                        )
                    })?;
                Ok(Some(StructuredOutputsParams::json_schema(schema)))
            }
            other => Err(ApiError::bad_request(
                format!(
                    "Unsupported response_format type {other:?}: expected \"text\", \
                     \"json_object\" or \"json_schema\"."
                ),
                Some(RESPONSE_FORMAT),
            )),
        }
    }
}

/// An engine error about `structured_outputs` is reported under the field the client used.
pub fn rename_param(mut e: ApiError, to: &str) -> ApiError {
    if e.param.as_deref() == Some(trellis_engine::structured_output::PARAM) {
        e.message = e
            .message
            .replace("structured_outputs.json_object", to)
            .replace(
                "structured_outputs.json",
                &format!("{to}.json_schema.schema"),
            );
        e.param = Some(to.to_string());
    }
    e
}
