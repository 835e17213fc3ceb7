//! `trellis serve`: the OpenAI-compatible server (vLLM's `vllm serve`).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use trellis_engine::{AsyncLLM, UsageContext};
use trellis_server::{AppState, ServerConfig};

use crate::args::ServeArgs;

/// Checks `--dtype`: Trellis computes in float32 on CPU.
fn check_dtype(dtype: &str) -> Result<()> {
    match dtype.to_ascii_lowercase().as_str() {
        "auto" | "float32" | "float" => Ok(()),
        other => bail!(
            "--dtype {other} is not supported: Trellis computes in float32 on CPU (use auto, float32 or float)"
        ),
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    check_dtype(&args.dtype)?;
    let mut engine_args = args.engine.clone();
    match (&args.model_tag, &engine_args.model) {
        (Some(a), Some(b)) if a != b => {
            bail!(
                "the model was given twice, as {} and --model {}",
                a.display(),
                b.display()
            )
        }
        (Some(a), _) => engine_args.model = Some(a.clone()),
        _ => {}
    }
    let mut config = engine_args.to_config()?;
    config.usage = UsageContext::Server;
    let model_path = config.model.display().to_string();
    let served_name = args
        .served_model_name
        .first()
        .cloned()
        .unwrap_or_else(|| model_path.clone());
    // vLLM accepts a file or the template itself.
    let chat_template = match &args.chat_template {
        Some(t) if !std::path::Path::new(t).exists() && (t.contains("{{") || t.contains("{%")) => {
            Some(t.clone())
        }
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the chat template {p}"))?,
        ),
        None => None,
    };
    config.served_model_name = Some(served_name.clone());
    config.disable_log_stats = args.disable_log_stats;
    config.max_waiting_requests = Some(args.max_waiting_requests);
    let mut registries = crate::platforms::engine_registries()?;
    let lora_resolvers = crate::lora_args::resolvers(&registries.lora_resolvers)?;
    // Stat-logger plugins are loaded by the serving engine only, as in vLLM.
    trellis_plugin::load_stat_logger_plugins(&mut registries)?;
    let engine = match AsyncLLM::with_registries(config, registries) {
        Ok(engine) => Arc::new(engine),
        // Most load errors name the file already: say it once.
        Err(e) if e.to_string().contains(&model_path) => return Err(e.into()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot load {model_path}"))),
    };
    let mut server = ServerConfig::new(served_name.clone(), model_path);
    server.api_key = args.api_key.clone().filter(|k| !k.is_empty());
    server.chat_template = chat_template;
    server.disable_log_requests = args.disable_log_requests;
    server.conn = connection_limits(&args)?;
    server.allow_runtime_lora_updating = crate::lora_args::runtime_lora_updating();
    server.lora_resolvers = lora_resolvers;
    server.skip_model_name_validation = std::env::var("VLLM_SKIP_MODEL_NAME_VALIDATION")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true"));
    server.enable_auto_tool_choice = args.enable_auto_tool_choice;
    server.tool_call_parser = args.tool_call_parser.clone();
    // The IO processor is loaded by the serving front end at startup, as in vLLM.
    let io_processor =
        trellis_engine::select_io_processor(args.io_processor_plugin.as_deref(), engine.config())?
            .map(|(name, p)| {
                eprintln!("trellis: Using IO processor plugin {name}");
                p
            });
    let state = AppState::with_io_processor(engine, server, io_processor)
        .context("invalid --chat-template")?;

    // One thread for HTTP, as vLLM's API server is one asyncio loop: the cores belong to the
    // compute pool (the engine thread and its workers), and a second busy runtime thread would
    // only compete with them.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let modules = &args.engine.lora.lora_modules;
        state
            .lora
            .load_static(&state.engine, modules)
            .await
            .map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        let addr = listener
            .local_addr()
            .context("cannot read the listening address")?;
        eprintln!("Trellis serving {served_name} on http://{addr}");
        let died = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, watched) = (died.clone(), state.engine.clone());
        let shutdown = async move {
            tokio::select! {
                _ = trellis_server::shutdown_signal() => {}
                _ = trellis_server::engine_died(watched) => {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    eprintln!(
                        "ERROR trellis: the engine is dead; shutting down (requests in flight \
                         end with an error, new ones get 503)"
                    );
                }
            }
        };
        trellis_server::serve(listener, state, shutdown)
            .await
            .context("the server failed")?;
        if died.load(std::sync::atomic::Ordering::SeqCst) {
            anyhow::bail!(
                "the engine died; trellis serve exits so that a supervisor can restart it"
            );
        }
        Ok(())
    })?;
    eprintln!("Trellis server stopped");
    Ok(())
}

/// The connection cap and timeouts from the flags. The cap is kept under the open-file limit,
/// which is first raised to its hard maximum (a server's sockets are files).
fn connection_limits(args: &ServeArgs) -> anyhow::Result<trellis_server::ConnLimits> {
    let secs = |v: f64, flag: &str| {
        if v.is_finite() && v > 0.0 && v <= 86_400.0 {
            Ok(std::time::Duration::from_secs_f64(v))
        } else {
            Err(anyhow::anyhow!(
                "{flag} must be a number of seconds above 0 and at most 86400, got {v}"
            ))
        }
    };
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections must be at least 1");
    }
    let mut max_connections = args.max_connections;
    if let Some(files) = raise_open_file_limit() {
        // Model files, plugin libraries, the engine's own descriptors: keep some for them.
        let usable = files.saturating_sub(64).max(1);
        if max_connections > usable {
            eprintln!(
                "trellis: --max-connections {max_connections} lowered to {usable}: the process \
                 may open {files} files (ulimit -n)"
            );
            max_connections = usable;
        }
    }
    Ok(trellis_server::ConnLimits {
        max_connections,
        header_timeout: secs(args.timeout_keep_alive, "--timeout-keep-alive")?,
        body_timeout: secs(args.http_body_timeout, "--http-body-timeout")?,
    })
}

/// Raises the soft open-file limit to the hard one; returns the limit now in force.
fn raise_open_file_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    usize::try_from(lim.rlim_cur).ok()
}
