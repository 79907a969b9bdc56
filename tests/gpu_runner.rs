//! The GPU runner (tools/gpu-runner: run.sh, watchdog.py, assemble.py), tested without a GPU.
//!
//! Each test builds a temporary stage laid out as tools/gpu-suite writes it (bin/ or its
//! payload.tar.xz, targets.txt, manifest.txt, the runner files) whose "test binaries" are
//! Python scripts speaking libtest's `--list --format terse` and its serial `--nocapture`
//! output, with tests that pass, fail, hang, crash, hit a sticky CUDA error and print
//! `r1-cuda-trace` lines; a fake nvidia-smi and compute-sanitizer stand in for the real ones.
//! The real `run.sh` runs on it with a 2 s watchdog and the test checks `gpu-suite.json`. Needs
//! bash and python3; without them each test says so on stderr and passes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

/// A libtest stand-in: `bin/NAME ARGS...` runs `fake_libtest.py NAME ARGS...`. Every invocation
/// (its arguments and CUDA_LAUNCH_BLOCKING) and every test start is appended to $FAKE_CALLS.
const FAKE_LIBTEST: &str = r#"
import json, os, signal, sys, time

SUITES = {
    "gpu_first_light": [("kernel_attributes", "attributes"), ("launch_every_kernel", "ok")],
    "gpu_probes": [("probe::glued_result", "glued"), ("probe::noisy", "noisy")],
    "gpu_kernels": [("t1_ok", "ok"), ("t2_fails", "fail"), ("t3_hangs", "hang"), ("t4_ok", "ok"),
                    ("t5_segfaults", "segv"), ("t6_should_panic", "should_panic"),
                    ("t7_ignored", "ignored"), ("sanitizer_smoke", "ok")],
    "gpu_mla": [("m1_ok", "ok"), ("m2_sticky", "sticky"), ("m3_ok", "ok"), ("m4_aborts", "abort"),
                ("m5_skips", "skip"), ("sanitizer_smoke", "ok")],
    "gpu_engine": [("e1_ok", "ok"), ("e2_ok", "ok")],
    "gpu_slow": [("s%d" % i, "slow") for i in range(6)],
}
DIES_BEFORE_ANY_TEST = {"gpu_engine"}
TRACE = "r1-cuda-trace: launch %s grid=4x1x1 block=128x1x1 smem=0\n"
STICKY = "%s: CUDA_ERROR_ILLEGAL_ADDRESS (an illegal memory access was encountered)\n"


def out(text, stream=sys.stdout):
    stream.write(text)
    stream.flush()


def record(entry):
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def main():
    name, args = sys.argv[1], sys.argv[2:]
    record({"bin": name, "args": args, "blocking": os.environ.get("CUDA_LAUNCH_BLOCKING")})
    tests = SUITES[name]
    if "--list" in args:
        out("".join("%s: test\n" % t for t, _ in tests))
        return 0
    exact = "--exact" in args
    skips, filters, i = [], [], 0
    while i < len(args):
        if args[i] == "--skip":
            skips.append(args[i + 1])
            i += 1
        elif not args[i].startswith("-"):
            filters.append(args[i])
        i += 1
    matches = (lambda p, t: p == t) if exact else (lambda p, t: p in t)
    chosen = [(t, b) for t, b in tests if (not filters or any(matches(p, t) for p in filters))
              and not any(matches(s, t) for s in skips)]
    out("\nrunning %d tests\n" % len(chosen))
    if name in DIES_BEFORE_ANY_TEST:
        os.abort()
    no_gpu = os.environ.get("FAKE_NO_GPU")
    poisoned, failed = False, []
    for t, b in chosen:
        out("test %s%s ... " % (t, " - should panic" if b == "should_panic" else ""))
        record({"bin": name, "started": t})
        result = "ok"
        if no_gpu:
            out("\nthread '%s' panicked at tests/x.rs:1:1:\n" % t, sys.stderr)
            out("R1_REQUIRE_GPU is set but the GPU tests cannot run: %s\n" % no_gpu, sys.stderr)
            result = "FAILED"
        elif b == "ignored":
            result = "ignored"
        elif poisoned:
            out(STICKY % "cuLaunchKernel", sys.stderr)
            result = "FAILED"
        elif b == "attributes":
            out("kernel          regs  static_smem  dynamic_smem  binary\n")
            out("fp8_gemm_wgmma   168         1024        200704  sm_90\n")
        elif b == "glued":
            out("output without a newline")
        elif b == "noisy":
            out("check ok\nmore output\n")
        elif b == "fail":
            out(TRACE % "act_quant", sys.stderr)
            out("\nthread '%s' (7) panicked at tests/gpu_kernels.rs:10:5:\nmismatch at [3]\n" % t, sys.stderr)
            result = "FAILED"
        elif b == "hang":
            out(TRACE % "fp8_gemm_wgmma", sys.stderr)
            out(TRACE % "mla_decode_split", sys.stderr)
            time.sleep(600)
        elif b == "segv":
            out(TRACE % "moe_permute", sys.stderr)
            os.kill(os.getpid(), signal.SIGSEGV)
        elif b == "abort":
            os.abort()
        elif b == "sticky":
            out(TRACE % "mla_combine", sys.stderr)
            out(STICKY % "cuStreamSynchronize", sys.stderr)
            out("\nthread '%s' (9) panicked at tests/gpu_mla.rs:20:1:\nsync failed\n" % t, sys.stderr)
            poisoned, result = True, "FAILED"
        elif b == "skip":
            out("skipped: no CUDA device (fake reason) [%s]\n" % t, sys.stderr)
        elif b == "slow":
            for _ in range(4):
                out("working\n")
                time.sleep(0.3)
        if result == "FAILED":
            failed.append(t)
        out(result + "\n")
    if failed:
        out("\nfailures:\n\nfailures:\n%s\n" % "".join("    %s\n" % t for t in failed))
    out("\ntest result: %s. %d passed; %d failed\n\n"
        % ("FAILED" if failed else "ok", len(chosen) - len(failed), len(failed)))
    return 101 if failed else 0


sys.exit(main())
"#;

const FAKE_NVIDIA_SMI: &str = r#"#!/bin/sh
case "$*" in
  *-L*) echo "GPU 0: NVIDIA H200 (fake) (UUID: GPU-0)" ;;
  *--query-gpu*) echo "name, driver_version, clocks.current.sm [MHz]"; echo "NVIDIA H200 (fake), 570.00, 1980 MHz" ;;
  *) echo "fake nvidia-smi" ;;
esac
"#;

/// Runs the program after its options and reports one memcheck error.
const FAKE_COMPUTE_SANITIZER: &str = r#"#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift 2; done
echo "========= COMPUTE-SANITIZER"
"$@"
echo "========= Invalid __global__ read of size 4 bytes"
echo "=========     at mla_decode_split+0x70"
echo "=========     by thread (1,0,0) in block (0,0,0)"
echo "========= ERROR SUMMARY: 1 error"
exit 99
"#;

/// A bench that writes one JSON line, and one that goes silent.
const FAKE_FP8_GEMM_BENCH: &str = r#"#!/bin/sh
echo '{"bench":"fp8_gemm","m":128,"n":7168,"k":2048,"kernel":"wgmma","median_us":20.0,"tflops":187.9}' >> "$R1_BENCH_JSON"
echo "fp8_gemm m128_n7168_k2048: 20.0 us"
"#;
const FAKE_SILENT_BENCH: &str = "#!/bin/sh\necho starting\nsleep 600\n";
/// The decode-GEMM bench: its copy bandwidth and one point.
const FAKE_DECODE_GEMM_BENCH: &str = r#"#!/bin/sh
echo '{"bench":"decode_gemm","id":"copy_bandwidth","kind":"copy","gbps":4000.0}' >> "$R1_BENCH_JSON"
echo '{"bench":"decode_gemm","id":"q_b_tp8_m1","gemm":"q_b","variant":"split_k","kernel":"fp8_gemm_wgmma_m64","tp":8,"m":1,"n":3072,"k":1536,"batch":1,"median_us":5.0,"gbps":950.0,"pct_copy":23.75}' >> "$R1_BENCH_JSON"
"#;

/// Both peers write one line for the GEMM shape above (peer_mla's is ignored by the GEMM table).
const FAKE_PEER: &str = r#"
import json, sys
with open(sys.argv[sys.argv.index("--json") + 1], "a") as f:
    f.write(json.dumps({"bench": "peer_scaled_mm", "m": 128, "n": 7168, "k": 2048,
                        "kernel": "torch_scaled_mm", "median_us": 30.0, "tflops": 125.3}) + "\n")
"#;

/// The decode-GEMM peer writes its line for the same GEMM, TP and M.
const FAKE_DECODE_PEER: &str = r#"
import json, sys
with open(sys.argv[sys.argv.index("--json") + 1], "a") as f:
    f.write(json.dumps({"bench": "peer_decode_gemm", "gemm": "q_b", "tp": 8, "m": 1, "n": 3072, "k": 1536,
                        "kernel": "torch_scaled_mm", "median_us": 10.0, "gbps": 475.0}) + "\n")
"#;

/// bash and python3 are there; otherwise says why the test does nothing.
fn tools_present(test: &str) -> bool {
    for tool in ["bash", "python3"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("skipped: {tool} not found; the GPU runner cannot be tested [{test}]");
            return false;
        }
    }
    true
}

fn write_executable(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

struct Stage {
    dir: tempfile::TempDir,
}

struct Run {
    exit_code: i32,
    doc: Value,
    seconds: f64,
}

impl Stage {
    /// A stage with these `(kind, name)` targets, as tools/gpu-suite lays it out.
    fn new(targets: &[(&str, &str)]) -> Stage {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let runner = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/gpu-runner");
        for file in ["run.sh", "watchdog.py", "assemble.py"] {
            fs::copy(runner.join(file), root.join(file)).unwrap();
        }
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("fake")).unwrap();
        fs::write(root.join("fake/fake_libtest.py"), FAKE_LIBTEST).unwrap();
        write_executable(&root.join("fake/nvidia-smi"), FAKE_NVIDIA_SMI);
        write_executable(&root.join("fake/compute-sanitizer"), FAKE_COMPUTE_SANITIZER);
        fs::write(root.join("peer_scaled_mm.py"), FAKE_PEER).unwrap();
        fs::write(root.join("peer_mla.py"), FAKE_PEER).unwrap();
        fs::write(root.join("peer_decode_gemm.py"), FAKE_DECODE_PEER).unwrap();
        let mut listing = String::new();
        for (kind, name) in targets {
            let script = match (*kind, *name) {
                ("test", _) => format!(
                    "#!/bin/sh\nexec python3 \"$(dirname \"$0\")/../fake/fake_libtest.py\" {name} \"$@\"\n"
                ),
                ("bench", "fp8_gemm") => FAKE_FP8_GEMM_BENCH.to_string(),
                ("bench", "decode_gemm") => FAKE_DECODE_GEMM_BENCH.to_string(),
                ("bench", _) => FAKE_SILENT_BENCH.to_string(),
                _ => panic!("unknown target kind {kind}"),
            };
            write_executable(&root.join("bin").join(name), &script);
            listing += &format!("{kind} {name}\n");
        }
        fs::write(root.join("targets.txt"), listing).unwrap();
        fs::write(
            root.join("manifest.txt"),
            "r1-runtime GPU stage\ncommit: 0123abc\nbuilt: (test stage)\n",
        )
        .unwrap();
        Stage { dir }
    }

    /// Moves bin/ into payload.tar.xz, as tools/gpu-suite does (run.sh unpacks it).
    fn pack(&self) {
        let packed = Command::new("python3")
            .args([
                "-c",
                "import sys, tarfile; tarfile.open(sys.argv[1], 'w:xz').add('bin')",
                "payload.tar.xz",
            ])
            .current_dir(self.dir.path())
            .status()
            .unwrap();
        assert!(packed.success());
        fs::remove_dir_all(self.path("bin")).unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `bash run.sh MODE` with a 2 s watchdog, the fake tools, and `env` on top.
    fn run(&self, mode: &str, env: &[(&str, &str)]) -> Run {
        let start = Instant::now();
        let mut cmd = Command::new("bash");
        cmd.arg(self.path("run.sh"))
            .arg(mode)
            .env("OUT", self.path("out"))
            .env("FAKE_CALLS", self.path("calls.jsonl"))
            .env("R1_WATCHDOG_S", "2")
            .env("R1_NVIDIA_SMI", self.path("fake/nvidia-smi"))
            .env("R1_COMPUTE_SANITIZER", self.path("fake/compute-sanitizer"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let output = cmd.output().expect("bash runs");
        let seconds = start.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let json = fs::read_to_string(self.path("out/gpu-suite.json"))
            .unwrap_or_else(|e| panic!("no gpu-suite.json ({e})\n{stdout}\n{stderr}"));
        let files = fs::read_dir(self.path("out")).unwrap().count();
        assert!(files <= 8, "{files} files in $OUT: at most 8 come back");
        assert!(
            self.path("out/summary.txt").exists(),
            "no summary.txt\n{stdout}"
        );
        Run {
            exit_code: output.status.code().expect("run.sh exits"),
            doc: serde_json::from_str(&json).unwrap(),
            seconds,
        }
    }

    /// What the fake binaries recorded: invocations and test starts.
    fn calls(&self) -> Vec<Value> {
        fs::read_to_string(self.path("calls.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The argument lists `binary` was run with to run its tests (not to list them).
    fn test_runs(&self, binary: &str) -> Vec<Vec<String>> {
        self.calls()
            .iter()
            .filter(|c| c["bin"] == binary && c["args"].is_array())
            .map(|c| {
                c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .filter(|args| args.first().map(String::as_str) == Some("--test-threads=1"))
            .collect()
    }

    fn starts(&self, binary: &str, test: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c["bin"] == binary && c["started"] == test)
            .count()
    }
}

fn binary<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["tests"]["binaries"]
        .as_array()
        .expect("per-binary results")
        .iter()
        .find(|b| b["binary"] == name)
        .unwrap_or_else(|| panic!("no results for {name}"))
}

fn test<'a>(doc: &'a Value, bin: &str, name: &str) -> &'a Value {
    binary(doc, bin)["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no result for {bin} {name}"))
}

fn outcome(doc: &Value, bin: &str, name: &str) -> String {
    test(doc, bin, name)["outcome"]
        .as_str()
        .unwrap()
        .to_string()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// `counts` of a binary: ok, FAILED, HUNG, DIED, ignored, not run.
fn counts(doc: &Value, bin: &str) -> [u64; 6] {
    let c = &binary(doc, bin)["counts"];
    ["ok", "FAILED", "HUNG", "DIED", "ignored", "not run"].map(|k| c[k].as_u64().unwrap())
}

fn skips(args: &[String]) -> Vec<&str> {
    args.windows(2)
        .filter(|w| w[0] == "--skip")
        .map(|w| w[1].as_str())
        .collect()
}

#[test]
fn quick_run_gives_each_test_its_outcome_and_restarts_past_hangs_crashes_and_sticky_errors() {
    if !tools_present("quick_run") {
        return;
    }
    let stage = Stage::new(&[
        ("test", "gpu_first_light"),
        ("test", "gpu_probes"),
        ("test", "gpu_kernels"),
        ("test", "gpu_mla"),
        ("test", "gpu_engine"),
    ]);
    let run = stage.run("quick", &[]);
    let doc = &run.doc;
    assert_eq!(run.exit_code, 1, "{doc:#}");
    assert_eq!(doc["complete"], true);
    assert_eq!(doc["device"]["name"], "NVIDIA H200 (fake)");
    assert_eq!(doc["manifest"]["commit"], "0123abc");
    let verdict = text(&doc["verdict"]);
    assert!(
        verdict.starts_with("failed: 2 FAILED, 1 HUNG, 2 DIED, 2 not run"),
        "{verdict}"
    );
    assert!(doc["kernel_attributes"]
        .to_string()
        .contains("fp8_gemm_wgmma   168"));

    assert_eq!(counts(doc, "gpu_first_light"), [2, 0, 0, 0, 0, 0]);
    // The result glued to unfinished output, and output ending in "ok" before more output.
    assert_eq!(counts(doc, "gpu_probes"), [2, 0, 0, 0, 0, 0]);

    assert_eq!(counts(doc, "gpu_kernels"), [4, 1, 1, 1, 1, 0]);
    let failed = test(doc, "gpu_kernels", "t2_fails");
    assert_eq!(failed["outcome"], "FAILED");
    assert!(text(&failed["reason"]).contains("gpu_kernels.rs:10:5: mismatch at [3]"));
    assert!(text(&failed["last_kernel"]).contains("launch act_quant grid=4x1x1"));
    let hung = test(doc, "gpu_kernels", "t3_hangs");
    assert_eq!(hung["outcome"], "HUNG");
    assert!(text(&hung["last_kernel"]).starts_with("r1-cuda-trace: launch mla_decode_split "));
    let died = test(doc, "gpu_kernels", "t5_segfaults");
    assert_eq!(died["outcome"], "DIED");
    assert!(text(&died["reason"]).contains("SIGSEGV"));
    assert!(text(&died["last_kernel"]).contains("moe_permute"));
    for ok in ["t1_ok", "t4_ok", "t6_should_panic", "sanitizer_smoke"] {
        assert_eq!(outcome(doc, "gpu_kernels", ok), "ok", "{ok}");
    }
    assert_eq!(outcome(doc, "gpu_kernels", "t7_ignored"), "ignored");
    // Restarted after the hang and after the crash, each time past every test with a result;
    // so every test started exactly once.
    let runs = stage.test_runs("gpu_kernels");
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(skips(&runs[0]).is_empty());
    assert!(runs[1].contains(&"--exact".to_string()));
    assert_eq!(skips(&runs[1]), ["t1_ok", "t2_fails", "t3_hangs"]);
    assert_eq!(
        skips(&runs[2]),
        ["t1_ok", "t2_fails", "t3_hangs", "t4_ok", "t5_segfaults"]
    );
    for t in binary(doc, "gpu_kernels")["tests"].as_array().unwrap() {
        assert_eq!(stage.starts("gpu_kernels", text(&t["name"])), 1, "{t}");
    }

    // The sticky error fails its test; the tests after it pass in a fresh process.
    assert_eq!(counts(doc, "gpu_mla"), [4, 1, 0, 1, 0, 0]);
    let sticky = test(doc, "gpu_mla", "m2_sticky");
    assert_eq!(sticky["outcome"], "FAILED");
    assert!(text(&sticky["reason"])
        .starts_with("sticky CUDA error: cuStreamSynchronize: CUDA_ERROR_ILLEGAL_ADDRESS"));
    assert!(text(&sticky["last_kernel"]).contains("mla_combine"));
    assert_eq!(outcome(doc, "gpu_mla", "m3_ok"), "ok");
    assert!(text(&test(doc, "gpu_mla", "m4_aborts")["reason"]).contains("SIGABRT"));
    assert_eq!(
        skips(&stage.test_runs("gpu_mla")[1]),
        ["m1_ok", "m2_sticky"]
    );
    assert_eq!(stage.starts("gpu_mla", "m1_ok"), 1);
    assert_eq!(binary(doc, "gpu_mla")["skip_count"], 1);

    // Dies before any test: run once, not again, its tests not run.
    assert_eq!(counts(doc, "gpu_engine"), [0, 0, 0, 0, 0, 2]);
    assert_eq!(stage.test_runs("gpu_engine").len(), 1);
    assert!(binary(doc, "gpu_engine")["notes"]
        .to_string()
        .contains("not restarted"));

    let test_runs: Vec<Value> = stage
        .calls()
        .into_iter()
        .filter(|c| c["args"][0] == "--test-threads=1")
        .collect();
    assert_eq!(test_runs.len(), 9);
    assert!(test_runs.iter().all(|c| c["blocking"] == "1"));

    // memcheck: not on the binary that hung; on gpu_mla, with its report.
    let sanitizer = doc["sanitizer"]["runs"].as_array().unwrap();
    assert_eq!(sanitizer.len(), 2, "{sanitizer:?}");
    assert_eq!(sanitizer[0]["binary"], "gpu_kernels");
    assert_eq!(sanitizer[0]["outcome"], "not run");
    assert_eq!(sanitizer[1]["binary"], "gpu_mla");
    assert_eq!(sanitizer[1]["errors"], 1);
    assert_eq!(
        sanitizer[1]["reports"][0][0],
        "Invalid __global__ read of size 4 bytes"
    );

    let summary = fs::read_to_string(stage.path("out/summary.txt")).unwrap();
    assert!(summary.contains("gpu_kernels t3_hangs: HUNG"), "{summary}");
    assert!(run.seconds < 30.0, "{} s", run.seconds);
}

#[test]
fn a_spent_time_slice_stops_the_binary_and_its_remaining_tests_are_not_run() {
    if !tools_present("time_slice") {
        return;
    }
    let stage = Stage::new(&[("test", "gpu_slow")]);
    // Six tests of 1.2 s each (never silent for 2 s) in a 4 s test phase.
    let run = stage.run("quick", &[("R1_TESTS_BUDGET_S", "4")]);
    let doc = &run.doc;
    let [ok, failed, hung, died, ignored, not_run] = counts(doc, "gpu_slow");
    assert!(ok >= 1 && not_run >= 1, "{doc:#}");
    assert_eq!((failed, hung, died, ignored), (0, 0, 0, 0));
    assert_eq!(ok + not_run, 6);
    assert!(binary(doc, "gpu_slow")["seconds"].as_f64().unwrap() < 7.0);
    assert!(binary(doc, "gpu_slow")["tests"]
        .to_string()
        .contains("time slice (4 s) ran out"));
    assert_eq!(run.exit_code, 1);
}

#[test]
fn full_run_unpacks_the_stage_runs_the_benches_and_peers_and_sets_them_side_by_side() {
    if !tools_present("full_run") {
        return;
    }
    let stage = Stage::new(&[
        ("test", "gpu_probes"),
        ("bench", "fp8_gemm"),
        ("bench", "mla_decode"),
        ("bench", "decode_gemm"),
    ]);
    stage.pack();
    let run = stage.run("full", &[]);
    let doc = &run.doc;
    assert_eq!(doc["launch_blocking"], false);
    assert!(stage
        .calls()
        .iter()
        .any(|c| c["bin"] == "gpu_probes" && c["args"].is_array() && c["blocking"].is_null()));
    assert_eq!(counts(doc, "gpu_probes"), [2, 0, 0, 0, 0, 0]);
    let steps: Vec<(String, String)> = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (text(&s["step"]).into(), text(&s["outcome"]).into()))
        .collect();
    let expect = [
        ("bench:fp8_gemm", "ok"),
        ("bench:mla_decode", "HUNG"),
        ("bench:decode_gemm", "ok"),
        ("peer:peer_scaled_mm", "ok"),
        ("peer:peer_mla", "ok"),
        ("peer:peer_decode_gemm", "ok"),
    ];
    assert_eq!(
        steps,
        expect.map(|(s, o)| (s.to_string(), o.to_string())),
        "{doc:#}"
    );
    let side = &doc["side_by_side"][0];
    assert_eq!(side["ours_kernel"], "wgmma");
    assert_eq!(side["speedup_vs_peer"], 1.5);
    // The decode-GEMM table: our line beside the peer's for the same GEMM, TP and M.
    assert_eq!(doc["decode_gemm"]["ours_copy_gbps"], 4000.0);
    let rows = doc["decode_gemm"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["variant"], "split_k");
    assert_eq!(rows[0]["peer_gbps"], 475.0);
    assert_eq!(rows[0]["speedup_vs_peer"], 2.0);
    let summary = fs::read_to_string(stage.path("out/summary.txt")).unwrap();
    assert!(summary.contains("decode GEMMs"), "{summary}");
    assert_eq!(run.exit_code, 1);
    assert!(text(&doc["verdict"]).contains("bench:mla_decode: HUNG"));
}

#[test]
fn without_a_device_the_run_stops_at_once_and_says_why() {
    if !tools_present("no_device") {
        return;
    }
    let stage = Stage::new(&[("test", "gpu_first_light"), ("test", "gpu_kernels")]);
    let run = stage.run("quick", &[("R1_NVIDIA_SMI", "/nonexistent/bin/nvidia-smi")]);
    assert_eq!(run.exit_code, 3);
    assert!(run.doc["device"].is_null());
    assert!(text(&run.doc["verdict"]).starts_with("no CUDA device found: nvidia-smi not found"));
    assert!(run.doc["tests"].is_null());
    assert!(stage.calls().is_empty(), "no binary should run");
    assert!(run.seconds < 90.0);

    // nvidia-smi answers, but the first test cannot use the device.
    let run = stage.run("quick", &[("FAKE_NO_GPU", "no libcuda.so.1 (fake)")]);
    assert_eq!(run.exit_code, 3);
    assert!(run.doc["device"].is_null());
    assert_eq!(
        run.doc["verdict"],
        "no CUDA device found: the GPU tests cannot run: no libcuda.so.1 (fake)"
    );
    // One invocation (kernel_attributes) and its one test start.
    assert_eq!(stage.calls().len(), 2, "{:?}", stage.calls());
    assert!(run.seconds < 90.0);
}
