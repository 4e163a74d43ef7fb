#!/usr/bin/env python3
"""
Many concurrent connections (issue 9): open N sessions to a real gateway at once, check that
every one gets its banner, send and deliver mail while they are all open, and report the
gateway's memory (VmRSS before, with the N sessions open, and its peak VmHWM).

    .venv/bin/python bench/connections.py              # 1000 sessions
    .venv/bin/python bench/connections.py -n 5000 --json out.json

It starts `twistd -n mailgate` from this checkout in a new temporary directory (relay listener on
loopback, no filters, every domain routed to an in-process sink), so it needs nothing but the
repository's venv.  Everything is on 127.0.0.1.  tests/e2e/test_connections.py runs it with
N = 1000 and holds the result to its bounds.
"""

import argparse
import json
import os
import re
import selectors
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.sinks import Sink  # noqa: E402  (standard library only)

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
LISTENING = re.compile(rb"listener relay \(relay\) listening on 127\.0\.0\.1:(\d+)")


def _status_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return None


def _config(sink_port, sessions):
    return "\n".join([
        "[gateway]", "hostname = bench.test.example", "accepted_domains = example.com",
        "[queue]", "path = spool",
        "[dns]", "nameservers = 127.0.0.1:1", "timeout = 1s",
        "[delivery]", "retry = 1s", "delay_warning = 0",
        # backlog: a burst of SYNs beyond it waits for retransmits (1 s, 3 s, 7 s, ...)
        "[listener:relay]", "endpoint = tcp:0:interface=127.0.0.1:backlog=2048", "role = relay",
        "tls = none", "auth = none", "filters =", "relay_ips = 127.0.0.1/32",
        "max_connections = %d" % (sessions + 100), "command_timeout = 10m",
        "[route:sink]", "domains = *", "tls = none", "smarthost = 127.0.0.1:%d" % sink_port,
        "",
    ])


class Gateway:
    def __init__(self, directory, sink_port, sessions):
        self.directory = directory
        path = os.path.join(directory, "mailgate.ini")
        with open(path, "w") as f:
            f.write(_config(sink_port, sessions))
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            TWISTD + ["--nodaemon", "--pidfile=", "mailgate", "--config", path], cwd=directory,
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.port = None
        self.output = []
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and not (self.port and ready):
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("gateway exited:\n" + b"".join(self.output).decode())
            self.output.append(line)
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
            ready = ready or b"queue ready" in line
        if not (self.port and ready):
            raise RuntimeError("gateway not ready:\n" + b"".join(self.output).decode())
        # Keep reading its output so that it never blocks on a full pipe.
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in iter(self.process.stdout.readline, b""):
            self.output.append(line)

    def rss_kb(self):
        return _status_kb(self.process.pid, "VmRSS:")

    def peak_kb(self):
        return _status_kb(self.process.pid, "VmHWM:")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def open_sessions(port, count, timeout=120.0):
    """count sockets connected to port, each having read its 220 banner: (sockets, banners ok)."""
    selector = selectors.DefaultSelector()
    pending = {}
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        pending[s] = b""
        selector.register(s, selectors.EVENT_READ)
    greeted = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            s = key.fileobj
            try:
                chunk = s.recv(512)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            pending[s] += chunk
            if b"\r\n" in pending[s] or not chunk:
                selector.unregister(s)
                if pending[s].startswith(b"220 "):
                    greeted.append(s)
                else:
                    s.close()
                del pending[s]
    for s in pending:
        selector.unregister(s)
        s.close()
    selector.close()
    return greeted


def send_messages(port, count):
    """count messages over one session each: the queue ids of the 250s."""
    ids = []
    for i in range(count):
        client = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.client.example", timeout=60)
        try:
            client.ehlo()
            client.mail("sender@sender.example")
            client.rcpt("user@remote.example")
            code, text = client.data(b"Subject: busy %d\r\n\r\nwhile many sessions are open\r\n" % i)
            if code == 250:
                ids.append(text)
        finally:
            client.quit()
    return ids


def run(sessions=1000, messages=20):
    directory = tempfile.mkdtemp(prefix="mailgate-connections-")
    sink = Sink()
    sink.start()
    gateway = None
    try:
        gateway = Gateway(directory, sink.port, sessions)
        time.sleep(1.0)  # let start-up settle before the first reading
        rss_idle = gateway.rss_kb()
        started = time.monotonic()
        held = open_sessions(gateway.port, sessions)
        opened_in = time.monotonic() - started
        rss_open = gateway.rss_kb()
        accepted = send_messages(gateway.port, messages)
        delivered = sink.wait_for_messages(messages, timeout=60)
        rss_busy = gateway.rss_kb()
        for s in held:
            s.close()
        return {
            "sessions": sessions, "greeted": len(held), "seconds_to_greet_all": round(opened_in, 2),
            "messages": messages, "accepted": len(accepted),
            "delivered": len(sink.messages) if delivered else len(sink.messages),
            "rss_idle_kb": rss_idle, "rss_open_kb": rss_open, "rss_busy_kb": rss_busy,
            "peak_kb": gateway.peak_kb(),
            "kb_per_session": round((rss_open - rss_idle) / max(1, len(held)), 1),
        }
    finally:
        if gateway is not None:
            gateway.stop()
        sink.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-n", "--sessions", type=int, default=1000)
    parser.add_argument("-m", "--messages", type=int, default=20)
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args(argv)
    result = run(args.sessions, args.messages)
    print("%(greeted)d of %(sessions)d sessions greeted in %(seconds_to_greet_all)ss; "
          "%(accepted)d of %(messages)d messages accepted, %(delivered)d delivered, with them open"
          % result)
    print("gateway RSS: %(rss_idle_kb)d kB idle, %(rss_open_kb)d kB with the sessions open "
          "(%(kb_per_session)s kB each), %(rss_busy_kb)d kB after the mail; peak %(peak_kb)d kB"
          % result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = result["greeted"] == args.sessions and result["delivered"] >= args.messages
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
