#!/usr/bin/env bash
# Runs the staged GPU tests and benches on a GPU machine: needs bash, python3 (3.8+) and
# nvidia-smi; compute-sanitizer and PyTorch where present; no Rust toolchain, no network.
# tools/gpu-suite stages this file with the binaries, tests/fixtures, watchdog.py, assemble.py.
#
#   bash .gpu-stage/run.sh quick   # ~290 s: machine and GPU info, the kernel attribute table,
#                                  # first light, probes and every correctness test with
#                                  # CUDA_LAUNCH_BLOCKING=1, memcheck on each sanitizer_smoke
#   bash .gpu-stage/run.sh full    # ~570 s: info, the same tests with asynchronous launches,
#                                  # the benches (decode_gemm: R1's decode GEMMs; decode_layer:
#                                  # R1's real layers through the engine, last, within its
#                                  # slice) and the PyTorch peers on the same shapes
#
# Each test binary runs one test at a time under watchdog.py: a test whose output stops for
# R1_WATCHDOG_S seconds is HUNG (with the last kernel launched), a sticky CUDA error FAILS its
# test, a crash is DIED; the binary then restarts for the tests it has not run yet.
# Results in $OUT (default .gpu-stage/out): gpu-suite.json, summary.txt, info.log, tests.log,
# sanitizer.log, bench.log, bench.jsonl, peer.jsonl, decode_layer.json. Exit status: 0 everything passed,
# 1 something did not, 2 bad usage or a stage that cannot be unpacked, 3 no CUDA device.
#
# Environment (optional): OUT; R1_SUITE_BUDGET_S (the whole run; quick 290, full 570);
# R1_TESTS_BUDGET_S (the test phase); R1_WATCHDOG_S (default 60); R1_NVIDIA_SMI and
# R1_COMPUTE_SANITIZER (the tools, when not found under their names).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODE="${1:-}"
case "$MODE" in
  quick) BUDGET="${R1_SUITE_BUDGET_S:-290}" ;;
  full) BUDGET="${R1_SUITE_BUDGET_S:-570}" ;;
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
[ $# -eq 1 ] || { echo "run.sh: one argument: quick or full" >&2; exit 2; }

T0=$(date +%s)
# tools/gpu-suite packs bin/ and fixtures/ into payload.tar.xz; unpack it next to this file.
if [ -f "$HERE/payload.tar.xz" ]; then
  rm -rf "$HERE/bin" "$HERE/fixtures"
  python3 -c '
import sys, tarfile
safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
tarfile.open(sys.argv[1]).extractall(sys.argv[2], **safe)' "$HERE/payload.tar.xz" "$HERE" \
    || { echo "run.sh: cannot unpack $HERE/payload.tar.xz" >&2; exit 2; }
fi
OUT="${OUT:-$HERE/out}"
mkdir -p "$OUT"
(cd "$OUT" && rm -f gpu-suite.json summary.txt info.log tests.log sanitizer.log bench.log bench.jsonl peer.jsonl decode_layer.json)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
WATCHDOG_S="${R1_WATCHDOG_S:-60}"
RESERVE_S=5 # for the final assembly
export R1_REQUIRE_GPU=1 R1_FIXTURES="$HERE/fixtures" PYTHONUNBUFFERED=1 CRITERION_HOME="$WORK/criterion"
# No RUST_BACKTRACE: a failing proptest panics once per shrinking step, and the panic message
# with the trace lines already names the test and the kernel.
unset RUST_BACKTRACE CUDA_LAUNCH_BLOCKING R1_CUDA_TRACE
# Test phases: one line per kernel launch (written before the launch, so a hang names its
# kernel); quick also launches synchronously, so a fault is reported by the kernel that made it.
# full runs asynchronously, as the engine does, so missing stream ordering is not hidden.
TEST_ENV=(R1_CUDA_TRACE=1)
BLOCKING=""
if [ "$MODE" = quick ]; then
  TEST_ENV+=(CUDA_LAUNCH_BLOCKING=1)
  BLOCKING=1
fi

left() { echo $(( BUDGET - ($(date +%s) - T0) - RESERVE_S )); }
# share WEIGHT TOTAL_WEIGHT: seconds for a phase out of what is left of the budget.
share() { local l; l=$(left); [ "$l" -gt 0 ] || l=0; echo $(( l * $1 / $2 )); }
phase() { echo "$1" > "$WORK/phase"; echo "run.sh: $1 ($(left) s of the ${BUDGET} s budget left)"; }
assemble() {
  python3 "$HERE/assemble.py" --mode "$MODE" --stage "$HERE" --out "$OUT" --work "$WORK" \
    --started "$T0" --budget "$BUDGET" ${BLOCKING:+--launch-blocking} "$@"
}
watchdog() { python3 "$HERE/watchdog.py" "$1" --watchdog-s "$WATCHDOG_S" "${@:2}"; }
no_device() {
  echo "$1" > "$WORK/no-device.txt"
  assemble --final
  exit 3
}
mapfile -t TESTS < <(awk '$1 == "test" {print $2}' "$HERE/targets.txt")
mapfile -t BENCHES < <(awk '$1 == "bench" {print $2}' "$HERE/targets.txt")

# ------------------------------------------------------------------------------ info
phase "info"
echo "r1-runtime GPU suite, $MODE mode: $(sed -n 2p "$HERE/manifest.txt")"
{
  echo "host: $(uname -srm)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') x $(nproc)"
  echo "memory: $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo 2>/dev/null)"
  echo "python: $(python3 -c 'import platform; print(platform.python_version())')"
} > "$WORK/machine.txt"
SMI="${R1_NVIDIA_SMI:-nvidia-smi}"
if ! command -v "$SMI" >/dev/null 2>&1; then
  nodes="$(ls /dev/nvidia* 2>/dev/null | tr '\n' ' ')"
  no_device "nvidia-smi not found; /dev/nvidia*: ${nodes:-none}"
fi
if ! gpus="$(timeout 30 "$SMI" -L 2>&1)"; then
  no_device "nvidia-smi -L failed: $(echo "$gpus" | head -3 | tr '\n' ' ')"
fi
grep -q '^GPU ' <<< "$gpus" || no_device "nvidia-smi lists no GPU: $(echo "$gpus" | head -3 | tr '\n' ' ')"
timeout 30 "$SMI" --format=csv \
  --query-gpu=name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu,memory.used,memory.total \
  > "$WORK/nvidia-smi.csv" 2>&1
CS="${R1_COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)}"
{
  cat "$WORK/machine.txt"
  echo "== nvidia-smi"; timeout 30 "$SMI" 2>&1
  echo "== nvidia-smi -q -d CLOCK,PERFORMANCE"; timeout 30 "$SMI" -q -d CLOCK,PERFORMANCE 2>&1
  echo "== compute-sanitizer: ${CS:-not found}"; [ -z "$CS" ] || "$CS" --version 2>&1
  echo "== libcuda: $(ldconfig -p 2>/dev/null | grep -m1 'libcuda\.so\.1' || echo 'not in the ldconfig cache')"
  for b in "$HERE"/bin/*; do
    missing="$(ldd "$b" 2>&1 | grep 'not found' || true)"
    [ -z "$missing" ] || echo "MISSING LIBRARIES for $(basename "$b"): $missing"
  done
  echo "== manifest"; cat "$HERE/manifest.txt"
} > "$OUT/info.log"
if [ -x "$HERE/bin/gpu_first_light" ]; then
  watchdog run --name kernel_attributes --log "$WORK/kernel_attributes.txt" --record "$WORK/steps.jsonl" \
    --limit-s 60 -- "$HERE/bin/gpu_first_light" kernel_attributes --exact --test-threads=1 --nocapture
  { echo "== gpu_first_light kernel_attributes"; cat "$WORK/kernel_attributes.txt"; } >> "$OUT/info.log"
  # A device the tests cannot use fails the first test at once, saying why.
  reason="$(grep -m1 -o 'R1_REQUIRE_GPU is set but .*' "$WORK/kernel_attributes.txt" || true)"
  [ -z "$reason" ] || no_device "${reason#R1_REQUIRE_GPU is set but }"
else
  echo "== bin/gpu_first_light is not staged: no kernel attribute table" >> "$OUT/info.log"
fi
assemble

# ------------------------------------------------------------------------------ tests
phase "tests"
if [ "$MODE" = quick ]; then tests_budget=$(share 3 4); else tests_budget=$(share 2 5); fi
tests_budget="${R1_TESTS_BUDGET_S:-$tests_budget}"
env "${TEST_ENV[@]}" python3 "$HERE/watchdog.py" tests --watchdog-s "$WATCHDOG_S" --stage "$HERE" \
  --log "$OUT/tests.log" --results "$WORK/tests.json" --budget-s "$tests_budget" "${TESTS[@]}"
assemble

# ------------------------------------------------------------------------------ sanitizer
if [ "$MODE" = quick ]; then
  phase "sanitizer"
  # memcheck slows every launch down many times over: twice the watchdog's patience.
  env "${TEST_ENV[@]}" python3 "$HERE/watchdog.py" sanitizer --watchdog-s $(( WATCHDOG_S * 2 )) --sanitizer "$CS" \
    --tool memcheck --tests "$WORK/tests.json" --stage "$HERE" --log "$OUT/sanitizer.log" \
    --results "$WORK/sanitizer.json" --budget-s "$(share 1 1)"
  assemble
fi

# ------------------------------------------------------------------------------ benches, peers
# slice END COMMANDS_LEFT: an even share of the seconds until END; unused time passes on.
slice() { echo $(( ($1 - $(date +%s)) / $2 )); }
step() { # NAME LIMIT_S CMD...: one command under the watchdog, its output in bench.log
  watchdog run --name "$1" --log "$OUT/bench.log" --record "$WORK/steps.jsonl" --limit-s "$2" -- "${@:3}"
  assemble
}
if [ "$MODE" = full ]; then
  phase "benches"
  export R1_BENCH_JSON="$OUT/bench.jsonl"
  end=$(( $(date +%s) + $(share 2 3) ))
  for i in "${!BENCHES[@]}"; do
    name="${BENCHES[$i]}"
    limit="$(slice "$end" $(( ${#BENCHES[@]} - i )))"
    if [ "$name" = decode_layer ]; then
      # Not criterion: it starts no new measurement past --budget-s (20 s before its limit,
      # so its tables and decode_layer.json are always written), its rows also go to
      # bench.jsonl (R1_BENCH_JSON), and it runs the whole-engine mode after the layers.
      budget=$(( limit > 40 ? limit - 20 : limit / 2 ))
      step "bench:$name" "$limit" "$HERE/bin/$name" --bench --mode all --budget-s "$budget" \
        --json "$OUT/decode_layer.json"
    else
      step "bench:$name" "$limit" "$HERE/bin/$name" --bench --noplot --warm-up-time 0.2 --measurement-time 1
    fi
  done
  phase "peers"
  end=$(( $(date +%s) + $(share 1 1) ))
  step "peer:peer_scaled_mm" "$(slice "$end" 3)" python3 "$HERE/peer_scaled_mm.py" --json "$OUT/peer.jsonl"
  step "peer:peer_mla" "$(slice "$end" 2)" python3 "$HERE/peer_mla.py" --json "$OUT/peer.jsonl"
  step "peer:peer_decode_gemm" "$(slice "$end" 1)" python3 "$HERE/peer_decode_gemm.py" --json "$OUT/peer.jsonl"
fi

phase "done"
assemble --final
