//! vLLM's `tests/lora/test_resolver.py` and `tests/plugins/lora_resolvers/
//! test_filesystem_resolver.py` (spec §5.6), plus path confinement (issue 12).
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use trellis_plugin::lora_fs_resolver::FilesystemResolver;
use trellis_plugin::{LoraRequest, LoraResolver, LoraResolverRegistry, ResolveFuture};

/// Polls a future that completes without waiting (these resolvers never wait).
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// vLLM's `DummyLoRAResolver`: knows `test_lora` only.
struct Dummy;

impl LoraResolver for Dummy {
    fn resolve_lora<'a>(&'a self, base: &'a str, name: &'a str) -> ResolveFuture<'a> {
        let found = (name == "test_lora").then(|| LoraRequest {
            lora_name: name.into(),
            lora_int_id: 1,
            lora_path: format!("/dummy/{base}/{name}"),
            ..Default::default()
        });
        Box::pin(std::future::ready(found))
    }
}

#[test]
fn registry_registers_lists_and_overwrites_in_place() {
    let mut reg = LoraResolverRegistry::default();
    let first: Arc<dyn LoraResolver> = Arc::new(Dummy);
    reg.register_resolver("Dummy", first.clone());
    reg.register_resolver("Other", Arc::new(Dummy));
    assert_eq!(reg.get_supported_resolvers(), ["Dummy", "Other"]);
    assert!(Arc::ptr_eq(&reg.get_resolver("Dummy").unwrap(), &first));
    let second: Arc<dyn LoraResolver> = Arc::new(Dummy);
    reg.register_resolver("Dummy", second.clone());
    assert_eq!(reg.get_supported_resolvers(), ["Dummy", "Other"]);
    assert!(Arc::ptr_eq(&reg.get_resolver("Dummy").unwrap(), &second));
    let err = reg.get_resolver("Nope").err().unwrap();
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(
        err.to_string(),
        "LoRA resolver 'Nope' not found. Available resolvers: [\"Dummy\", \"Other\"]"
    );
}

#[test]
fn dummy_resolver_finds_only_its_adapter() {
    let r = Dummy;
    let hit = block_on(r.resolve_lora("base", "test_lora")).unwrap();
    assert_eq!(hit.lora_name, "test_lora");
    assert!(block_on(r.resolve_lora("base", "other")).is_none());
}

fn write_adapter(dir: &Path, peft_type: &str, base: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = serde_json::json!({"peft_type": peft_type, "base_model_name_or_path": base,
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
}

#[test]
fn filesystem_resolver_follows_vllm_and_stays_in_its_root() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let base = "/models/smollm2.gguf";
    write_adapter(&cache.join("org/repo"), "LORA", base);
    write_adapter(&cache.join("ptune"), "P_TUNING", base);
    write_adapter(&cache.join("otherbase"), "LORA", "SomeOtherModel");
    write_adapter(&tmp.path().join("outside"), "LORA", base);
    std::os::unix::fs::symlink(tmp.path().join("outside"), cache.join("link")).unwrap();
    std::fs::create_dir_all(cache.join("badjson")).unwrap();
    std::fs::write(cache.join("badjson/adapter_config.json"), "{").unwrap();

    let r = FilesystemResolver::new(&cache).unwrap();
    let hit = block_on(r.resolve_lora(base, "org/repo")).unwrap();
    assert_eq!(hit.lora_name, "org/repo");
    let root = cache.canonicalize().unwrap();
    assert_eq!(Path::new(&hit.lora_path), root.join("org/repo"));
    for name in [
        "missing",
        "ptune",
        "otherbase",
        "badjson",
        "link",
        "../outside",
        "org/../../outside",
        "",
        "/etc",
    ] {
        assert!(
            block_on(r.resolve_lora(base, name)).is_none(),
            "{name:?} must not resolve"
        );
    }
    let abs = tmp.path().join("outside");
    assert!(block_on(r.resolve_lora(base, abs.to_str().unwrap())).is_none());

    let err = FilesystemResolver::new(tmp.path().join("nowhere")).unwrap_err();
    assert_eq!(
        err,
        "VLLM_LORA_RESOLVER_CACHE_DIR must be set to a valid directory for Filesystem Resolver \
         plugin to function"
    );
    std::fs::write(tmp.path().join("file"), "x").unwrap();
    assert!(FilesystemResolver::new(tmp.path().join("file")).is_err());
}
