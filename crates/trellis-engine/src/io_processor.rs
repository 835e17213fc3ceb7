//! Selecting the IO processor plugin (vLLM's `get_io_processor`, spec §6.2): by
//! `--io-processor-plugin NAME` (wins), else the `io_processor_plugin` key of the model's
//! `config.json`; none named, none loaded. A named one is looked up among the entries of group
//! `io_processor` that registered a processor, by entry name, with vLLM's startup errors.

use std::path::Path;
use std::sync::Arc;

use trellis_plugin::{
    IoPoolingOutput, IoProcessor, IoProcessorContext, IoProcessorFactory, IoPrompt,
};

use crate::error::EngineError;
use crate::llm::{Prompt, ResolvedConfig};
use crate::outputs::PoolingRequestOutput;
use crate::pooling_params::{PoolingParams, PoolingTask};

/// The processor name the model's `config.json` asks for (`io_processor_plugin`), if any.
pub fn io_processor_from_config(model: &Path) -> Option<String> {
    let text = std::fs::read_to_string(model.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["io_processor_plugin"].as_str().map(str::to_string)
}

/// The name in force: the flag, else the model's `config.json`.
pub fn io_processor_name(requested: Option<&str>, model: &Path) -> Option<String> {
    requested
        .map(str::to_string)
        .or_else(|| io_processor_from_config(model))
}

/// Picks `name` among `available` (entry name, factory) and builds it; vLLM's errors, word
/// for word, when none is installed or `name` is not.
pub fn build_io_processor(
    name: &str,
    available: &[(String, IoProcessorFactory)],
    ctx: &IoProcessorContext<'_>,
) -> Result<Arc<dyn IoProcessor>, EngineError> {
    if available.is_empty() {
        return Err(EngineError::IoProcessor(format!(
            "No IOProcessor plugins installed but one is required ({name})."
        )));
    }
    let Some((_, factory)) = available.iter().find(|(n, _)| n == name) else {
        let names: Vec<String> = available.iter().map(|(n, _)| format!("'{n}'")).collect();
        return Err(EngineError::IoProcessor(format!(
            "The model requires the '{name}' IO Processor plugin but it is not installed. \
             Available plugins: [{}]",
            names.join(", ")
        )));
    };
    let processor = factory(ctx).map_err(|e| {
        EngineError::IoProcessor(format!("IO processor plugin '{name}' failed to start: {e}"))
    })?;
    Ok(Arc::from(processor))
}

/// vLLM's offline error when a plugin request has no `data`.
pub const NO_DATA: &str = "The 'data' field of the prompt is expected to contain the prompt \
    data and it cannot be None.";

/// The first half of the IO-processor flow (spec §6.3): `parse_data(data)`, `pre_process`
/// (with `request_id`) into engine prompts, and `merge_pooling_params()` (task `plugin` unless
/// the plugin says otherwise; `normalize` from the request wins). Bad data is
/// [`EngineError::InvalidPluginData`] with the plugin's text.
pub fn plugin_prompts(
    processor: &dyn IoProcessor,
    data: Option<&serde_json::Value>,
    request_id: &str,
    normalize: Option<bool>,
) -> Result<(Vec<Prompt>, PoolingParams), EngineError> {
    let data = data
        .filter(|d| !d.is_null())
        .ok_or_else(|| EngineError::InvalidPluginData(NO_DATA.into()))?;
    let bad =
        |e: Box<dyn std::error::Error + Send + Sync>| EngineError::InvalidPluginData(e.to_string());
    let input = processor.parse_data(data).map_err(bad)?;
    let prompts: Vec<Prompt> = processor
        .pre_process(&input, Some(request_id))
        .map_err(bad)?
        .into_iter()
        .map(|p| match p {
            IoPrompt::Text(t) => Prompt::Text(t),
            IoPrompt::TokenIds(ids) => Prompt::Tokens(ids),
        })
        .collect();
    if prompts.is_empty() {
        return Err(EngineError::InvalidPluginData(
            "You must pass at least one prompt".into(),
        ));
    }
    let merged = processor.merge_pooling_params(None);
    let params = PoolingParams {
        task: merged
            .task
            .as_deref()
            .and_then(PoolingTask::parse)
            .unwrap_or(PoolingTask::Plugin),
        normalize: normalize.or(merged.normalize),
        dimensions: None,
    };
    Ok((prompts, params))
}

/// The second half: `post_process` of the pooled outputs (in prompt order).
pub fn plugin_output(
    processor: &dyn IoProcessor,
    outputs: Vec<PoolingRequestOutput>,
    request_id: &str,
) -> Result<serde_json::Value, EngineError> {
    let outputs: Vec<IoPoolingOutput> = outputs
        .into_iter()
        .map(|o| IoPoolingOutput {
            request_id: o.request_id,
            prompt_token_ids: o.prompt_token_ids,
            data: o.outputs.data,
        })
        .collect();
    processor
        .post_process(&outputs, Some(request_id))
        .map_err(|e| EngineError::IoProcessor(format!("IoProcessor::post_process: {e}")))
}

/// A selected IO processor and the name it was selected by.
pub type SelectedIoProcessor = (String, Arc<dyn IoProcessor>);

/// The IO processor of a serving engine: `None` when no name is in force; otherwise the
/// `io_processor` plugins are loaded (subject to `VLLM_PLUGINS`) and the named one is built.
pub fn select_io_processor(
    requested: Option<&str>,
    config: &ResolvedConfig,
) -> Result<Option<SelectedIoProcessor>, EngineError> {
    let model = &config.engine.model;
    let Some(name) = io_processor_name(requested, model) else {
        return Ok(None);
    };
    let available = trellis_plugin::load_io_processor_plugins()?;
    let ctx = IoProcessorContext {
        model,
        architecture: &config.model.architecture,
        hidden_size: config.model.hidden_size,
    };
    let processor = build_io_processor(&name, &available, &ctx)?;
    Ok(Some((name, processor)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_plugin::IoResult;

    struct Dummy;

    impl IoProcessor for Dummy {
        fn pre_process(&self, _: &serde_json::Value, _: Option<&str>) -> IoResult<Vec<IoPrompt>> {
            Ok(vec![IoPrompt::Text("x".into())])
        }

        fn post_process(
            &self,
            _: &[IoPoolingOutput],
            _: Option<&str>,
        ) -> IoResult<serde_json::Value> {
            Ok(serde_json::Value::Null)
        }
    }

    fn ctx() -> IoProcessorContext<'static> {
        IoProcessorContext {
            model: Path::new("/m"),
            architecture: "BertModel",
            hidden_size: 4,
        }
    }

    fn msg(r: Result<Arc<dyn IoProcessor>, EngineError>) -> String {
        r.err().map(|e| e.to_string()).unwrap_or_default()
    }

    /// vLLM's tests/plugins_tests/test_io_processor_plugins.py, ported.
    #[test]
    fn selection_errors_and_success() {
        assert_eq!(
            msg(build_io_processor("wrong_plugin", &[], &ctx())),
            "No IOProcessor plugins installed but one is required (wrong_plugin)."
        );
        let factory: IoProcessorFactory = Arc::new(|_: &IoProcessorContext<'_>| {
            let p: Box<dyn IoProcessor> = Box::new(Dummy);
            Ok(p)
        });
        let available = vec![("my_plugin".to_string(), factory)];
        assert_eq!(
            msg(build_io_processor("wrong_plugin", &available, &ctx())),
            "The model requires the 'wrong_plugin' IO Processor plugin but it is not installed. \
             Available plugins: ['my_plugin']"
        );
        let p = build_io_processor("my_plugin", &available, &ctx()).expect("built");
        assert_eq!(
            p.pre_process(&serde_json::Value::Null, None).expect("pre"),
            vec![IoPrompt::Text("x".into())]
        );
        // Defaults of the contract: task `plugin`, parse_data not implemented.
        assert_eq!(p.merge_pooling_params(None).task.as_deref(), Some("plugin"));
        assert!(p.parse_data(&serde_json::Value::Null).is_err());
    }

    #[test]
    fn the_flag_wins_over_config_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"io_processor_plugin": "my_plugin"}"#,
        )
        .expect("write");
        assert_eq!(
            io_processor_name(None, dir.path()).as_deref(),
            Some("my_plugin")
        );
        assert_eq!(
            io_processor_name(Some("other"), dir.path()).as_deref(),
            Some("other")
        );
        assert_eq!(io_processor_name(None, Path::new("/nonexistent")), None);
    }
}
