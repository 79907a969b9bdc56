//! The C ABI from C: tests/capi/smoke.c is compiled against include/r1_runtime.h, linked with
//! the crate's cdylib, run on the r1-heads fixture, and what it prints is compared with the
//! Rust engine (generation, batched steps, forks, every error path it takes).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;
use r1_runtime::engine::sampling::SamplingParams;
use r1_runtime::engine::{Engine, EngineOptions};

/// The directory holding libr1_runtime.so (cargo builds the cdylib beside the test binaries).
fn cdylib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    let name = format!(
        "{}r1_runtime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    for dir in [deps.clone(), deps.parent().unwrap_or(&deps).to_path_buf()] {
        if dir.join(&name).exists() {
            return dir;
        }
    }
    panic!("{name} not found beside {}", exe.display());
}

fn run_smoke(model: &Path) -> HashMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = tmp.path().join("smoke");
    let lib = cdylib_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(root.join("include"))
        .arg(root.join("tests/capi/smoke.c"))
        .arg("-L")
        .arg(&lib)
        .arg("-lr1_runtime")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        out.status.success(),
        "smoke.c does not compile against include/r1_runtime.h:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).arg(model).output().expect("run smoke");
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "smoke failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{stdout}");
    stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn c_program_drives_the_engine() {
    let model = fixture("r1-heads");
    let facts = run_smoke(&model);
    let fact = |k: &str| {
        facts
            .get(k)
            .unwrap_or_else(|| panic!("smoke printed no `{k}`"))
    };

    let opts = EngineOptions {
        with_mtp: false,
        ..EngineOptions::default()
    };
    let mut e = Engine::load(&model, &opts).expect("fixture loads");
    let cfg = e.config().clone();
    let greedy = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let want = e
        .generate(&[0, 232, 219, 69, 232, 158, 253, 191], 6, &greedy)
        .expect("rust generate")
        .tokens;
    let want: Vec<String> = want.iter().map(u32::to_string).collect();
    let want = want.join(" ");

    assert_eq!(fact("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        fact("missing_dir"),
        "4 null",
        "R1_ERR_CHECKPOINT, *out cleared"
    );
    assert!(fact("missing_dir_message").contains("/nonexistent/r1-model"));
    assert_eq!(fact("last_error_after_success"), "null");
    assert_eq!(
        fact("info"),
        &format!(
            "{} {} {} {} 64",
            cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings, cfg.eos_token_ids[0]
        )
    );
    assert_eq!(fact("generate"), &want, "C generate equals Rust generate");
    assert_eq!(
        fact("stepwise"),
        &want,
        "C forward steps equal Rust generate"
    );
    assert_eq!(fact("fork_len"), "8");
    assert_eq!(fact("fork_equal"), "1", "a fork decodes like its parent");
    assert_eq!(fact("seq_len"), "13");
    assert_eq!(
        fact("rows_last_equal"),
        "1",
        "r1_forward_rows' last row = r1_forward"
    );
    assert_eq!(fact("zero_rows"), "1");
    assert_eq!(fact("duplicate_sequence"), "1");
    assert!(fact("duplicate_sequence_message").contains("appears twice"));
    assert_eq!(fact("small_buffer"), "1");
    assert_eq!(fact("bad_token"), "2");
    assert!(fact("bad_token_message").contains("outside the vocabulary"));
    assert_eq!(fact("null_engine"), "1");
    assert_eq!(
        fact("seq_len_after_errors"),
        "13",
        "failed steps change nothing"
    );
    assert_eq!(fact("truncated_len"), "3");
    assert_eq!(
        fact("pages_in_use"),
        "0",
        "freed sequences return their pages"
    );
}
