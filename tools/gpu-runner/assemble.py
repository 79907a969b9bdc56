#!/usr/bin/env python3
"""Folds one GPU run's results into $OUT/gpu-suite.json and $OUT/summary.txt.

Called by run.sh after every phase (so a run cut short still leaves both files, marked
incomplete) and once more with --final, which prints the summary and exits 0 when everything
passed, 1 when anything failed, hung, died, was not run or had sanitizer errors, 3 when no CUDA
device was found. Reads run.sh's work folder (machine.txt, nvidia-smi.csv,
kernel_attributes.txt, no-device.txt, phase, and watchdog.py's tests.json, sanitizer.json,
steps.jsonl), the stage's manifest.txt, and $OUT/bench.jsonl + $OUT/peer.jsonl, whose GEMM, MLA
and decode-GEMM lines it sets side by side.
"""

import argparse
import csv
import datetime
import json
import os
import re
import time

NOT_OK = ("FAILED", "HUNG", "DIED", "not run")


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def read_json(path):
    text = read(path)
    return json.loads(text) if text else None


def jsonl(path):
    rows = []
    for line in read(path).splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def key_values(text):
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out


def gpus_from_csv(text):
    """nvidia-smi --query-gpu ... --format=csv: one dict per GPU, keyed by the header."""
    rows = list(csv.reader(text.splitlines(), skipinitialspace=True))
    if len(rows) < 2 or not rows[0] or rows[0][0] != "name":
        return []
    return [dict(zip(rows[0], r)) for r in rows[1:] if len(r) == len(rows[0])]


def table_of(libtest_output):
    """What a test printed, without libtest's and the runner's lines around it."""
    lines = []
    for line in libtest_output.splitlines():
        m = re.match(r"^test \S+ \.\.\. ?(.*)$", line)
        line = m.group(1) if m else line
        if line.strip() and line.strip() != "ok" and not line.startswith(("[runner]", "running ", "test result: ")):
            lines.append(line.rstrip())
    return lines


def side_by_side(bench, peer):
    """Our GEMM (the first fp8_gemm line of each shape is the Auto kernel's) and MLA decode
    (with its combine kernel) beside the torch peer on the same shape."""
    first = {}
    for r in bench:
        if r.get("bench") == "fp8_gemm":
            first.setdefault((r.get("m"), r.get("n"), r.get("k")), r)
    gemm = []
    for p in peer:
        o = first.get((p.get("m"), p.get("n"), p.get("k"))) if p.get("bench") == "peer_scaled_mm" else None
        if o:
            gemm.append({"m": p["m"], "n": p["n"], "k": p["k"],
                         "ours_kernel": o.get("kernel"), "ours_us": o.get("median_us"), "ours_tflops": o.get("tflops"),
                         "peer_kernel": p.get("kernel"), "peer_us": p.get("median_us"), "peer_tflops": p.get("tflops"),
                         "speedup_vs_peer": speedup(o, p)})
    ours_mla = {r.get("id"): r for r in bench
                if r.get("bench") == "mla_decode" and "+combine" in r.get("kernel", "")}
    mla = []
    for p in peer:
        o = ours_mla.get(p.get("id")) if p.get("bench") == "peer_mla" else None
        if o:
            mla.append({"id": p["id"], "ours_us": o.get("median_us"), "ours_gbps": o.get("gbps"),
                        "ours_tflops": o.get("tflops"), "peer_us": p.get("median_us"), "peer_gbps": p.get("gbps"),
                        "peer_tflops": p.get("tflops"), "speedup_vs_peer": speedup(o, p)})
    return gemm, mla


def copy_gbps(rows, bench):
    """The device-to-device copy bandwidth `bench` measured in this run, if it did."""
    return next((r.get("gbps") for r in rows if r.get("bench") == bench and r.get("id") == "copy_bandwidth"), None)


def decode_gemm_table(bench, peer):
    """Every decode_gemm line (each variant) beside the torch peer's line for the same GEMM, TP
    and M; peer lines without one of ours follow."""
    peers = {(p.get("gemm"), p.get("tp"), p.get("m")): p for p in peer
             if p.get("bench") == "peer_decode_gemm" and p.get("gemm")}
    rows, seen = [], set()

    def row(key, o, p):
        src = o or p
        return {"gemm": key[0], "tp": key[1], "m": key[2], "n": src.get("n"), "k": src.get("k"),
                "batch": src.get("batch"), "variant": o.get("variant"), "kernel": o.get("kernel"),
                "ctas": o.get("ctas"), "error": o.get("error"), "ours_us": o.get("median_us"),
                "ours_gbps": o.get("gbps"), "ours_pct_copy": o.get("pct_copy"),
                "peer_kernel": p.get("kernel"), "peer_us": p.get("median_us"), "peer_gbps": p.get("gbps"),
                "peer_pct_copy": p.get("pct_copy"), "speedup_vs_peer": speedup(o, p)}

    for o in bench:
        if o.get("bench") == "decode_gemm" and o.get("gemm"):
            key = (o["gemm"], o.get("tp"), o.get("m"))
            seen.add(key)
            rows.append(row(key, o, peers.get(key, {})))
    rows += [row(key, {}, p) for key, p in peers.items() if key not in seen]
    return rows


def speedup(ours, peer):
    o, p = ours.get("median_us"), peer.get("median_us")
    return round(p / o, 3) if o and p else None


def test_section(tests):
    if not tests:
        return None
    totals = {}
    not_ok = []
    skip_count = 0
    for b in tests["binaries"]:
        for outcome, n in b["counts"].items():
            totals[outcome] = totals.get(outcome, 0) + n
        skip_count += b["skip_count"]
        for t in b["tests"]:
            if t["outcome"] in NOT_OK:
                not_ok.append(dict(t, binary=b["binary"]))
    return {"watchdog_s": tests["watchdog_s"], "budget_s": tests["budget_s"], "totals": totals,
            "skip_count": skip_count, "not_ok": not_ok, "binaries": tests["binaries"]}


def verdict_of(final, phase, tests, sanitizer, steps):
    problems = []
    if tests is None:
        problems.append("no test results")
    else:
        t = tests["totals"]
        problems += ["%d %s" % (t[o], o) for o in NOT_OK if t.get(o)]
        # A binary that could not be listed has no tests to count.
        problems += ["%s: no tests listed" % b["binary"] for b in tests["binaries"] if not b["listed"]]
    if sanitizer and sanitizer.get("error"):
        problems.append("sanitizer: " + sanitizer["error"])
    for r in (sanitizer or {}).get("runs", []):
        if r["outcome"] != "clean":
            problems.append("sanitizer on %s: %s" % (r["binary"], r["outcome"] if r["outcome"] != "errors"
                                                     else "%d error(s)" % r["errors"]))
    problems += ["%s: %s" % (s["step"], s["outcome"]) for s in steps if s["outcome"] != "ok"]
    if not final:
        return "incomplete (stopped during %s)%s" % (phase or "start-up", ": " + ", ".join(problems) if problems else "")
    return "failed: " + ", ".join(problems) if problems else "passed"


def fmt(value, spec):
    return spec % value if value is not None else "-"


def summary_lines(doc):
    L = []
    add = L.append
    m = doc["manifest"]
    add("r1-runtime GPU suite, %s mode, commit %s, started %s" % (doc["mode"], m.get("commit", "?"), doc["started"]))
    add("verdict: " + doc["verdict"])
    dev = doc["device"]
    if dev:
        add("device: %s" % ", ".join("%s %s" % (k, v) for k, v in dev.items()))
    add("time: %d s of a %d s budget" % (doc["total_s"], doc["budget_s"]))
    if doc["kernel_attributes"]:
        add("")
        add("kernel attributes (gpu_first_light kernel_attributes):")
        L.extend("  " + line for line in doc["kernel_attributes"])
    tests = doc["tests"]
    if tests:
        add("")
        add("tests (%s, watchdog %.0f s, budget %.0f s; kernels: distinct kernels launched):" % (
            "CUDA_LAUNCH_BLOCKING=1" if doc["launch_blocking"] else "asynchronous launches",
            tests["watchdog_s"], tests["budget_s"]))
        add("  %-18s %6s %5s %6s %4s %4s %7s %7s %6s %6s %8s %8s" % (
            "binary", "listed", "ok", "FAILED", "HUNG", "DIED", "ignored", "not run", "time", "slice", "attempts",
            "kernels"))
        for b in tests["binaries"]:
            c = b["counts"]
            add("  %-18s %6d %5d %6d %4d %4d %7d %7d %5.0fs %5.0fs %8d %8d" % (
                b["binary"], b["listed"], c["ok"], c["FAILED"], c["HUNG"], c["DIED"], c["ignored"], c["not run"],
                b["seconds"], b["slice_s"], len(b["attempts"]), len(b["kernel_launches"])))
            for n in b["notes"]:
                add("    note: " + n)
        if tests["not_ok"]:
            add("  not ok:")
            for t in tests["not_ok"]:
                add("    %s %s: %s%s" % (t["binary"], t["name"], t["outcome"], ": " + t["reason"] if t.get("reason") else ""))
                if t.get("last_kernel"):
                    add("      last kernel: " + t["last_kernel"])
        add("  'skipped: no CUDA device' lines: %d" % tests["skip_count"])
        for b in tests["binaries"]:
            if b["skip_lines"]:
                add("    %s: %s" % (b["binary"], b["skip_lines"][0]))
    san = doc["sanitizer"]
    if san:
        add("")
        add("compute-sanitizer --tool %s:%s" % (san["tool"], " " + san["error"] if san.get("error") else ""))
        for r in san["runs"]:
            add("  %s %s: %s%s%s" % (r["binary"], r["test"], r["outcome"],
                                     " (errors: %s)" % r["errors"] if r.get("errors") is not None else "",
                                     ": " + r["reason"] if r.get("reason") else ""))
            for report in r.get("reports", []):
                add("    " + " | ".join(report))
    if doc["steps"]:
        add("")
        add("steps:")
        for s in doc["steps"]:
            add("  %-28s %-8s %s%s" % (s["step"], s["outcome"], "%ss" % s["seconds"] if "seconds" in s else "",
                                       ": " + s["reason"] if s.get("reason") else ""))
    if doc["side_by_side"]:
        add("")
        add("%5s %6s %6s | %22s %9s %7s | %28s %9s %7s | x peer" % (
            "M", "N", "K", "ours", "us", "TFLOPS", "peer", "us", "TFLOPS"))
        for s in doc["side_by_side"]:
            add("%5s %6s %6s | %22s %9.1f %7.1f | %28s %9.1f %7.1f | %s" % (
                s["m"], s["n"], s["k"], s["ours_kernel"], s["ours_us"], s["ours_tflops"],
                s["peer_kernel"], s["peer_us"], s["peer_tflops"], s["speedup_vs_peer"] or "-"))
    if doc["side_by_side_mla"]:
        add("")
        add("%-26s | %9s %6s %7s | %13s %6s | x peer" % ("MLA decode", "ours us", "GB/s", "TFLOPS", "torch SDPA us", "GB/s"))
        for s in doc["side_by_side_mla"]:
            add("%-26s | %9.1f %6.0f %7.1f | %13.1f %6.0f | %s" % (
                s["id"], s["ours_us"], s["ours_gbps"], s["ours_tflops"], s["peer_us"], s["peer_gbps"],
                s["speedup_vs_peer"] or "-"))
    if doc["decode_gemm"]:
        d = doc["decode_gemm"]
        add("")
        add("decode GEMMs (GB/s: weight + scale + A + D bytes / median time; %%copy: of the device-to-device copy "
            "bandwidth measured in the same run, ours %s GB/s, peer %s GB/s):" % (
                fmt(d["ours_copy_gbps"], "%.0f"), fmt(d["peer_copy_gbps"], "%.0f")))
        add("%-15s %2s %3s %6s %6s %5s %-9s %-28s %8s %7s %6s | %-28s %8s %7s %6s | x peer" % (
            "gemm", "TP", "M", "N", "K", "batch", "variant", "ours", "us", "GB/s", "%copy", "peer", "us", "GB/s",
            "%copy"))
        for r in d["rows"]:
            if r["error"]:
                ours = "%-52s" % ("error: " + r["error"])[:52]
            else:
                ours = "%-28s %8s %7s %6s" % (r["kernel"] or "-", fmt(r["ours_us"], "%.1f"),
                                              fmt(r["ours_gbps"], "%.0f"), fmt(r["ours_pct_copy"], "%.1f"))
            add("%-15s %2s %3s %6s %6s %5s %-9s %s | %-28s %8s %7s %6s | %s" % (
                r["gemm"], r["tp"], r["m"], r["n"], r["k"], r["batch"], r["variant"] or "-", ours,
                r["peer_kernel"] or "-", fmt(r["peer_us"], "%.1f"), fmt(r["peer_gbps"], "%.0f"),
                fmt(r["peer_pct_copy"], "%.1f"), r["speedup_vs_peer"] or "-"))
    if doc["bench"] or doc["peer"]:
        add("bench lines: %d, peer lines: %d (bench.jsonl, peer.jsonl)" % (len(doc["bench"]), len(doc["peer"])))
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--stage", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--started", type=int, required=True, help="the run's start, seconds since the epoch")
    ap.add_argument("--budget", type=int, required=True)
    ap.add_argument("--launch-blocking", action="store_true")
    ap.add_argument("--final", action="store_true")
    args = ap.parse_args()

    def work(name):
        return os.path.join(args.work, name)

    manifest_text = read(os.path.join(args.stage, "manifest.txt"))
    manifest = key_values(manifest_text)
    manifest["text"] = manifest_text
    no_device = read(work("no-device.txt")).strip()
    gpus = gpus_from_csv(read(work("nvidia-smi.csv")))
    tests = test_section(read_json(work("tests.json")))
    sanitizer = read_json(work("sanitizer.json"))
    steps = jsonl(work("steps.jsonl"))
    bench = jsonl(os.path.join(args.out, "bench.jsonl"))
    peer = jsonl(os.path.join(args.out, "peer.jsonl"))
    gemm, mla = side_by_side(bench, peer)
    decode_gemm_rows = decode_gemm_table(bench, peer)
    phase = read(work("phase")).strip()
    if no_device:
        verdict, status = "no CUDA device found: " + no_device, 3
    else:
        verdict = verdict_of(args.final, phase, tests, sanitizer, steps)
        status = 0 if verdict == "passed" else 1

    doc = {
        "suite": "r1-runtime GPU suite",
        "mode": args.mode,
        "complete": args.final,
        "verdict": verdict,
        "exit_status": status,
        "device": None if no_device or not gpus else gpus[0],
        "gpu_count": len(gpus),
        "machine": key_values(read(work("machine.txt"))),
        "manifest": manifest,
        "started": datetime.datetime.fromtimestamp(args.started, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "total_s": int(time.time()) - args.started,
        "budget_s": args.budget,
        "launch_blocking": args.launch_blocking,
        "kernel_attributes": table_of(read(work("kernel_attributes.txt"))),
        "tests": tests,
        "sanitizer": sanitizer,
        "steps": steps,
        "bench": bench,
        "peer": peer,
        "side_by_side": gemm,
        "side_by_side_mla": mla,
        "decode_gemm": {"ours_copy_gbps": copy_gbps(bench, "decode_gemm"),
                        "peer_copy_gbps": copy_gbps(peer, "peer_decode_gemm"),
                        "rows": decode_gemm_rows} if decode_gemm_rows else None,
    }
    lines = summary_lines(doc)
    for name, text in (("gpu-suite.json", json.dumps(doc, indent=1)), ("summary.txt", "\n".join(lines) + "\n")):
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    if args.final:
        print("\n".join(lines))
        raise SystemExit(status)


if __name__ == "__main__":
    main()
