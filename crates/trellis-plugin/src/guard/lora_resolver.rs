//! A plugin's LoRA resolver behind the guard: building its future and every poll of it run
//! under `catch_unwind`; a panic is logged at ERROR and the resolver answers "not found".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::Owner;
use crate::lora_resolver::{LoraRequest, LoraResolver, ResolveFuture};

/// The guarded resolver.
pub(super) struct GuardedResolver {
    pub(super) inner: Arc<dyn LoraResolver>,
    pub(super) owner: Owner,
}

const METHOD: &str = "LoraResolver::resolve_lora";

impl LoraResolver for GuardedResolver {
    fn resolve_lora<'a>(
        &'a self,
        base_model_name: &'a str,
        lora_name: &'a str,
    ) -> ResolveFuture<'a> {
        match self.owner.call(METHOD, || {
            self.inner.resolve_lora(base_model_name, lora_name)
        }) {
            Ok(inner) => Box::pin(Guarded {
                inner: Some(inner),
                owner: &self.owner,
            }),
            Err(message) => {
                eprintln!("ERROR trellis: {message}");
                Box::pin(std::future::ready(None))
            }
        }
    }
}

struct Guarded<'a> {
    inner: Option<ResolveFuture<'a>>,
    owner: &'a Owner,
}

impl Future for Guarded<'_> {
    type Output = Option<LoraRequest>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let owner = self.owner;
        let Some(fut) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match owner.call(METHOD, || fut.as_mut().poll(cx)) {
            Ok(p) => p,
            Err(message) => {
                eprintln!("ERROR trellis: {message}");
                self.inner = None;
                Poll::Ready(None)
            }
        }
    }
}
