//! The r1-run binary end to end on the committed fixtures.

mod common;

use std::process::Command;

use common::*;

fn r1_run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_r1-run"))
        .args(args)
        .output()
        .expect("r1-run runs")
}

/// Runs `r1-run generate ... --json` and parses its last stdout line.
fn generate_json(args: &[&str]) -> serde_json::Value {
    let res = r1_run(&[&["generate"], args, &["--json"]].concat());
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let stdout = String::from_utf8(res.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn tokens_of(v: &serde_json::Value) -> Vec<u32> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn csv(tokens: &[u32]) -> String {
    tokens
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn logits_writes_reference_matching_safetensors() {
    let r = reference("r1-heads");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let model = fixture("r1-heads");
    let res = r1_run(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &csv(&r.tokens),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, want) in [("logits", &r.logits), ("mtp_logits", &r.mtp_logits)] {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let rows = if name == "logits" {
            r.tokens.len()
        } else {
            r.tokens.len() - 1
        };
        assert_eq!(t.shape(), &[rows, r.vocab]);
        let got: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let (err, mag) = max_err(&got, want);
        assert!(err <= 2e-3 * mag, "{name}: {err}");
    }
}

#[test]
fn generate_json_reports_tokens_and_speed() {
    let r = reference("small-odd");
    let model = fixture("small-odd");
    let v = generate_json(&[
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &csv(&r.tokens),
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]);
    assert_eq!(tokens_of(&v), r.greedy);
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn info_summarizes_the_checkpoint() {
    let model = fixture("r1-heads");
    let res = r1_run(&["info", "--model", model.to_str().unwrap()]);
    assert!(res.status.success());
    let text = String::from_utf8(res.stdout).unwrap();
    for needle in [
        "mtp: present (layer 2)",
        "F8_E4M3",
        "BF16",
        "kv_lora 512",
        "total",
    ] {
        assert!(text.contains(needle), "`{needle}` missing in:\n{text}");
    }
}

#[test]
fn bad_input_fails_with_a_message() {
    let model = fixture("r1-heads");
    let m = model.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["generate", "--model", m, "--tokens", "0,9999"],
            "token id 9999 is outside the vocabulary",
        ),
        (
            &["generate", "--model", m, "--tokens", "0,x"],
            "`x` is not a token id",
        ),
        (
            &["generate", "--model", "/no/such/dir", "--tokens", "0"],
            "/no/such/dir",
        ),
        (
            &[
                "logits",
                "--model",
                m,
                "--tokens",
                "0",
                "--out",
                "/",
                "--precision",
                "fp4",
            ],
            "unknown precision",
        ),
    ];
    for (args, needle) in cases {
        let res = r1_run(args);
        assert!(!res.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: `{needle}` missing in {err}"
        );
    }
}

#[test]
fn generate_with_mtp_speculation_reports_counts() {
    let r = reference("r1-heads");
    let model = fixture("r1-heads");
    let v = generate_json(&[
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &csv(&r.tokens),
        "--max-new-tokens",
        "8",
        "--speculative",
        "mtp",
        "--draft-tokens",
        "2",
    ]);
    assert_eq!(
        tokens_of(&v),
        r.greedy,
        "speculation keeps the greedy output"
    );
    let spec = &v["spec"];
    assert!(spec["steps"].as_u64().unwrap() >= 1);
    assert!(spec["accepted"].as_u64().unwrap() <= spec["drafted"].as_u64().unwrap());
}

/// `r1-run bench`: every request produces exactly its output length; throughput and latency
/// figures are reported; a cache smaller than the batch's needs pre-empts and still finishes.
#[test]
fn bench_reports_throughput_and_latency() {
    let model = fixture("r1-heads");
    let model = model.to_str().unwrap();
    for (cache, want_preemption) in [("1048576", false), ("1024", true)] {
        let res = r1_run(&[
            "bench",
            "--model",
            model,
            "--requests",
            "6",
            "--input-len",
            "40",
            "--output-len",
            "100",
            "--step-tokens",
            "64",
            "--cache-tokens",
            cache,
            "--json",
        ]);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8(res.stdout).unwrap().trim()).unwrap();
        assert_eq!(v["requests"], 6);
        assert_eq!(v["output_tokens"], 600);
        assert_eq!(v["input_tokens"], 240);
        assert!(v["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        let ttft = v["ttft_ms_p50_p90_p99"].as_array().unwrap();
        assert!(ttft[0].as_f64().unwrap() <= ttft[2].as_f64().unwrap());
        assert_eq!(
            v["preemptions"].as_u64().unwrap() > 0,
            want_preemption,
            "{v}"
        );
    }
    let res = r1_run(&["bench", "--model", model, "--requests", "0"]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("at least one request"));
}
