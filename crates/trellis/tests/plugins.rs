//! Plugin loading through the real `trellis` binary (spec §1.5): the example plugins loaded at
//! run time (built once with `trellis plugins build`) and, with `--features example-plugins`,
//! compiled in; `VLLM_PLUGINS` cases; a refused fingerprint; a failing plugin.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const DUMMY_MODEL: &str = "register_dummy_model";

/// A `trellis` command that sees only the plugin directory `dir` (HOME isolated too).
fn trellis(dir: Option<&Path>) -> Command {
    match dir {
        Some(d) => common::trellis(&[d]),
        None => common::trellis(&[]),
    }
}

/// The plugin directory with the run-time dummy-model installed (built once per test process
/// with `trellis plugins build --debug`).
fn installed() -> PathBuf {
    common::installed("dummy-model")
}

/// `trellis plugins list` → (stdout, stderr).
fn list(cmd: &mut Command) -> (String, String) {
    let out = cmd.args(["plugins", "list"]).output().expect("run trellis");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line of plugin `name` found at run time (`runtime`) or compiled in.
fn line<'a>(stdout: &'a str, name: &str, runtime: bool) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(&format!("{name}\t")) && l.contains("\tcompiled in\t") != runtime)
        .unwrap_or_else(|| panic!("{name} not listed: {stdout}"))
}

#[test]
fn runtime_plugin_is_listed_and_loaded() {
    let dir = installed();
    let (out, err) = list(&mut trellis(Some(&dir)));
    let l = line(&out, DUMMY_MODEL, true);
    assert!(l.contains("\tgeneral\t"), "{l}");
    assert!(l.contains("dummy-model"), "origin is the folder: {l}");
    assert!(l.ends_with("\tloaded"), "{l}");
    assert!(!err.contains("VLLM_PLUGINS requested"), "{err}");
}

/// `plugins list` starts with a header row; `--json` gives the same rows as one JSON array.
#[test]
fn plugins_list_has_a_header_and_json() {
    let dir = installed();
    let (out, _) = list(&mut trellis(Some(&dir)));
    assert_eq!(
        out.lines().next(),
        Some("NAME\tGROUP\tORIGIN\tSTATUS"),
        "{out}"
    );
    let out = trellis(Some(&dir))
        .args(["plugins", "list", "--json"])
        .output()
        .expect("run trellis");
    assert!(out.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let row = rows
        .as_array()
        .expect("an array")
        .iter()
        .find(|r| r["name"] == DUMMY_MODEL && r["origin"] == "library")
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(row["group"], "general");
    assert_eq!(row["status"], "loaded");
    assert!(
        row["library_dir"]
            .as_str()
            .is_some_and(|d| d.ends_with("dummy-model")),
        "{row}"
    );
}

/// `plugins build` leaves the plugin's folder as it found it (no Cargo.lock, no target/) and
/// says where the library went.
#[cfg(not(feature = "example-plugins"))]
#[test]
fn plugins_build_writes_nothing_into_the_plugin_folder() {
    let source = common::repo().join("examples/plugins/json-stat-logger");
    let dest = tempfile::tempdir().unwrap();
    let (target, _lock) = common::build_lock();
    let (code, out, err) = common::run(
        common::trellis(&[dest.path()])
            .args(["plugins", "build", "--debug", "--target-dir"])
            .arg(&target)
            .arg(&source)
            .env_remove("CARGO_TARGET_DIR"),
    );
    assert_eq!(code, 0, "{err}");
    let library = dest.path().join("json-stat-logger/libjson_stat_logger.so");
    assert!(out.contains(&library.display().to_string()), "{out}");
    assert!(library.is_file());
    assert!(!source.join("Cargo.lock").exists());
    assert!(!source.join("target").exists());
}

#[test]
fn vllm_plugins_empty_filters_everything() {
    let (out, _) = list(trellis(Some(&installed())).env("VLLM_PLUGINS", ""));
    assert!(line(&out, DUMMY_MODEL, true).ends_with("filtered out by VLLM_PLUGINS"));
}

#[test]
fn vllm_plugins_exact_list_and_unknown_name_warning() {
    let (out, err) = list(
        trellis(Some(&installed())).env("VLLM_PLUGINS", format!("does_not_exist,{DUMMY_MODEL}")),
    );
    assert!(line(&out, DUMMY_MODEL, true).ends_with("\tloaded"), "{out}");
    assert!(err.contains("VLLM_PLUGINS requested"), "{err}");
    assert!(err.contains("does_not_exist"), "{err}");
    // Not trimmed: " register_dummy_model" is another name.
    let (out, _) = list(trellis(Some(&installed())).env("VLLM_PLUGINS", format!(" {DUMMY_MODEL}")));
    assert!(line(&out, DUMMY_MODEL, true).ends_with("filtered out by VLLM_PLUGINS"));
}

#[test]
fn wrong_fingerprint_is_refused_and_never_called() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("dummy-model");
    std::fs::create_dir_all(&folder).unwrap();
    for f in std::fs::read_dir(installed().join("dummy-model")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, folder.join(f.file_name().unwrap())).unwrap();
    }
    let manifest = folder.join("trellis-plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let text = text.replace("rustc ", "rustc 0.0.0-other ");
    std::fs::write(&manifest, text).unwrap();
    // DUMMY_MODEL_FAIL would make a call fail: a refused library is never called.
    let (out, _) = list(trellis(Some(tmp.path())).env("DUMMY_MODEL_FAIL", "1"));
    let l = line(&out, DUMMY_MODEL, true);
    assert!(l.contains("refused"), "{l}");
    assert!(
        l.contains("rustc 0.0.0-other"),
        "shows the plugin's fingerprint: {l}"
    );
    assert!(
        l.contains(trellis_plugin::BUILD_FINGERPRINT),
        "shows the host's: {l}"
    );
    assert!(
        l.contains("trellis plugins build"),
        "says how to rebuild: {l}"
    );
    assert!(!l.contains("DUMMY_MODEL_FAIL"), "{l}");
}

#[test]
fn failing_plugin_is_reported_with_its_name() {
    let (out, _) = list(trellis(Some(&installed())).env("DUMMY_MODEL_FAIL", "1"));
    let l = line(&out, DUMMY_MODEL, true);
    assert!(
        l.contains("failed: plugin 'register_dummy_model' (general) failed"),
        "{l}"
    );
    assert!(l.contains("DUMMY_MODEL_FAIL is set"), "{l}");
}

#[cfg(feature = "example-plugins")]
#[test]
fn compiled_in_plugin_is_listed() {
    let (out, _) = list(&mut trellis(None));
    let l = line(&out, DUMMY_MODEL, false);
    assert!(l.contains("\tcompiled in\t"), "{l}");
    assert!(l.ends_with("\tloaded"), "{l}");
    let (out, _) = list(trellis(None).env("VLLM_PLUGINS", ""));
    assert!(line(&out, DUMMY_MODEL, false).ends_with("filtered out by VLLM_PLUGINS"));
}

/// `trellis generate` of one short prompt with the default model into `dir/out.jsonl`; returns
/// (exit code, stderr, the output path).
fn generate(cmd: &mut Command, dir: &Path) -> (i32, String, PathBuf) {
    let input = dir.join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"The capital of France is\"}\n")
        .expect("write the input");
    let output = dir.join("out.jsonl");
    cmd.arg("generate")
        .args(common::SMALL)
        .arg("--model")
        .arg(common::default_model())
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--max-tokens", "2"]);
    let (code, _, err) = common::run(cmd);
    (code, err, output)
}

/// Issue 11, vLLM's failure policy (spec §1.4): a library that cannot be loaded (its `.so` is
/// gone) or is refused (built by another rustc) is logged at ERROR with the plugin's name, the
/// reason and the fix, and skipped: the model is still served. When `VLLM_PLUGINS` names it
/// explicitly, startup fails instead. (Run-time plugins only: compiled in, the library would
/// be a duplicate of the linked-in entry and never opened.)
#[cfg(not(feature = "example-plugins"))]
#[test]
fn stale_library_is_skipped_with_an_error_unless_vllm_plugins_names_it() {
    for breakage in ["missing library", "other rustc"] {
        let tmp = tempfile::tempdir().unwrap();
        let folder = tmp.path().join("plugins").join("dummy-model");
        std::fs::create_dir_all(&folder).unwrap();
        for f in std::fs::read_dir(installed().join("dummy-model")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, folder.join(f.file_name().unwrap())).unwrap();
        }
        let manifest = folder.join("trellis-plugin.toml");
        let (reason, fix) = match breakage {
            "missing library" => {
                let lib = folder.join("libdummy_model.so");
                std::fs::remove_file(&lib).unwrap();
                ("cannot load", "trellis plugins build")
            }
            _ => {
                let text = std::fs::read_to_string(&manifest).unwrap();
                std::fs::write(&manifest, text.replace("rustc ", "rustc 0.0.0-other ")).unwrap();
                (
                    "was built for another trellis",
                    "rebuild it with this trellis",
                )
            }
        };
        let plugins = tmp.path().join("plugins");
        let (code, err, output) = generate(&mut trellis(Some(&plugins)), tmp.path());
        assert_eq!(code, 0, "{breakage}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("ERROR trellis: Failed to load plugin register_dummy_model: "))
            .unwrap_or_else(|| panic!("{breakage}: no ERROR line: {err}"));
        assert!(line.contains(reason), "{line}");
        assert!(line.contains(fix), "{line}");
        assert!(line.contains("skipped"), "{line}");
        assert!(
            err.contains("not run: register_dummy_model (failed to load)"),
            "{err}"
        );
        assert_eq!(common::output_token_ids(&output)[0].len(), 2);

        let (code, err, _) = generate(
            trellis(Some(&plugins)).env("VLLM_PLUGINS", DUMMY_MODEL),
            tmp.path(),
        );
        common::one_error_line(
            code,
            &err,
            &[
                "register_dummy_model",
                reason,
                "VLLM_PLUGINS names 'register_dummy_model' explicitly",
            ],
        );
    }
}

/// Issue 11: a broken manifest is reported once, although discovery runs once per group.
#[test]
fn broken_manifest_is_reported_once() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("plugins").join("broken");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("trellis-plugin.toml"), "not = [a manifest").unwrap();
    let (code, err, _) = generate(&mut trellis(Some(&tmp.path().join("plugins"))), tmp.path());
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err.matches("WARNING trellis: skipping a plugin folder")
            .count(),
        1,
        "{err}"
    );
}

/// Copies the file or directory `from` to `to`, leaving out `target` directories and
/// `Cargo.lock`.
#[cfg(not(feature = "example-plugins"))]
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("create a directory");
        for e in std::fs::read_dir(from).expect("read a directory") {
            let e = e.expect("read a directory entry");
            let name = e.file_name();
            if name == "target" || name == "Cargo.lock" {
                continue;
            }
            copy_tree(&e.path(), &to.join(name));
        }
    } else {
        std::fs::copy(from, to).expect("copy a file");
    }
}

/// Issue 11, a sound fingerprint: the fingerprint identifies the trellis-plugin *source*, not
/// its version string. A byte-identical copy of trellis-plugin elsewhere, as a path and as a
/// git dependency, gives the same fingerprint: the plugin builds and loads. A copy whose `Platform`
/// trait has two methods swapped (same version) is refused by `plugins build` and at load
/// time, with a sentence naming what differs and how to rebuild.
#[cfg(not(feature = "example-plugins"))]
#[test]
fn swapped_trait_methods_are_refused_and_identical_path_and_git_copies_are_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    let repo = common::repo();
    // A workspace with copies of trellis-plugin and the crate it shares, and of dummy-platform.
    let root = std::fs::read_to_string(repo.join("Cargo.toml")).unwrap();
    let root = root.replace(
        "members = [\"crates/*\"]",
        "members = [\"crates/trellis-plugin\", \"crates/trellis-sched\", \"crates/trellis-build\"]",
    );
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("Cargo.toml"), root).unwrap();
    for c in [
        "crates/trellis-plugin",
        "crates/trellis-sched",
        "crates/trellis-build",
        "examples/plugins/dummy-platform",
    ] {
        copy_tree(&repo.join(c), &ws.join(c));
    }
    let example = ws.join("examples/plugins/dummy-platform");
    let build = |plugins: &Path| {
        let (target, _lock) = common::build_lock();
        let out = common::run(
            common::trellis(&[plugins])
                .args(["plugins", "build", "--debug"])
                .arg(&example)
                .env("CARGO_TARGET_DIR", &target),
        );
        // The library just built, before another build replaces it.
        let lib = tmp.path().join("built.so");
        std::fs::copy(target.join("debug/libdummy_platform.so"), &lib).unwrap();
        (out, lib)
    };

    // Byte-identical: accepted, and the library is the one listed.
    let identical = tmp.path().join("identical");
    let ((code, _, err), _) = build(&identical);
    assert_eq!(code, 0, "an identical copy must be accepted: {err}");
    let (out, _) = list(&mut trellis(Some(&identical)));
    assert!(
        line(&out, "dummy_platform_plugin", true).ends_with("loaded (activated: DummyDevice)"),
        "{out}"
    );

    // A git dependency on the same source (the copy committed to a local repository): the
    // same fingerprint and shared-crates identity, accepted.
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .current_dir(&ws)
            .output()
            .expect("run git");
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "-A", "crates", "Cargo.toml"]);
    git(&["commit", "-q", "-m", "trellis-plugin"]);
    let cargo_toml = example.join("Cargo.toml");
    let path_dep = std::fs::read_to_string(&cargo_toml).unwrap();
    let from = "trellis-plugin = { path = \"../../../crates/trellis-plugin\" }";
    assert!(path_dep.contains(from), "{path_dep}");
    let url = format!("trellis-plugin = {{ git = \"file://{}\" }}", ws.display());
    std::fs::write(&cargo_toml, path_dep.replace(from, &url)).unwrap();
    let from_git = tmp.path().join("from-git");
    let ((code, _, err), _) = build(&from_git);
    assert_eq!(
        code, 0,
        "a git dependency on the same source must be accepted: {err}"
    );
    let (out, _) = list(&mut trellis(Some(&from_git)));
    assert!(
        line(&out, "dummy_platform_plugin", true).ends_with("loaded (activated: DummyDevice)"),
        "{out}"
    );
    std::fs::write(&cargo_toml, path_dep).unwrap();

    // Two methods of the Platform trait swapped, same version: refused by plugins build.
    let platform = ws.join("crates/trellis-plugin/src/platform.rs");
    let text = std::fs::read_to_string(&platform).unwrap();
    let (a, b) = (
        "    fn device_name(&self) -> &str;",
        "    fn device_type(&self) -> &str;",
    );
    assert!(text.contains(a) && text.contains(b));
    let swapped = text.replace(a, "@A@").replace(b, a).replace("@A@", b);
    std::fs::write(&platform, swapped).unwrap();
    let swapped_dir = tmp.path().join("swapped");
    let ((code, _, err), lib) = build(&swapped_dir);
    assert_ne!(code, 0, "the swapped trait must be refused: {err}");
    assert!(
        err.contains("was built for another trellis: the trellis-plugin API (version and source)"),
        "{err}"
    );
    assert!(
        err.contains("differ; build it against the trellis-plugin source"),
        "{err}"
    );

    // The same library put in place of an accepted one: refused at load time, never called.
    let folder = identical.join("dummy-platform");
    std::fs::copy(&lib, folder.join("libdummy_platform.so")).unwrap();
    let (out, _) = list(&mut trellis(Some(&identical)));
    let l = line(&out, "dummy_platform_plugin", true);
    assert!(l.contains("refused"), "{l}");
    assert!(
        l.contains(
            "the trellis-plugin API (version and source) (plugin: trellis-plugin 0.1.0 source"
        ),
        "{l}"
    );
    assert!(
        l.contains("rebuild it with this trellis: trellis plugins build"),
        "{l}"
    );
}
