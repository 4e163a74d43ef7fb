"""
The targets of bench/run, each started on loopback in a fresh directory of its own:

- mailgate: `twistd -n mailgate`, spool backend, a relay listener, no filters, relaying
  everything to a downstream smtp-sink through `[route:all] smarthost`;
- mailgate-filters: the same with the full relay chain (spf, dkim, dmarc, attachments), its
  resolver pointed at the loopback DNS server;
- postfix: a private Postfix instance (own main.cf/master.cf, queue and data directories under the
  target's directory, `master -d`, no chroot, no DNS) relaying everything to a downstream smtp-sink;
- postfix-hold: the same with `check_client_access static:HOLD`: accepted into the hold queue,
  never delivered (the accept-only anchor);
- sink: smtp-sink alone (the ceiling: what smtp-source can push through loopback).

A downstream Sink is smtp-sink with -c, whose running counter (mesg=N) tells when the mail is all
there.
"""

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import procs
import workload

REPO = workload.REPO
VENV_TWISTD = os.path.join(REPO, ".venv", "bin", "twistd")
VENV_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
START_TIMEOUT = 30.0

TARGETS = ("mailgate", "mailgate-filters", "postfix", "postfix-hold", "sink")


def sink_argv(port, as_root):
    argv = ["smtp-sink", "-c", "-m", "1024"]
    if as_root:
        argv += ["-u", "postfix"]  # smtp-sink refuses to run as root without a user to become
    return argv + ["%s:%d" % (procs.LOOPBACK, port), "1024"]


class Sink:
    """smtp-sink -c on a free port; count is the number of messages it has received ('.')."""

    COUNTER = re.compile(rb"mesg=(\d+)")

    def __init__(self, children, directory, as_root, dump=None):
        self.children = children
        self.port = procs.free_port()
        self.count = 0
        self._history = [(0, time.monotonic())]  # (count, when the reader first saw it)
        self.changed = threading.Condition()
        self._errors = open(os.path.join(directory, "smtp-sink.err"), "wb")
        argv = sink_argv(self.port, as_root)
        if dump:  # keep every message as a file in dump (for the filter check only: it is slow)
            argv[1:1] = ["-d", os.path.join(dump, "%H%M%S.")]
        self.process = children.spawn(argv, stdout=subprocess.PIPE,
                                      stderr=self._errors)
        self._reader = threading.Thread(target=self._read, name="sink-%d" % self.port, daemon=True)
        self._reader.start()
        if not procs.wait_for_greeting(self.port, time.monotonic() + START_TIMEOUT,
                                       alive=lambda: self.process.poll() is None):
            self.stop()
            raise procs.StartError("smtp-sink did not start: " + self.errors())

    def errors(self):
        with open(self._errors.name, "rb") as f:
            return f.read().decode("utf-8", "replace").strip() or "(no output)"

    def _read(self):
        stream = self.process.stdout.fileno()
        tail = b""
        while True:
            try:
                data = os.read(stream, 65536)
            except OSError:
                data = b""
            if not data:
                break
            seen = time.monotonic()
            tail = (tail + data)[-64:]
            counts = self.COUNTER.findall(tail)
            if counts and int(counts[-1]) > self.count:
                with self.changed:
                    self.count = int(counts[-1])
                    self._history.append((self.count, seen))
                    self.changed.notify_all()
            time.sleep(0.002)  # batch the counter's updates: fewer wake-ups competing for the CPU

    def wait_count(self, count, deadline):
        """
        The monotonic time the count was first seen at `count` or more (which may be in the past),
        or None at the deadline.
        """
        with self.changed:
            while self.count < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    return None
                self.changed.wait(min(remaining, 0.5))
            for seen_count, seen in reversed(self._history):
                if seen_count < count:
                    break
                first = seen
            del self._history[:-1]
            return first

    def stop(self):
        self.children.stop(self.process)
        self._errors.close()


class Target:
    name = None
    description = None
    delivers = True  # mail goes on to a downstream sink (end to end is measured)

    def __init__(self, children, directory, settings):
        self.children = children
        self.directory = directory
        self.settings = settings
        self.process = None
        self.sink = None
        self.port = None

    @property
    def pgid(self):
        return self.process.pid

    def delivered(self):
        return self.sink.count if self.sink is not None else 0

    def wait_delivered(self, count, deadline):
        return self.sink.wait_count(count, deadline)

    def start(self):
        raise NotImplementedError

    def stop(self):
        if self.process is not None:
            self.children.stop(self.process)
        if self.sink is not None:
            self.sink.stop()

    def _wait_ready(self, why):
        if not procs.wait_for_greeting(self.port, time.monotonic() + START_TIMEOUT,
                                       alive=lambda: self.process.poll() is None):
            reason = why()
            self.stop()
            raise procs.StartError(reason)


# --- mailgate -----------------------------------------------------------------------------------


def render_ini(config):
    out = []
    for section, values in config.items():
        out.append("[%s]" % section)
        out += ["%s = %s" % (key, value) for key, value in values.items()]
        out.append("")
    return "\n".join(out)


class Mailgate(Target):
    name = "mailgate"
    description = "mailgate, spool, relay listener, no filters"
    filters = ""

    def config(self):
        s = self.settings
        config = {
            "gateway": {"hostname": "mailgate.bench.test",
                        "accepted_domains": workload.RCPT_DOMAIN},
            "queue": {"backend": "spool", "path": "spool"},
            "dns": {"nameservers": "%s:%d" % s["dns"]},
            "listener:relay": {
                "endpoint": "tcp:%d:interface=%s" % (self.port, procs.LOOPBACK),
                "role": "relay", "tls": "none", "auth": "none", "relay_ips": "127.0.0.0/8",
                "filters": self.filters,
            },
            "delivery": {},
            "route:all": {"domains": "*", "smarthost": "%s:%d" % (procs.LOOPBACK, self.sink.port),
                          "tls": "none"},
        }
        if self.filters:
            # 127.0.0.0/8 is in relay_ips: without check_internal SPF and DMARC would skip it
            config["spf"] = {"check_internal": "yes"}
            config["dmarc"] = {"check_internal": "yes"}
        for (section, key), value in s.get("mailgate_set", {}).items():
            config.setdefault(section, {})[key] = value
        return {section: values for section, values in config.items() if values}

    def start(self):
        self.sink = Sink(self.children, self.directory, self.settings["as_root"],
                         dump=self.settings.get("sink_dump"))
        self.port = procs.free_port()
        path = os.path.join(self.directory, "mailgate.ini")
        with open(path, "w") as f:
            f.write(render_ini(self.config()))
        # the run's snapshot of mailgate comes first on the path (before the venv's editable
        # install of the repository, whose code others may be changing during the run)
        env = dict(os.environ, PYTHONPATH=self.settings.get("pythonpath") or REPO,
                   PYTHONDONTWRITEBYTECODE="1")
        self.log = os.path.join(self.directory, "twistd.log")
        with open(self.log, "wb") as out:
            self.process = self.children.spawn(
                [VENV_TWISTD, "-n", "--pidfile=", "mailgate", "--config", path],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.directory, env=env)
        self._wait_ready(self._why)

    def log_tail(self, count=5):
        """The last lines of the gateway's log that are not debug lines."""
        try:
            with open(self.log, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if "#debug]" not in line][-count:]

    def _why(self):
        with open(self.log, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        lines = [line for line in text.splitlines() if line.startswith("mailgate:")]
        if lines:  # the gateway's own one-line configuration error
            return lines[-1]
        if self.process.poll() is None:
            return "mailgate did not greet on port %d within %.0fs" % (self.port, START_TIMEOUT)
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        return "mailgate exited with status %s: %s" % (self.process.returncode, " | ".join(tail))


class MailgateFilters(Mailgate):
    name = "mailgate-filters"
    description = "mailgate, spool, relay listener, filters = spf, dkim, dmarc, attachments"
    filters = "spf, dkim, dmarc, attachments"


# --- Postfix ------------------------------------------------------------------------------------

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{address} inet n - n - - smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# The queue directories post-install would create: (name, owner, group, mode).
QUEUE_DIRS = [(name, "postfix", "root", 0o700) for name in (
    "active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming", "private",
    "saved", "trace")] + [("maildrop", "postfix", "postdrop", 0o730),
                          ("public", "postfix", "postdrop", 0o710),
                          ("pid", "root", "root", 0o755)]


class Postfix(Target):
    name = "postfix"
    description = "Postfix, private instance, relaying to smtp-sink"
    hold = False

    def main_cf(self):
        d = self.directory
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": os.path.join(d, "queue"),
            "data_directory": os.path.join(d, "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": procs.LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            # the hold variant delivers nothing; its relayhost is a closed port all the same
            "relayhost": "[%s]:%d" % (procs.LOOPBACK, self.sink.port if self.sink else 9),
            # no DNS anywhere: the system resolver must never be asked
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            # no syslog daemon here: postlogd writes the log to a file of our own
            "maillog_file": os.path.join(d, "maillog"),
            "maillog_file_prefixes": d,
            "biff": "no",
        }
        if self.hold:
            # accepted (queue file written and fsynced) into the hold queue, never delivered.
            # in_flow_delay stays at its default: measured, it makes no difference here.
            settings["smtpd_client_restrictions"] = "check_client_access static:HOLD"
        return "".join("%s = %s\n" % item for item in settings.items())

    def start(self):
        import grp
        import pwd

        if self.delivers:
            self.sink = Sink(self.children, self.directory, self.settings["as_root"])
        self.port = procs.free_port()
        conf = os.path.join(self.directory, "conf")
        os.makedirs(conf)
        with open(os.path.join(conf, "main.cf"), "w") as f:
            f.write(self.main_cf())
        with open(os.path.join(conf, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(address="%s:%d" % (procs.LOOPBACK, self.port)))
        queue = os.path.join(self.directory, "queue")
        data = os.path.join(self.directory, "data")
        for path, owner, group, mode in [(data, "postfix", "postfix", 0o700),
                                         (queue, "root", "root", 0o755)] + \
                [(os.path.join(queue, name), o, g, m) for name, o, g, m in QUEUE_DIRS]:
            os.mkdir(path)
            os.chown(path, pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid)
            os.chmod(path, mode)
        self.log = os.path.join(self.directory, "maillog")
        self.output = os.path.join(self.directory, "master.out")
        with open(self.output, "wb") as out:
            self.process = self.children.spawn([POSTFIX_MASTER, "-d", "-c", conf],
                                               stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready(self._why)

    def _why(self):
        lines = []
        for path in (self.output, self.log):
            try:
                with open(path, "rb") as f:
                    lines += f.read().decode("utf-8", "replace").splitlines()
            except OSError:
                pass
        bad = [line for line in lines if re.search(r"\b(fatal|panic|error|warning):", line)]
        return "Postfix did not greet on port %d: %s" % (
            self.port, " | ".join((bad or lines or ["no output"])[-3:]))

    def postfix_errors(self):
        """fatal/panic/warning lines of the instance's log (read after a run)."""
        try:
            with open(self.log, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if re.search(r"\b(fatal|panic|warning):", line)]


class PostfixHold(Postfix):
    name = "postfix-hold"
    description = "Postfix, private instance, check_client_access static:HOLD (accept only)"
    hold = True
    delivers = False


# --- smtp-sink alone ----------------------------------------------------------------------------


class SinkAlone(Target):
    name = "sink"
    description = "smtp-sink alone (the ceiling)"

    def start(self):
        self.sink = Sink(self.children, self.directory, self.settings["as_root"])
        self.process = self.sink.process
        self.port = self.sink.port

    def stop(self):
        self.sink.stop()


CLASSES = {cls.name: cls for cls in (Mailgate, MailgateFilters, Postfix, PostfixHold, SinkAlone)}


def make(name, children, directory, settings):
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    os.chmod(directory, 0o755)  # Postfix's daemons run as postfix and must reach their queue
    return CLASSES[name](children, directory, settings)
