"""
mailgate against Postfix on this machine, side by side, in one run: what `bench/run` runs.

Each target (see targets.py) is started on loopback in a fresh directory for every cell, warmed
up, then driven by Postfix's smtp-source (the same pre-formatted, DKIM-signed message for every
target, sent with -F), and by our own asyncio client for the latency of the final 250; between
them every process is torn down by its process group.  Progress goes to stderr, one Markdown table
of medians (with mailgate ÷ Postfix per cell) to stdout; --results FILE also writes it with the
date, the machine and the versions.  See bench/README.md.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import procs
import smtpclient
import targets
import workload

REQUIRED = {  # what bench/run needs, and what installs it; it installs nothing itself
    "smtp-source": "apt-get install postfix",
    "smtp-sink": "apt-get install postfix",
    "postconf": "apt-get install postfix",
    targets.POSTFIX_MASTER: "apt-get install postfix",
    targets.VENV_TWISTD: "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'",
}
IDLE_TARGETS = ("mailgate", "mailgate-filters", "postfix")
PROBE_MESSAGES = 20


def log(message):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), message))
    sys.stderr.flush()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench/run", description="mailgate against Postfix on this machine, side by side.")
    parser.add_argument("--quick", action="store_true",
                        help="development mode: one run per cell, fewer messages, fewer cells")
    parser.add_argument("--cells", default=None,
                        help="comma-separated SIZE/SESSIONS/RECIPIENTS[/d] (SIZE 4k or 100k; /d: "
                             "many messages per connection, smtp-source -d), or 'full' or 'quick'")
    parser.add_argument("--targets", default=",".join(targets.TARGETS),
                        help="comma-separated, from: %s" % ", ".join(targets.TARGETS))
    parser.add_argument("--runs", type=int, default=None, help="runs per cell (default 3, quick 1)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the number of messages per run")
    parser.add_argument("--idle", type=int, default=10000,
                        help="idle concurrent sessions for the memory test (0: skip it)")
    parser.add_argument("--mailgate-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an extra key for mailgate's config, e.g. "
                             "delivery.per_destination_concurrency=20 (repeatable)")
    parser.add_argument("--code", choices=("head", "worktree"), default="head",
                        help="which mailgate to run: a snapshot of the committed HEAD (default), "
                             "or of the working tree as it is when the bench starts; either way "
                             "the same code for the whole run")
    parser.add_argument("--dir", default=None,
                        help="where the targets' directories go (default: a new one in /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="also write the table, date, machine and versions to FILE "
                             "(e.g. bench/RESULTS.md)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every run's numbers")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    try:
        if args.cells in (None, ""):
            args.cells = workload.QUICK_CELLS if args.quick else workload.FULL_CELLS
        elif args.cells in ("full", "quick"):
            args.cells = workload.FULL_CELLS if args.cells == "full" else workload.QUICK_CELLS
        else:
            args.cells = [workload.parse_cell(text) for text in args.cells.split(",") if text.strip()]
    except ValueError as e:
        parser.error(str(e))
    args.targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = [name for name in args.targets if name not in targets.TARGETS]
    if unknown:
        parser.error("unknown target %s (known: %s)" % (", ".join(unknown),
                                                       ", ".join(targets.TARGETS)))
    settings = {}
    for item in args.mailgate_set:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().rpartition(".")
        if not eq or not dot or not section or not name:
            parser.error("--mailgate-set takes SECTION.KEY=VALUE, e.g. "
                         "delivery.per_destination_concurrency=20; got %r" % (item,))
        settings[(section, name.lower())] = value.strip()
    args.mailgate_set = settings
    return args


def missing_tools():
    missing = []
    for tool, how in REQUIRED.items():
        if os.path.isabs(tool):
            found = os.access(tool, os.X_OK)
        else:
            found = shutil.which(tool) is not None
        if not found:
            missing.append("%s (%s)" % (tool, how))
    for module, how in (("twisted", "the venv: .venv/bin/pip install -e '.[test]'"),
                        ("dkim", "dkimpy, in the venv: .venv/bin/pip install -e '.[test]'"),
                        ("cryptography", "in the venv: .venv/bin/pip install -e '.[test]'")):
        try:
            __import__(module)
        except ImportError:
            missing.append("Python module %s (%s)" % (module, how))
    return missing


def raise_file_limit(needed):
    """Raise this process's open-file limit (the targets inherit it; the gateway is not changed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed and os.geteuid() == 0:
        with open("/proc/sys/fs/nr_open") as f:
            hard = min(max(hard, needed), int(f.read()))
    want = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Bench:
    def __init__(self, args, root):
        self.args = args
        self.root = root
        self.children = procs.Children()
        self.sampler = procs.PeakSampler()
        self.as_root = os.geteuid() == 0
        self.skipped = {}  # target -> why it was skipped
        self.runs = []  # one dict per measured run
        self.peaks = {}  # (cell name, target) -> peak RSS kB over the cell
        self.idle = {}  # target -> idle test result
        self.notes = []
        self.zone = None
        self.code, self.code_description = None, "?"

    # -- set-up -----------------------------------------------------------------------------------

    def prepare(self):
        self.code, self.code_description = snapshot_code(self.root, self.args.code)
        log("mailgate code: %s" % self.code_description)
        log("making a DKIM key and the loopback DNS zone for %s" % workload.SENDER_DOMAIN)
        key = workload.dkim_key()
        self.zone = workload.start_zone(key)
        self.messages, self.files = {}, {}
        for size in sorted({cell.size for cell in self.args.cells} | {"4k"}):
            message = workload.signed_message(workload.SIZES[size], key)
            self.messages[size] = message
            self.files[size] = workload.write_for_smtp_source(
                message, os.path.join(self.root, "message-%s.txt" % size))
            log("message %s: %d bytes, DKIM-signed by %s" % (size, len(message),
                                                             workload.SENDER_DOMAIN))
        self.sampler.start()

    def settings(self, **extra):
        settings = {"dns": self.zone.address, "as_root": self.as_root,
                    "mailgate_set": self.args.mailgate_set, "pythonpath": self.code}
        settings.update(extra)
        return settings

    def start(self, name, directory, **extra):
        """A started target, or None (skipped from now on, with the reason said once)."""
        if name in self.skipped:
            return None
        if name.startswith("postfix") and not self.as_root:
            self.skip(name, "Postfix's master must run as root")
            return None
        for attempt in (1, 2):
            target = targets.make(name, self.children, directory, self.settings(**extra))
            try:
                target.start()
                return target
            except procs.StartError as e:
                if attempt == 1 and "address already in use" in str(e).lower():
                    continue  # a free port was taken in between: once more
                self.skip(name, str(e))
                return None

    def skip(self, name, why):
        self.skipped[name] = why
        log("%s: skipped: %s" % (name, why))

    def client(self, target, cell, timeout=60.0):
        return smtpclient.Client(target.port, smtpclient.stuffed(self.messages[cell.size]),
                                 workload.SENDER, workload.RCPT, rcpts=cell.rcpts,
                                 helo=workload.HELO, timeout=timeout)

    # -- the filter check -------------------------------------------------------------------------

    def check_filters(self):
        """One message through mailgate-filters: its Authentication-Results must say pass x3."""
        dump = os.path.join(self.root, "filter-check-dump")
        os.makedirs(dump)
        if self.as_root:
            import pwd
            os.chown(dump, pwd.getpwnam("postfix").pw_uid, -1)
        target = self.start("mailgate-filters", os.path.join(self.root, "filter-check"),
                            sink_dump=dump)
        if target is None:
            return
        try:
            cell = workload.Cell("4k", 1, 1, False)
            latencies, errors = smtpclient.latency(self.client(target, cell), 1, 1)
            if errors or not target.wait_delivered(1, time.monotonic() + 60):
                self.note("filter check: the message was not delivered (%s); the gateway's log "
                          "ends: %s" % ("; ".join(map(str, errors)) or "timeout",
                                        " | ".join(target.log_tail())))
                return
            text = ""
            for _ in range(100):  # the dump file is written as the message arrives
                names = os.listdir(dump)
                if names:
                    with open(os.path.join(dump, names[0]), "rb") as f:
                        text = f.read().decode("latin-1")
                    if "\n\n" in text.replace("\r\n", "\n"):
                        break
                time.sleep(0.05)
            header = " ".join(line.strip() for line in _field(text, "Authentication-Results"))
            verdicts = {method: ("%s=pass" % method) in header for method in ("spf", "dkim", "dmarc")}
            if all(verdicts.values()):
                log("filter check: %s" % header)
                self.note("filter check (one message through mailgate-filters): " + header)
            else:
                self.note("filter check FAILED, the filter target does not pass everything: %s"
                          % (header or "no Authentication-Results"))
        finally:
            target.stop()

    def note(self, text):
        log(text)
        self.notes.append(text)

    # -- one cell ---------------------------------------------------------------------------------

    def run_cell(self, cell):
        cell_dir = os.path.join(self.root, cell.name.replace("/", "-"))
        started = []
        try:
            for name in self.args.targets:
                target = self.start(name, os.path.join(cell_dir, name))
                if target is not None:
                    self.sampler.watch(target.pgid)
                    started.append(target)
            for target in started:
                self.sampler.focus = target.pgid
                self.warm_up(target, cell)
            for run in range(self.args.runs):
                order = started[run % len(started):] + started[:run % len(started)] if started else []
                for target in order:
                    self.sampler.focus = target.pgid
                    result = self.measure(target, cell)
                    result.update(cell=cell.name, target=target.name, run=run + 1)
                    self.runs.append(result)
                    log("%-11s run %d/%d %-16s %s" % (cell.label, run + 1, self.args.runs,
                                                      target.name, _summary(result)))
                    if result["errors"] and isinstance(target, targets.Mailgate):
                        for line in target.log_tail(3):
                            log("%s: %s" % (target.name, line))
            for target in started:
                if isinstance(target, targets.Postfix):
                    for line in target.postfix_errors()[-3:]:
                        log("%s: %s" % (target.name, line))
        finally:
            self.sampler.focus = None
            for target in started:
                self.peaks[(cell.name, target.name)] = self.sampler.peak(target.pgid)
                self.sampler.forget(target.pgid)
                target.stop()
            if not self.args.keep:
                shutil.rmtree(cell_dir, ignore_errors=True)

    def warm_up(self, target, cell):
        base = target.delivered()
        latencies, errors = smtpclient.latency(self.client(target, cell), 2, 20, cell.reuse)
        if errors:
            log("%s: warm-up errors: %s" % (target.name, errors[0]))
        if target.delivers:
            target.wait_delivered(base + len(latencies), time.monotonic() + 60)

    def measure(self, target, cell):
        count = workload.messages_for(cell, self.args.quick, self.args.scale)
        result = {"messages": count, "errors": []}
        base = target.delivered()
        before = procs.cpu_snapshot(target.pgid)
        argv = ["smtp-source", "-s", str(cell.sessions), "-m", str(count),
                "-F", self.files[cell.size], "-f", workload.SENDER, "-t", workload.RCPT,
                "-r", str(cell.rcpts), "-N", "-M", workload.HELO]
        if cell.reuse:
            argv.append("-d")
        argv.append("%s:%d" % (procs.LOOPBACK, target.port))
        errors_path = os.path.join(target.directory, "smtp-source.err")
        with open(errors_path, "wb") as errors_file:
            started = time.monotonic()
            source = self.children.spawn(argv, stderr=errors_file)
            try:
                source.wait(timeout=600)
            except subprocess.TimeoutExpired:
                pass
            accepted_at = time.monotonic()
            if source.poll() is None:
                self.children.stop(source)
                result["errors"].append("smtp-source did not finish in 600s")
            else:
                self.children.stop(source)  # reaped already; this only forgets it
        with open(errors_path, "rb") as f:
            complaint = f.read().decode("utf-8", "replace").strip()
        if source.returncode != 0:
            result["errors"].append(complaint.splitlines()[-1] if complaint else
                                    "smtp-source exited with %s" % source.returncode)
        ok = source.returncode == 0
        elapsed = accepted_at - started
        result["accepted"] = count / elapsed if ok else None
        if target.delivers and ok:
            deadline = accepted_at + max(60.0, 20 * elapsed)
            delivered_at = target.wait_delivered(base + count, deadline)
            if delivered_at is None:
                got = target.delivered() - base
                result["errors"].append("only %d of %d at the sink after %.0fs"
                                        % (got, count, deadline - started))
                result["e2e"] = None
                self.settle(target)
            else:
                result["e2e"] = count / (delivered_at - started)
        elif not ok:
            self.settle(target)
        after = procs.cpu_snapshot(target.pgid)
        result["cpu_per_1k"] = procs.cpu_seconds(before, after) / count * 1000 if ok else None

        # the latency of the final 250, with our own client, at the cell's concurrency
        messages = workload.latency_messages_for(cell, self.args.quick, self.args.scale)
        base = target.delivered()
        latencies, errors = smtpclient.latency(self.client(target, cell), cell.sessions, messages,
                                               cell.reuse)
        result["p50"] = smtpclient.percentile(latencies, 0.50)
        result["p99"] = smtpclient.percentile(latencies, 0.99)
        result["latency_messages"] = len(latencies)
        if errors:
            result["errors"].append("latency client: %d sessions failed, first: %s"
                                    % (len(errors), errors[0]))
        if target.delivers:
            if target.wait_delivered(base + len(latencies), time.monotonic() + 120) is None:
                result["errors"].append("latency phase: not all delivered in 120s")
                self.settle(target)
        return result

    def settle(self, target, quiet=1.0, limit=30.0):
        """After a failed run: wait until the sink's count stops moving (so it pollutes nothing)."""
        deadline = time.monotonic() + limit
        last, since = target.delivered(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            time.sleep(0.1)
            if target.delivered() != last:
                last, since = target.delivered(), time.monotonic()

    # -- idle sessions ----------------------------------------------------------------------------

    def run_idle(self):
        count = self.args.idle
        for name in [n for n in IDLE_TARGETS if n in self.args.targets]:
            extra = {}
            if name.startswith("mailgate"):
                # [limits] max_connections (1000 by default, for the whole gateway) would
                # refuse most of them: the test is about memory, so the limit goes above it,
                # as an admin expecting that many sessions would set it.  Postfix keeps its
                # stock process limit (100), the point the table makes about it.
                extra["mailgate_set"] = dict(self.args.mailgate_set)
                extra["mailgate_set"][("listener:relay", "max_connections")] = str(count + 1000)
            target = self.start(name, os.path.join(self.root, "idle", name), **extra)
            if target is None:
                continue
            try:
                cell = workload.Cell("4k", 1, 1, False)
                self.warm_up(target, cell)
                log("%s: opening %d idle sessions" % (name, count))
                probe = self.client(target, cell, timeout=20.0)

                def measure():
                    pids = procs.group_pids(target.pgid)
                    return {"rss_kb": procs.memory_kb(target.pgid, "VmRSS:"),
                            "hwm_kb": procs.memory_kb(target.pgid, "VmHWM:"),
                            "pss_kb": sum(procs.pss_kb(pid) for pid in pids),
                            "processes": len(pids)}

                result = smtpclient.idle(target.port, count, probe, PROBE_MESSAGES, measure)
                result["sessions"] = count
                self.idle[name] = result
                log("%s: %d idle connected, %d greeted in %.1fs; RSS %.0f MB (%d processes); "
                    "probe: %d/%d accepted%s" % (
                        name, result["connected"], result["greeted"], result["open_seconds"],
                        result["memory"]["rss_kb"] / 1024, result["memory"]["processes"],
                        len(result["probe_latencies"]), PROBE_MESSAGES,
                        ", p50 %.1f ms" % (1e3 * smtpclient.percentile(result["probe_latencies"], .5))
                        if result["probe_latencies"] else
                        " (%s)" % "; ".join(result["probe_errors"][:1])))
            finally:
                target.stop()

    # -- the whole run ----------------------------------------------------------------------------

    def run(self):
        self.prepare()
        if "mailgate-filters" in self.args.targets:
            self.check_filters()
        for number, cell in enumerate(self.args.cells, 1):
            log("cell %d/%d: %s (%d messages a run, %d runs)" % (
                number, len(self.args.cells), cell.label,
                workload.messages_for(cell, self.args.quick, self.args.scale), self.args.runs))
            self.run_cell(cell)
        if self.args.idle > 0:
            self.run_idle()

    def close(self):
        self.sampler.stop()
        self.children.stop_all()
        if self.zone is not None:
            self.zone.stop_thread()
        left = self.children.leftovers()
        if left:
            log("warning: processes left behind: %s; killing them" % left)
            for pid in left:
                procs._kill_pid(pid)


def snapshot_code(root, mode):
    """
    A copy of mailgate (the package and its twistd plugin) for the whole run, so that commits
    and edits made in the repository meanwhile change nothing: (directory for PYTHONPATH, what it
    is).  mode "head": the committed HEAD (git archive); "worktree": the files as they are now.
    """
    repo = workload.REPO
    code = os.path.join(root, "code")
    os.makedirs(code)

    def git(*argv):
        return subprocess.run(["git", "-C", repo] + list(argv), capture_output=True, check=True)

    commit = git("rev-parse", "--short", "HEAD").stdout.decode().strip()
    if mode == "head":
        archive = git("archive", "--format=tar", "HEAD", "mailgate", "twisted/plugins").stdout
        subprocess.run(["tar", "-x", "-C", code], input=archive, check=True)
        description = "committed HEAD %s (a snapshot taken at the start)" % commit
    else:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        shutil.copytree(os.path.join(repo, "mailgate"), os.path.join(code, "mailgate"),
                        ignore=ignore)
        shutil.copytree(os.path.join(repo, "twisted", "plugins"),
                        os.path.join(code, "twisted", "plugins"), ignore=ignore)
        changed = git("status", "--porcelain", "--", "mailgate", "twisted").stdout.decode()
        changed = [line[3:] for line in changed.splitlines() if line.strip()]
        description = "working tree of %s%s (a snapshot taken at the start)" % (
            commit, ", uncommitted changes in %s" % ", ".join(changed) if changed else "")
    check = subprocess.run(
        [targets.VENV_PYTHON, "-c", "import mailgate, mailgate.version as v; "
         "print(mailgate.__file__); print(v.__version__)"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=code), cwd=code)
    lines = check.stdout.split()
    if check.returncode != 0 or not lines or not lines[0].startswith(code + os.sep):
        raise SystemExit("bench/run: the snapshot of mailgate in %s is not what Python imports: %s"
                         % (code, (check.stdout + check.stderr).strip()))
    return code, "mailgate %s, %s" % (lines[1], description)


def _field(text, name):
    """The lines (with continuations) of every header field called name in a dumped message."""
    out, inside = [], False
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line:
            break
        if line[:1] in " \t" and inside:
            out.append(line)
            continue
        inside = line.lower().startswith(name.lower() + ":")
        if inside:
            out.append(line)
    return out


def _summary(result):
    parts = []
    for key, fmt in (("accepted", "accepted %.0f/s"), ("e2e", "e2e %.0f/s"),
                     ("p50", "p50 %.1f ms"), ("p99", "p99 %.1f ms"),
                     ("cpu_per_1k", "CPU %.2f s/1k")):
        value = result.get(key)
        if value is not None:
            parts.append(fmt % (value * 1e3 if key in ("p50", "p99") else value))
    if result["errors"]:
        parts.append("ERRORS: " + "; ".join(result["errors"]))
    return ", ".join(parts)


# --- the table ------------------------------------------------------------------------------------

COLUMNS = [  # key, heading, scale, format
    ("accepted", "accepted msg/s", 1, "%.0f"),
    ("e2e", "end-to-end msg/s", 1, "%.0f"),
    ("p50", "p50 ms", 1e3, "%.1f"),
    ("p99", "p99 ms", 1e3, "%.1f"),
    ("cpu_per_1k", "CPU s/1000 msgs", 1, "%.2f"),
    ("peak_rss", "peak RSS MB", 1 / 1024, "%.0f"),
    ("peak_pss", "peak PSS MB", 1 / 1024, "%.0f"),
]
RATIO_OF = {"mailgate": "postfix", "mailgate-filters": "postfix"}


def medians(bench):
    table = {}
    for cell in bench.args.cells:
        for name in bench.args.targets:
            runs = [r for r in bench.runs if r["cell"] == cell.name and r["target"] == name]
            if not runs:
                continue
            row = {}
            for key, *_ in COLUMNS:
                values = [r[key] for r in runs if r.get(key) is not None]
                row[key] = statistics.median(values) if values else None
            hwm, pss = bench.peaks.get((cell.name, name), (0, 0))
            row["peak_rss"], row["peak_pss"] = hwm or None, pss or None
            row["runs"] = len(runs)
            row["failed"] = sum(1 for r in runs if r["errors"])
            table[(cell.name, name)] = row
    return table


def render(bench):
    table = medians(bench)
    heading = ["cell", "target"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(heading) + " |", "|" + "---|" * len(heading)]
    for cell in bench.args.cells:
        for name in bench.args.targets:
            row = table.get((cell.name, name))
            if row is None:
                continue
            anchor = table.get((cell.name, RATIO_OF.get(name)))
            values = []
            for key, _, scale, fmt in COLUMNS:
                value = row.get(key)
                if value is None:
                    values.append("–")
                    continue
                text = fmt % (value * scale)
                if key in ("p50", "p99") and value * scale < 1:
                    text = "%.2f" % (value * scale)
                base = anchor.get(key) if anchor else None
                if base:
                    text += " (×%.2f)" % (value / base)
                values.append(text)
            label = name + (" (%d/%d runs failed)" % (row["failed"], row["runs"])
                            if row["failed"] else "")
            lines.append("| %s | %s | %s |" % (cell.label, label, " | ".join(values)))
    out = "\n".join(lines) + "\n"
    if bench.idle:
        out += "\n" + render_idle(bench)
    return out


def render_idle(bench):
    heading = ["%d idle sessions" % bench.args.idle, "connected", "greeted",
               "RSS MB (sum VmRSS)", "PSS MB", "processes", "probe: accepted", "probe p50 ms"]
    lines = ["| " + " | ".join(heading) + " |", "|" + "---|" * len(heading)]
    anchor = bench.idle.get("postfix")
    for name in IDLE_TARGETS:
        result = bench.idle.get(name)
        if result is None:
            continue
        memory = []
        for key in ("rss_kb", "pss_kb"):
            text = "%.0f" % (result["memory"][key] / 1024)
            if anchor and name != "postfix" and anchor["memory"][key]:
                text += " (×%.2f)" % (result["memory"][key] / anchor["memory"][key])
            memory.append(text)
        p50 = smtpclient.percentile(result["probe_latencies"], 0.5)
        lines.append("| %s | %d | %d | %s | %s | %d | %d/%d | %s |" % (
            name, result["connected"], result["greeted"], memory[0], memory[1],
            result["memory"]["processes"], len(result["probe_latencies"]), PROBE_MESSAGES,
            "%.1f" % (p50 * 1e3) if p50 is not None else
            "none (%s)" % "; ".join(result["probe_errors"][:1])))
    return "\n".join(lines) + "\n"


def environment():
    import twisted

    def run(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return "?"

    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        memory = int(f.readline().split()[1]) // 1024
    debian = run(["cat", "/etc/debian_version"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": "%d cores (%s), %d MB RAM, Linux %s, Debian %s" % (
            os.cpu_count(), cpu, memory, platform.release(), debian),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "postfix": run(["postconf", "-d", "-h", "mail_version"]),
    }


def report(bench, argv, elapsed):
    env = environment()
    table = render(bench)
    header = [
        "Date: %s. Machine: %s." % (env["date"], env["machine"]),
        "Versions: Python %s, Twisted %s, Postfix %s, %s." % (
            env["python"], env["twisted"], env["postfix"], bench.code_description),
        "Command: `bench/run %s` (%d run%s per cell, medians; %.0f minutes in all)." % (
            " ".join(argv), bench.args.runs, "" if bench.args.runs == 1 else "s", elapsed / 60),
    ]
    if bench.args.mailgate_set:
        header.append("mailgate extra settings: %s." % ", ".join(
            "%s.%s=%s" % (s, k, v) for (s, k), v in bench.args.mailgate_set.items()))
    for name, why in bench.skipped.items():
        header.append("Skipped %s: %s" % (name, why))
    header += bench.notes
    return env, header, table


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    missing = missing_tools()
    if missing:
        sys.stderr.write("bench/run: missing (it installs nothing itself):\n")
        for item in missing:
            sys.stderr.write("  %s\n" % item)
        return 2
    limit = raise_file_limit(args.idle + 4096)
    if args.idle and limit < args.idle + 1024:
        log("open-file limit %d is too low for %d idle sessions: the test will fall short"
            % (limit, args.idle))
    root = args.dir or tempfile.mkdtemp(prefix="mailgate-bench-", dir="/tmp")
    os.makedirs(root, exist_ok=True)
    os.chmod(root, 0o755)
    log("run directory %s; open-file limit %d" % (root, limit))

    def terminate(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    # Ctrl-C, kill and a closed terminal all tear everything down (SIGINT even when the shell
    # that started us in the background set it to be ignored; SIGHUP only if nohup did not)
    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, terminate)
    bench = Bench(args, root)
    started = time.monotonic()
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: tearing down")
    finally:
        bench.close()
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    env, header, table = report(bench, argv, elapsed)
    if interrupted:
        header.append("INTERRUPTED: the table holds the runs finished before.")
    sys.stdout.write("\n".join(header) + "\n\n" + table)
    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "runs": bench.runs, "idle": bench.idle,
                       "peaks": {"%s %s" % k: v for k, v in bench.peaks.items()},
                       "skipped": bench.skipped, "notes": bench.notes}, f, indent=1)
    if args.results and not interrupted:
        write_results(args.results, header, table)
        log("wrote %s" % args.results)
    log("done in %.1f minutes" % (elapsed / 60))
    return 130 if interrupted else 0


def write_results(path, header, table):
    with open(path, "w") as f:
        f.write("# bench/run results\n\n")
        f.write("\n".join("%s  " % line for line in header).rstrip() + "\n\n")
        f.write(table)
        f.write("\nColumns and caveats: see bench/README.md. Only ratios within one run mean "
                "anything: the load generator shares the two cores with the target.\n")


if __name__ == "__main__":
    sys.exit(main())
