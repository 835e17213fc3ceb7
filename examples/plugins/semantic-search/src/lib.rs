//! An IO processor plugin (group `io_processor`, entry `semantic_search`): semantic search
//! over the documents of one `/pooling` request.
//!
//! ```json
//! POST /pooling
//! {"data": {"query": "how do I reset my password?", "documents": ["...", "..."], "top_k": 2}}
//! ```
//!
//! `pre_process` turns the request into one prompt for the query and one per document; the
//! engine pools them all in one batch; `post_process` ranks the documents by the cosine
//! similarity of their embedding with the query's and answers
//! `{"query", "results": [{"index", "document", "score"}]}`, best first, `top_k` of them
//! (all when absent). Run it with an embedding model:
//!
//! ```sh
//! trellis plugins build examples/plugins/semantic-search
//! trellis serve --model models/all-MiniLM-L6-v2 --io-processor-plugin semantic_search
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use trellis_plugin::{
    IoPoolingOutput, IoProcessor, IoProcessorContext, IoProcessorFactory, IoPrompt, IoResult,
    RegisterResult, Registrar,
};

/// The entry name `--io-processor-plugin` selects.
pub const ENTRY: &str = "semantic_search";

/// The processor. The contract hands `post_process` only the pooled outputs: the parsed
/// request is kept from `pre_process` to `post_process` under the request id.
#[derive(Default)]
pub struct SemanticSearch {
    pending: Mutex<HashMap<String, Value>>,
}

const SHAPE: &str = "data must be {\"query\": string, \"documents\": [string, ...], \"top_k\": \
     positive integer (optional)}";

/// The query and the documents of a parsed request.
fn fields(input: &Value) -> IoResult<(&str, Vec<&str>)> {
    let query = input["query"].as_str().ok_or(SHAPE)?;
    let docs = input["documents"].as_array().ok_or(SHAPE)?;
    let docs: Option<Vec<&str>> = docs.iter().map(Value::as_str).collect();
    Ok((query, docs.ok_or(SHAPE)?))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-12)
}

impl IoProcessor for SemanticSearch {
    fn parse_data(&self, data: &Value) -> IoResult<Value> {
        let (query, docs) = fields(data)?;
        if query.is_empty() || docs.is_empty() || docs.iter().any(|d| d.is_empty()) {
            return Err("the query and at least one document must be non-empty strings".into());
        }
        let top_k = match &data["top_k"] {
            Value::Null => docs.len(),
            v => match v.as_u64() {
                Some(k) if k > 0 => k as usize,
                _ => return Err(SHAPE.into()),
            },
        };
        Ok(json!({"query": query, "documents": docs, "top_k": top_k}))
    }

    fn pre_process(&self, input: &Value, request_id: Option<&str>) -> IoResult<Vec<IoPrompt>> {
        let (query, docs) = fields(input)?;
        let mut prompts = vec![IoPrompt::Text(query.to_string())];
        prompts.extend(docs.iter().map(|d| IoPrompt::Text(d.to_string())));
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.insert(request_id.unwrap_or_default().to_string(), input.clone());
        Ok(prompts)
    }

    fn post_process(
        &self,
        outputs: &[IoPoolingOutput],
        request_id: Option<&str>,
    ) -> IoResult<Value> {
        let input = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending
                .remove(request_id.unwrap_or_default())
                .ok_or("post_process: no pre_process for this request")?
        };
        let (query, docs) = fields(&input)?;
        let top_k = input["top_k"].as_u64().map_or(docs.len(), |k| k as usize);
        let Some((q, rest)) = outputs.split_first() else {
            return Err("post_process: no outputs".into());
        };
        if rest.len() != docs.len() {
            return Err(format!("{} documents but {} outputs", docs.len(), rest.len()).into());
        }
        let mut scored: Vec<(usize, f64)> = rest
            .iter()
            .enumerate()
            .map(|(i, d)| (i, cosine(&q.data, &d.data)))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let results: Vec<Value> = scored
            .into_iter()
            .take(top_k)
            .map(|(i, s)| json!({"index": i, "document": docs[i], "score": s}))
            .collect();
        Ok(json!({"query": query, "results": results}))
    }
}

/// The `io_processor` entry: registers the factory.
pub fn register(registrar: &mut dyn Registrar) -> RegisterResult {
    let factory: IoProcessorFactory = Arc::new(|_ctx: &IoProcessorContext<'_>| {
        let p: Box<dyn IoProcessor> = Box::new(SemanticSearch::default());
        Ok(p)
    });
    registrar.register_io_processor("SemanticSearch", factory);
    Ok(())
}

trellis_plugin::declare_plugin! {
    io_processor "semantic_search" => register,
}
