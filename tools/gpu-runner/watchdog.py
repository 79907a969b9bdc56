#!/usr/bin/env python3
"""Runs the staged GPU binaries so that one hang or fault costs one test, not the run.

Called by run.sh (python3 3.8+, standard library only):

  watchdog.py tests --stage DIR --log FILE --results FILE --budget-s S BIN...
      Each BIN (a libtest harness in DIR/bin) is listed (`--list --format terse`), then run with
      `--test-threads=1 --nocapture` in its own process group. Its combined stdout+stderr is
      parsed live: libtest prints `test NAME ... ` as a test starts and `ok` / `FAILED` /
      `ignored` when it ends (after whatever the test printed), and the library prints an
      `r1-cuda-trace: launch ...` line before every kernel launch (R1_CUDA_TRACE=1).
      The binary is killed (the whole group) and restarted with `--exact --skip NAME` for every
      test that already has a result when
        - its output has not grown for --watchdog-s seconds: the running test is HUNG;
        - a sticky CUDA error appears: the test it appeared in is FAILED (every later test in
          that process would fail too); the kill waits for that test's own result, or 10 s;
        - it dies (signal, abort, exit) inside a test: that test is DIED.
      An attempt that gives no test a result is not repeated. The budget is split into one
      time slice per binary, weighted by test count, unused time passing on; when a slice runs
      out the binary is stopped and its unstarted tests are "not run".
  watchdog.py sanitizer --sanitizer PATH --tool memcheck --tests FILE --stage DIR ...
      compute-sanitizer on the `sanitizer_smoke` test of each binary that has one and had no
      HUNG test, under the same watchdog, with the budget split evenly.
  watchdog.py run --name NAME --log FILE --record FILE --limit-s S -- CMD...
      One command (a bench, a peer) under the watchdog and a time limit; appends one JSON line
      describing how it ended to --record.

Results are JSON, rewritten after every test so a run cut short still leaves them.
"""

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

STICKY_CUDA_ERRORS = (
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_ASSERT",
)
TRACE_MARK = "r1-cuda-trace: launch "
NO_DEVICE_MARK = "skipped: no CUDA device"
TEST_START = re.compile(r"^test (\S+)(?: - should panic)? \.\.\. ?(.*)$")
OUTCOMES = ("ok", "FAILED", "HUNG", "DIED", "ignored", "not run")
# After a sticky error the test's own result (and panic message) is worth waiting for, briefly.
STICKY_GRACE_S = 10.0
# The most a log file may grow to: the GPU machine returns files of up to 16 MiB.
LOG_CAP_BYTES = 15 << 20
# A slice shorter than this cannot start a binary usefully.
MIN_SLICE_S = 3.0
KEPT_LINES = 3


def say(text):
    print(text, flush=True)


def clip(text, n=300):
    text = text.strip()
    return text if len(text) <= n else text[: n - 3] + "..."


def describe_exit(rc):
    if rc is not None and rc < 0:
        try:
            return "killed by signal %s" % signal.Signals(-rc).name
        except ValueError:
            return "killed by signal %d" % -rc
    return "exit code %s" % rc


def write_json(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


class Log:
    """An append-only log that stops growing at LOG_CAP_BYTES (saying so once)."""

    def __init__(self, path):
        self.file = open(path, "ab")
        self.size = self.file.tell()
        self.full = False

    def line(self, text):
        data = (text + "\n").encode("utf-8", "replace")
        if self.size + len(data) > LOG_CAP_BYTES:
            if not self.full:
                self.full = True
                self.file.write(b"[runner] log cap reached: later output is not kept\n")
                self.file.flush()
            return
        self.file.write(data)
        self.file.flush()
        self.size += len(data)

    def note(self, text):
        self.line("[runner] " + text)


def pump(argv, env, handler, watchdog_s, deadline):
    """Runs argv in a new process group, feeding its combined output to handler.line (complete
    lines) and handler.partial (the unfinished last line, e.g. libtest's `test NAME ... `).
    Kills the group when the output has not grown for watchdog_s ("hang"), at deadline
    ("slice"), or when handler.stop_reason(now) says so. Returns (returncode, kill reason)."""
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        handler.line("[runner] cannot start %s: %s" % (argv[0], e))
        return 127, None
    fd = proc.stdout.fileno()
    pending = b""
    last_growth = time.monotonic()
    killed, killed_at, exited_at = None, None, None

    def kill(reason):
        nonlocal killed, killed_at
        killed, killed_at = reason, time.monotonic()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        now = time.monotonic()
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            last_growth = now
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                handler.line(raw.decode("utf-8", "replace").rstrip("\r"))
            if pending:
                handler.partial(pending.decode("utf-8", "replace"))
        elif proc.poll() is not None:
            # Exited; a descendant may still hold the pipe open.
            exited_at = exited_at or now
            if now - exited_at > 2.0:
                kill(killed or "exited, descendants killed")
                break
        if killed is None:
            reason = handler.stop_reason(now)
            if reason:
                kill(reason)
            elif now - last_growth > watchdog_s:
                kill("hang")
            elif now > deadline:
                kill("slice")
        elif now - killed_at > 10.0:
            break
    if pending:
        handler.line(pending.decode("utf-8", "replace"))
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    proc.stdout.close()
    return rc, killed


# ------------------------------------------------------------------------------ test binaries


class TestBinary:
    """One libtest binary: its listed tests and their results over one or more attempts."""

    def __init__(self, name, path, log, save):
        self.name, self.path, self.log, self.save = name, path, log, save
        self.listed = []
        self.results = {}  # name -> record, once the test has an outcome
        self.attempts = []
        self.notes = []
        self.skip_lines = []
        self.skip_count = 0
        self.kernel_launches = {}
        self.device_line = None
        self.slice_s = 0.0
        self.seconds = 0.0

    def list_tests(self, env):
        try:
            p = subprocess.run([self.path, "--list", "--format", "terse"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.notes.append("cannot list its tests: %s" % e)
            return
        out = p.stdout.decode("utf-8", "replace")
        for line in out.splitlines():
            m = re.match(r"^(\S+): (test|benchmark)$", line)
            if m:
                self.listed.append(m.group(1))
        if p.returncode != 0:
            self.notes.append("--list failed (%s): ...%s" % (describe_exit(p.returncode), " ".join(out.split())[-300:]))

    def unresolved(self):
        return [t for t in self.listed if t not in self.results]

    def resolve(self, test, outcome, reason=None, **extra):
        rec = {"name": test, "outcome": outcome}
        if reason:
            rec["reason"] = reason
        rec.update({k: v for k, v in extra.items() if v is not None})
        self.results[test] = rec
        if outcome not in ("ok", "ignored", "not run"):
            say("  %s %s: %s%s" % (self.name, test, outcome, ": " + reason if reason else ""))
        self.save()

    def run(self, env, slice_s, watchdog_s):
        self.slice_s = slice_s
        start = time.monotonic()
        deadline = start + slice_s
        while self.unresolved():
            left = deadline - time.monotonic()
            if left < MIN_SLICE_S:
                self.stop_all("the binary's time slice (%.0f s) ran out" % slice_s)
                break
            args = ["--test-threads=1", "--nocapture"]
            if self.results:
                args.append("--exact")
                for t in self.listed:
                    if t in self.results:
                        args += ["--skip", t]
            attempt = len(self.attempts) + 1
            skipped = len(self.results)
            self.log.note("%s attempt %d: %s %s (%d tests with a result skipped)" % (
                self.name, attempt, self.path, " ".join(args[:3]), skipped))
            parser = LibtestOutput(self, attempt)
            began = time.monotonic()
            rc, killed = pump([self.path] + args, env, parser, watchdog_s, deadline)
            progress = parser.finish(rc, killed, watchdog_s, slice_s)
            self.attempts.append({"attempt": attempt, "skipped": skipped, "rc": rc,
                                  "ended": parser.ending, "seconds": round(time.monotonic() - began, 1)})
            self.save()
            if killed == "slice" or parser.summary_seen:
                break
            if not progress:
                self.notes.append("attempt %d gave no test a result (%s); not restarted" % (
                    attempt, parser.ending))
                break
        if self.unresolved():
            self.stop_all("not started; the binary's last attempt ended: %s" % (
                self.attempts[-1]["ended"] if self.attempts else "never started"))
        self.seconds = round(time.monotonic() - start, 1)
        self.save()

    def stop_all(self, reason):
        for t in self.unresolved():
            self.resolve(t, "not run", reason)

    def counts(self):
        c = dict.fromkeys(OUTCOMES, 0)
        for t in self.listed:
            c[self.results.get(t, {}).get("outcome", "not run")] += 1
        return c

    def doc(self):
        return {
            "binary": self.name, "listed": len(self.listed), "counts": self.counts(),
            "slice_s": round(self.slice_s, 1), "seconds": self.seconds, "attempts": self.attempts,
            "notes": self.notes, "device_line": self.device_line,
            "skip_count": self.skip_count, "skip_lines": self.skip_lines,
            "kernel_launches": self.kernel_launches,
            "tests": [self.results.get(t, {"name": t, "outcome": "not run"}) for t in self.listed],
        }


class Running:
    """The test that libtest has started and not yet finished."""

    def __init__(self, name):
        self.name = name
        self.started = time.monotonic()
        self.result_word = None  # the last line's ok / FAILED / ignored, if it ended with one
        self.panic = None
        self.panic_wants_message = False
        self.sticky = None
        self.launches = 0
        self.last_kernel = None

    def seconds(self):
        return round(time.monotonic() - self.started, 2)


class LibtestOutput:
    """Follows one attempt's output. A test's result is the last line printed before the next
    `test NAME ... ` (or the final summary): libtest writes it right after the test returns,
    possibly glued to the test's own unfinished line (`...partial outputok`)."""

    def __init__(self, binary, attempt):
        self.binary = binary
        self.attempt = attempt
        self.current = None
        self.in_failures_list = False
        self.summary_seen = False
        self.poisoned_at = None  # when a sticky error was seen in this process
        self.stopping = None
        self.resolved_here = 0
        self.ending = "finished"

    # -- pump callbacks

    def partial(self, text):
        m = TEST_START.match(text)
        if m and not self.stopping:
            self.start(m.group(1))

    def line(self, text):
        if self.stopping:
            return
        at = text.find(TRACE_MARK)
        if at >= 0:
            if at > 0:
                self.text(text[:at])
            self.trace(text[at:])
        else:
            self.text(text)

    def stop_reason(self, now):
        if self.stopping:
            return self.stopping
        if self.poisoned_at is not None and now - self.poisoned_at > STICKY_GRACE_S:
            if self.current:
                self.finish_current()
            self.stopping = "sticky"
        return self.stopping

    # -- parsing

    def text(self, text):
        b = self.binary
        b.log.line(text)
        m = TEST_START.match(text)
        if m and (m.group(1) == (self.current and self.current.name) or self.startable(m.group(1))):
            self.start(m.group(1))
            if self.stopping:
                return
            text = m.group(2)
            if not text.strip():
                return
        s = text.strip()
        if s.startswith("test result: "):
            self.finish_current()
            self.summary_seen = True
            return
        if self.in_failures_list:
            name = s if text.startswith("    ") else None
            rec = b.results.get(name)
            if rec and rec["outcome"] == "ok":
                rec.update(outcome="FAILED", reason="listed under failures by libtest")
            return
        if s == "failures:" and self.current and self.current.result_word:
            self.finish_current()
            self.in_failures_list = True
            return
        if NO_DEVICE_MARK in text:
            b.skip_count += 1
            if len(b.skip_lines) < KEPT_LINES:
                b.skip_lines.append(clip(s))
        if b.device_line is None and s.startswith(b.name + ": ") and "(sm_" in s:
            b.device_line = clip(s)
        sticky = any(code in text for code in STICKY_CUDA_ERRORS)
        if sticky and self.poisoned_at is None:
            self.poisoned_at = time.monotonic()
            if self.current is None:
                b.notes.append("sticky CUDA error outside any test: %s" % clip(s))
        run = self.current
        if run is None:
            return
        if sticky and run.sticky is None:
            run.sticky = clip(s)
        if run.panic_wants_message and s:
            run.panic = clip(run.panic + " " + s)
            run.panic_wants_message = False
        elif " panicked at " in s and run.panic is None:
            run.panic = s[s.index(" panicked at ") + 1:]
            run.panic_wants_message = s.endswith(":")
        if s.endswith("FAILED"):
            run.result_word = "FAILED"
        elif s.endswith("ok"):
            run.result_word = "ok"
        elif s == "ignored" or s.startswith("ignored, "):
            run.result_word = "ignored"
        elif s:
            run.result_word = None

    def startable(self, name):
        return name in self.binary.listed and name not in self.binary.results

    def start(self, name):
        if self.current and self.current.name == name:
            return
        if not self.startable(name):
            return
        self.finish_current()
        if self.poisoned_at is not None:
            # The process's CUDA context is lost: this test runs again in a fresh process.
            self.stopping = "sticky"
            return
        self.current = Running(name)

    def trace(self, text):
        run = self.current
        kernel = text[len(TRACE_MARK):].split(" ", 1)[0]
        launches = self.binary.kernel_launches
        launches[kernel] = launches.get(kernel, 0) + 1
        if run:
            run.launches += 1
            run.last_kernel = clip(text)

    def finish_current(self, outcome=None, reason=None):
        """Records the running test's result: `outcome` when the runner decides it (HUNG, DIED,
        not run), else what libtest printed."""
        run = self.current
        if run is None:
            return
        self.current = None
        if outcome is None:
            word = run.result_word
            if run.sticky:
                outcome, reason = "FAILED", "sticky CUDA error: %s%s" % (
                    run.sticky, "; libtest said ok" if word == "ok" else "")
            elif word is None:
                outcome, reason = "FAILED", "no result line from libtest"
            elif word == "FAILED":
                outcome, reason = "FAILED", run.panic or "failed"
            else:
                outcome = word
        elif run.sticky:
            reason += "; after a sticky CUDA error: %s" % run.sticky
        if run.panic and outcome == "DIED":
            reason += "; %s" % run.panic
        self.resolved_here += 1
        self.binary.resolve(run.name, outcome, reason, seconds=run.seconds(), attempt=self.attempt,
                            launches=run.launches or None,
                            last_kernel=run.last_kernel if outcome != "ok" else None)

    def finish(self, rc, killed, watchdog_s, slice_s):
        """Settles the test left running when the process ended; returns whether this attempt
        gave any test a result."""
        if killed == "hang":
            self.ending = "no output for %.0f s%s" % (
                watchdog_s, " in " + self.current.name if self.current else " outside any test")
            if self.current:
                self.finish_current("HUNG", "no output for %.0f s%s" % (
                    watchdog_s, "" if self.current.last_kernel else " (no kernel launch traced in this test)"))
        elif killed == "slice":
            self.ending = "time slice of %.0f s ran out" % slice_s
            if self.current:
                self.finish_current("not run", "cut: the binary's time slice (%.0f s) ran out while it ran" % slice_s)
            self.binary.stop_all("the binary's time slice (%.0f s) ran out" % slice_s)
        elif killed == "sticky":
            self.ending = "stopped after a sticky CUDA error"
        elif self.current:
            self.ending = "%s in %s" % (describe_exit(rc), self.current.name)
            self.finish_current("DIED", describe_exit(rc))
        elif self.summary_seen:
            self.ending = "finished (%s)" % describe_exit(rc)
        else:
            self.ending = "%s outside any test" % describe_exit(rc)
        self.binary.log.note("%s attempt %d ended: %s" % (self.binary.name, self.attempt, self.ending))
        return self.resolved_here > 0


def run_tests(args):
    log = Log(args.log)
    env = dict(os.environ)
    binaries = []

    def save():
        write_json(args.results, {"watchdog_s": args.watchdog_s, "budget_s": args.budget_s,
                                  "binaries": [b.doc() for b in binaries]})

    for name in args.binaries:
        path = os.path.join(args.stage, "bin", name)
        b = TestBinary(name, path, log, save)
        binaries.append(b)
        if not os.access(path, os.X_OK):
            b.notes.append("not staged (no executable %s)" % path)
            continue
        b.list_tests(env)
    save()
    phase_end = time.monotonic() + args.budget_s
    runnable = [b for b in binaries if b.listed]
    for i, b in enumerate(runnable):
        left = phase_end - time.monotonic()
        # Weighted by test count (+1 so a small binary keeps a share), but at least one
        # watchdog period and a margin, so a single hang does not cost all its other tests.
        weights = [len(x.listed) + 1 for x in runnable[i:]]
        slice_s = min(left, max(left * weights[0] / sum(weights), args.watchdog_s + 20))
        say("%s: %d tests, slice %.0f s of %.0f s left" % (b.name, len(b.listed), slice_s, left))
        log.note("%s: %d tests listed; time slice %.0f s" % (b.name, len(b.listed), slice_s))
        if slice_s < MIN_SLICE_S:
            b.stop_all("the test phase's time budget was spent before this binary")
            continue
        b.run(env, slice_s, args.watchdog_s)
        c = b.counts()
        say("%s: %s (%.0f s, attempts: %d)" % (
            b.name, ", ".join("%d %s" % (c[o], o) for o in OUTCOMES if c[o]), b.seconds, len(b.attempts)))
    save()


# ------------------------------------------------------------------------------ sanitizer


class LineHandler:
    """What pump feeds: complete lines; by default the unfinished last line is ignored and
    nothing but the watchdog and the deadline stops the process."""

    def partial(self, text):
        pass

    def stop_reason(self, now):
        return None


class SanitizerOutput(LineHandler):
    """Keeps compute-sanitizer's error summary and its first reports (each with a few detail
    lines, which name the kernel and the address)."""

    def __init__(self, log):
        self.log = log
        self.errors = None
        self.reports = []
        self.test_result = None
        self.last_kernel = None

    def line(self, text):
        if TRACE_MARK in text:
            self.last_kernel = clip(text[text.index(TRACE_MARK):])
            return
        self.log.line(text)
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        if m:
            self.errors = int(m.group(1))
        elif text.startswith("test result: "):
            self.test_result = clip(text)
        elif text.startswith("========= ") and not text.startswith("=========  "):
            head = text[len("========= "):].strip()
            if head and not head.startswith(("COMPUTE-SANITIZER", "Target application")) \
                    and len(self.reports) < 5:
                self.reports.append([clip(head)])
        elif text.startswith("=========  ") and self.reports and len(self.reports[-1]) < 4:
            self.reports[-1].append(clip(text[len("========= "):]))


def run_sanitizer(args):
    with open(args.tests) as f:
        tested = json.load(f)["binaries"]
    doc = {"tool": args.tool, "runs": []}
    if not args.sanitizer:
        doc["error"] = "compute-sanitizer not found"
        write_json(args.results, doc)
        say("sanitizer: compute-sanitizer not found")
        return
    log = Log(args.log)
    chosen = []
    for b in tested:
        smoke = [t["name"] for t in b["tests"] if t["name"].split("::")[-1] == "sanitizer_smoke"]
        if not smoke:
            continue
        if b["counts"]["HUNG"]:
            doc["runs"].append({"binary": b["binary"], "test": smoke[0], "outcome": "not run",
                                "reason": "a test of this binary hung"})
            continue
        chosen.append((b["binary"], smoke[0]))
    phase_end = time.monotonic() + args.budget_s
    for i, (binary, test) in enumerate(chosen):
        left = phase_end - time.monotonic()
        slice_s = left / (len(chosen) - i)
        run = {"binary": binary, "test": test}
        doc["runs"].append(run)
        if slice_s < MIN_SLICE_S:
            run.update(outcome="not run", reason="the sanitizer phase's time budget was spent")
            continue
        argv = [args.sanitizer, "--tool", args.tool, "--error-exitcode", "99", "--print-limit", "20",
                os.path.join(args.stage, "bin", binary), test, "--exact", "--test-threads=1", "--nocapture"]
        log.note("%s: %s (limit %.0f s)" % (binary, " ".join(argv), slice_s))
        out = SanitizerOutput(log)
        began = time.monotonic()
        rc, killed = pump(argv, dict(os.environ), out, args.watchdog_s, began + slice_s)
        run.update(rc=rc, seconds=round(time.monotonic() - began, 1), errors=out.errors,
                   reports=out.reports, test_result=out.test_result)
        if killed:
            run.update(outcome="HUNG" if killed == "hang" else "not run",
                       reason="no output for %.0f s" % args.watchdog_s if killed == "hang"
                       else "cut: its time slice (%.0f s) ran out" % slice_s,
                       last_kernel=out.last_kernel)
        elif out.errors:
            run["outcome"] = "errors"
        elif out.errors == 0 and rc == 0:
            run["outcome"] = "clean"
        else:
            run.update(outcome="failed", reason=describe_exit(rc))
        say("sanitizer %s %s: %s%s" % (binary, test, run["outcome"],
                                       "" if out.errors is None else " (errors: %d)" % out.errors))
        write_json(args.results, doc)
    write_json(args.results, doc)


# ------------------------------------------------------------------------------ one command


class PlainOutput(LineHandler):
    def __init__(self, log):
        self.log = log
        self.last_line = None
        self.skip_line = None

    def line(self, text):
        self.log.line(text)
        if text.strip():
            self.last_line = clip(text)
        if NO_DEVICE_MARK in text and self.skip_line is None:
            self.skip_line = clip(text)


def run_command(args):
    record = {"step": args.name, "command": " ".join(args.command)}
    if args.limit_s < MIN_SLICE_S:
        record.update(outcome="not run", reason="the phase's time budget was spent")
        rc = 0
    else:
        log = Log(args.log)
        log.note("%s: %s (limit %.0f s)" % (args.name, record["command"], args.limit_s))
        out = PlainOutput(log)
        began = time.monotonic()
        rc, killed = pump(args.command, dict(os.environ), out, args.watchdog_s, began + args.limit_s)
        record.update(rc=rc, seconds=round(time.monotonic() - began, 1), last_line=out.last_line)
        if out.skip_line:
            record["skip_line"] = out.skip_line
        if killed == "hang":
            record.update(outcome="HUNG", reason="no output for %.0f s" % args.watchdog_s)
        elif killed:
            record.update(outcome="not run", reason="cut: its time limit (%.0f s) ran out" % args.limit_s)
        else:
            record["outcome"] = "ok" if rc == 0 else "failed"
            if rc != 0:
                record["reason"] = describe_exit(rc)
        log.note("%s: %s" % (args.name, record["outcome"]))
    say("%s: %s%s" % (args.name, record["outcome"], ": " + record["reason"] if "reason" in record else ""))
    with open(args.record, "a") as f:
        f.write(json.dumps(record) + "\n")
    sys.exit(0 if record["outcome"] in ("ok", "not run") else 1)


def main():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--watchdog-s", type=float, default=60.0,
                        help="kill after this many seconds without output (default 60)")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    sub.required = True
    t = sub.add_parser("tests", parents=[common])
    t.add_argument("--stage", required=True)
    t.add_argument("--log", required=True)
    t.add_argument("--results", required=True)
    t.add_argument("--budget-s", type=float, required=True)
    t.add_argument("binaries", nargs="+")
    s = sub.add_parser("sanitizer", parents=[common])
    s.add_argument("--sanitizer", default="")
    s.add_argument("--tool", default="memcheck")
    s.add_argument("--tests", required=True, help="the results file of `tests`")
    s.add_argument("--stage", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--results", required=True)
    s.add_argument("--budget-s", type=float, required=True)
    r = sub.add_parser("run", parents=[common])
    r.add_argument("--name", required=True)
    r.add_argument("--log", required=True)
    r.add_argument("--record", required=True)
    r.add_argument("--limit-s", type=float, required=True)
    r.add_argument("command", nargs="+")
    args = ap.parse_args()
    {"tests": run_tests, "sanitizer": run_sanitizer, "run": run_command}[args.cmd](args)


if __name__ == "__main__":
    main()
