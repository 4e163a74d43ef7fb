"""
End-to-end harness: runs the real gateway (``twistd -n mailgate --config FILE``) as a child
process from this checkout, and gives tests what they need to talk to it and to check what it
wrote to disk, independently of mailgate's own modules.

    gw = Gateway(directory)
    gw.start(config)                    # a dict of sections, or ini text; "{port}" -> a free port
    gw.ports["relay"]                   # from the "listener NAME (ROLE) listening on" lines
    ...
    gw.stop()                           # SIGTERM and wait; gw.kill9() for a crash

Nothing here sleeps to wait for something: the child's output is read by threads into a queue
and waited for with a deadline, and what is only visible on disk is polled with short waits until
a deadline (wait_until).  Network use is loopback only (127.0.0.0/8), every smtplib client gets an
explicit local_hostname (smtplib would otherwise ask the resolver for this machine's FQDN), and
every gateway configuration names a loopback test DNS server in [dns] nameservers.

The gateway delivers what it accepts: tests about accepting give it a Holding (a route for every
domain to a sink answering 451), so that accepted mail stays in active/ or deferred/; the spool
readers (queued_ids, spool_entry) look in both.
"""

import datetime
import email
import email.policy
import ipaddress
import json
import os
import queue
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
import zlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests import sinks
from tests.dnsserver import TestDNS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HOSTNAME = "mx.test.example"
CLIENT_HELO = "client.test.example"
LOOPBACK = "127.0.0.1"

# twistd itself.  NOT "python -m twisted": that runs `twist`, which knows neither --nodaemon nor
# --pidfile (it exits 64 "option --nodaemon not recognized").
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
CLI = [sys.executable, "-m", "mailgate.cli"]

LISTENING_RE = re.compile(r"listener (\S+) \((\w+)\) listening on (\S+):(\d+)\s*$")
READY_RE = re.compile(r"\bqueue ready\b")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


# --- processes -----------------------------------------------------------------------------------


def child_env():
    """The environment for a child: this checkout first on the path, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONSTARTUP", None)
    return env


def run_twistd(config_path, timeout=START_TIMEOUT):
    """Run the gateway to completion (for start-up failures): a CompletedProcess with text output."""
    return subprocess.run(
        TWISTD + ["--nodaemon", "--pidfile=", "mailgate", "--config", config_path],
        cwd=os.path.dirname(config_path), env=child_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )


def run_cli(*args, timeout=60.0, cwd=None):
    """`mailgate ARGS...` from this checkout: a CompletedProcess with text output."""
    return subprocess.run(
        CLI + list(args), cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )


def meaningful_lines(text):
    return [line for line in text.splitlines() if line.strip()]


class GatewayError(AssertionError):
    """The gateway did not start (or stop) as expected; carries its output."""


class _Reader(threading.Thread):
    """Copies one stream of the child, line by line, into a list and a queue."""

    def __init__(self, stream, name, sink):
        threading.Thread.__init__(self, name="gateway-" + name, daemon=True)
        self.stream = stream
        self.stream_name = name
        self.sink = sink
        self.lines = []

    def run(self):
        try:
            for raw in iter(self.stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.lines.append(line)
                self.sink.put((self.stream_name, line))
        finally:
            self.stream.close()
            self.sink.put((self.stream_name, None))  # end of this stream


class Gateway:
    """
    One gateway process at a time in directory (its cwd; the config file lives there too).
    start() may be called again after stop()/kill9(): same directory, same spool.
    """

    def __init__(self, directory, config_name="mailgate.ini"):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.config_path = os.path.join(self.directory, config_name)
        self.process = None
        self.ports = {}
        self.roles = {}
        self.runs = []  # (stdout lines, stderr lines, returncode) of earlier processes
        self.twistd_args = []  # twistd's own options, e.g. ["--uid=1001", "--gid=1001"]
        self._events = None
        self._readers = ()
        self._config = None

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, config=None, listeners=None, timeout=START_TIMEOUT, wait_ready=True):
        """
        Write config (when given: a dict {section: {key: value}} or ini text, where each "{port}"
        becomes a free port) and start the gateway; wait until every listener logged its port and,
        with wait_ready, "queue ready".  listeners: the names to wait for (default: every
        [listener:NAME] in the config).  Retries once with fresh ports on "address already in use".
        """
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the gateway is already running")
        if config is not None:
            self._config = config
        if self._config is None and not os.path.exists(self.config_path):
            raise RuntimeError("no configuration")
        for attempt in (1, 2):
            text = None
            if self._config is not None:
                text = render_config(self._config)
                if "{port}" in text:
                    text = _fill_ports(text)
                with open(self.config_path, "w") as f:
                    f.write(text)
            with open(self.config_path) as f:
                names = listeners if listeners is not None else listener_names(f.read())
            try:
                self._spawn(names, timeout, wait_ready)
                return self
            except GatewayError as e:
                # Looked for in both streams: the line is on stdout when it comes from a listener
                # that failed after twistd redirected stderr into its log.
                busy = "address already in use" in "\n".join(self.stderr_lines + self.stdout_lines)
                if attempt == 1 and busy and text is not None and "{port}" in render_config(self._config):
                    continue
                raise e

    def _spawn(self, names, timeout, wait_ready):
        self.ports, self.roles = {}, {}
        self._events = queue.Queue()
        self.process = subprocess.Popen(
            TWISTD + ["--nodaemon", "--pidfile="] + list(self.twistd_args)
            + ["mailgate", "--config", self.config_path],
            cwd=self.directory, env=child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._readers = (
            _Reader(self.process.stdout, "stdout", self._events),
            _Reader(self.process.stderr, "stderr", self._events),
        )
        for reader in self._readers:
            reader.start()
        waiting = set(names)
        ready = not wait_ready
        deadline = time.monotonic() + timeout
        open_streams = 2
        while waiting or not ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._abort("did not become ready within %.0fs (waiting for %s)"
                            % (timeout, ", ".join(sorted(waiting)) or "queue ready"))
            try:
                stream, line = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
                if open_streams == 0:
                    self._abort("exited before it was ready")
                continue
            if stream != "stdout":
                continue
            match = LISTENING_RE.search(line)
            if match:
                name, role, host, port = match.groups()
                self.ports[name] = int(port)
                self.roles[name] = role
                waiting.discard(name)
            elif READY_RE.search(line):
                ready = True

    def _abort(self, why):
        self._terminate(signal.SIGKILL)
        raise GatewayError("gateway %s\n%s" % (why, self.describe()))

    def wait_for_line(self, pattern, timeout=10.0):
        """The next stdout line (read since the last wait) matching the regex pattern."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayError("no line matching %r within %.0fs\n%s" % (pattern, timeout, self.describe()))
            try:
                stream, line = self._events.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is not None and stream == "stdout" and regex.search(line):
                return line

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout=STOP_TIMEOUT):
        """
        SIGTERM and wait; returns the exit status (a GatewayError when it would not stop).  After a
        clean shutdown twistd re-raises the signal on itself (Twisted's exit-signal capturing), so
        a clean stop is -SIGTERM with "Server Shut Down." logged: see stopped_cleanly().
        """
        return self._terminate(signal.SIGTERM, timeout)

    def stopped_cleanly(self):
        rc = self.process.returncode if self.process is not None else None
        return rc in (0, -signal.SIGTERM) and "Server Shut Down." in self.stdout

    def kill9(self):
        """SIGKILL: the crash.  Returns the exit status (-9)."""
        return self._terminate(signal.SIGKILL)

    def _terminate(self, sig, timeout=STOP_TIMEOUT):
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
                self._collect()
                raise GatewayError("gateway ignored signal %d for %.0fs\n%s" % (sig, timeout, self.describe()))
        self._collect()
        return process.returncode

    def _collect(self):
        for reader in self._readers:
            reader.join(10)
        if self.process is not None:
            self.runs.append((self.stdout_lines, self.stderr_lines, self.process.returncode))

    def cleanup(self):
        """For addCleanup / finalizers: never leaves a process behind, whatever happened."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for reader in self._readers:
            reader.join(5)

    # -- output -----------------------------------------------------------------------------------

    @property
    def stdout_lines(self):
        return list(self._readers[0].lines) if self._readers else []

    @property
    def stderr_lines(self):
        return list(self._readers[1].lines) if self._readers else []

    @property
    def stdout(self):
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self):
        return "\n".join(self.stderr_lines)

    def all_output(self):
        """stdout and stderr of every process started so far (for 'no Traceback' checks)."""
        parts = []
        for out, err, _ in self.runs:
            parts += out + err
        if self.process is not None and self.process.returncode is None:
            parts += self.stdout_lines + self.stderr_lines
        return "\n".join(parts)

    def describe(self, tail=60):
        rc = self.process.returncode if self.process is not None else None
        return "exit status: %r\n--- stdout (last %d lines) ---\n%s\n--- stderr ---\n%s" % (
            rc, tail, "\n".join(self.stdout_lines[-tail:]), self.stderr)

    # -- paths --------------------------------------------------------------------------------------

    def path(self, *parts):
        return os.path.join(self.directory, *parts)


# --- configuration -------------------------------------------------------------------------------


def render_config(config):
    """ini text from a dict {section: {key: value}} (values str/int; lists joined with ', ')."""
    if isinstance(config, str):
        return config
    lines = []
    for section, values in config.items():
        lines.append("[%s]" % section)
        for key, value in values.items():
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            lines.append("%s = %s" % (key, value))
        lines.append("")
    return "\n".join(lines)


def write_config(path, config):
    with open(path, "w") as f:
        f.write(render_config(config))
    return path


def listener_names(text):
    return re.findall(r"^\s*\[listener:([^\]]+)\]", text, re.MULTILINE)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, read, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _fill_ports(text):
    while "{port}" in text:
        text = text.replace("{port}", str(free_port()), 1)
    return text


def port_is_free(port, host=LOOPBACK):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def listen_socket():
    """A socket listening on a free 127.0.0.1 port (to make the gateway's bind fail)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, 0))
    s.listen(1)
    return s


def base_config(directory, cert, key, users, holding, **gateway):
    """
    The usual three listeners: relay (tls optional, relay_ips 127.0.0.2), submission (STARTTLS,
    AUTH required) and smtps (implicit TLS); paths are relative to directory, as the contract says.
    holding (a started Holding): its [dns] and its route for every domain, so that what the
    gateway accepts stays queued (in active/ or deferred/) instead of being delivered or bounced.
    """
    rel = lambda p: os.path.relpath(p, directory)  # noqa: E731
    gateway_section = {"hostname": HOSTNAME, "accepted_domains": "example.com", "max_message_size": "1M"}
    gateway_section.update(gateway)
    config = {
        "gateway": gateway_section,
        "limits": {"command_timeout": "5m"},
        "queue": {"path": "spool"},
        "tls": {"certificate": rel(cert), "private_key": rel(key)},
        "auth": {"users_file": rel(users)},
        "listener:relay": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "relay",
                           "relay_ips": "127.0.0.2/32"},
        "listener:submission": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "submission"},
        "listener:smtps": {"endpoint": "tcp:{port}:interface=127.0.0.1", "role": "submission",
                           "tls": "implicit"},
    }
    config.update(holding.sections())
    return config


# --- keeping accepted mail queued ------------------------------------------------------------------

HOLD_REPLY = (451, "4.3.0 Held by the test harness")


class Lab:
    """
    A test DNS server, sinks and a gateway in root/gw; close() stops them all, whatever happened.
    Subclasses make their first sinks in prepare().
    """

    def __init__(self, root):
        self.root = root
        self.sinks = []
        self.gw = Gateway(os.path.join(root, "gw"))
        self.spool = self.gw.path("spool")
        self.dns = TestDNS()
        self.dns.start_thread()
        try:
            self.prepare()
        except BaseException:
            self.close()
            raise

    def prepare(self):
        pass

    def sink(self, cls=sinks.Sink, **behaviour):
        sink = cls(**behaviour)
        sink.start()
        self.sinks.append(sink)
        return sink

    def close(self):
        try:
            self.gw.cleanup()
        finally:
            try:
                for sink in self.sinks:
                    sink.stop()
            finally:
                self.dns.stop_thread()


class Holding:
    """
    The gateway delivers what it accepts.  Tests about accepting (and crashing) want the mail to
    stay in the spool: this gives their gateway a loopback DNS server (so that nothing asks the
    system resolver) and one route for every domain, to a sink that answers every RCPT with
    451 4.3.0.  Each message is then tried once and moved to deferred/ (with a state file), and
    retried only after [delivery] retry (1h here).  Nothing is bounced, no DSN is made.

        holding = Holding().start()
        config.update(holding.sections())
        ...
        holding.stop()
    """

    def __init__(self):
        self.dns = TestDNS()
        self.sink = sinks.Sink(rcpt_default=HOLD_REPLY)

    def start(self):
        self.dns.start_thread()
        try:
            self.sink.start()
        except BaseException:
            self.dns.stop_thread()
            raise
        return self

    def stop(self):
        try:
            self.sink.stop()
        finally:
            self.dns.stop_thread()

    def sections(self, retry="1h"):
        return {
            "dns": {"nameservers": "%s:%d" % self.dns.address, "timeout": "2s"},
            "delivery": {"retry": retry, "delay_warning": "0"},
            "route:hold": {"domains": "*", "smarthost": "%s:%d" % (self.sink.host, self.sink.port),
                           "tls": "none"},
        }


def PortSink(host, port, per_connection=None, **behaviour):
    """A sink on a chosen port (several loopback hosts can share one, like MX hosts on mx_port)."""
    return sinks.Sink(host=host, per_connection=per_connection, port=port, **behaviour)


def common_free_port(hosts):
    """A TCP port free a moment ago on every address in hosts."""
    for _ in range(100):
        port = free_port()
        if all(port_is_free(port, host) for host in hosts):
            return port
    raise RuntimeError("no port free on all of %s" % (hosts,))


# --- waiting -----------------------------------------------------------------------------------------


def wait_until(predicate, timeout, what, interval=0.05):
    """
    Poll predicate (short waits, with a deadline) until it returns something true, and return
    that; an AssertionError saying what was awaited when the deadline passes.  what may be a
    callable giving the text (evaluated at the deadline, to show the state then).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s"
                                 % (timeout, what() if callable(what) else what))
        time.sleep(interval)


# --- certificates --------------------------------------------------------------------------------


def issue_server_cert(ca, directory, names=(LOOPBACK, HOSTNAME), name="server"):
    """
    A leaf certificate signed by tests.tlsutil's CA carrying every name in names as a SAN (an IP
    literal as iPAddress), so one certificate serves clients checking 127.0.0.1 and the hostname.
    Writes DIRECTORY/NAME.pem (leaf, then CA) and DIRECTORY/NAME.key; returns their paths.
    """
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, name + ".pem")
    key_path = os.path.join(directory, name + ".key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
        f.write(ca.cert.public_bytes(serialization.Encoding.PEM))
    with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def client_context(ca_path, minimum=None, maximum=None, ciphers=None):
    """A client SSLContext trusting only the test CA, hostname checking on."""
    ctx = ssl.create_default_context(cafile=ca_path)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1/TLSv1_1
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


# --- SMTP clients ----------------------------------------------------------------------------------


def smtp(port, timeout=15, source=None):
    """A connected smtplib.SMTP (banner read; smtp.banner holds (code, text))."""
    client = smtplib.SMTP(local_hostname=CLIENT_HELO, timeout=timeout,
                          source_address=(source, 0) if source else None)
    # smtplib only records the host (used as server_hostname by starttls) when given to the
    # constructor, which connects and throws the banner away: record it by hand.
    client._host = LOOPBACK
    client.banner = client.connect(LOOPBACK, port)
    return client


def smtps(port, context, timeout=15):
    """A connected smtplib.SMTP_SSL (TLS from the first byte; checks 127.0.0.1 in the certificate)."""
    client = smtplib.SMTP_SSL(local_hostname=CLIENT_HELO, timeout=timeout, context=context)
    client._host = LOOPBACK  # see smtp()
    client.banner = client.connect(LOOPBACK, port)
    return client


def close(client):
    """QUIT if the session is still there, close regardless."""
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        client.close()


QUEUED_RE = re.compile(rb"^2\.0\.0 Ok: queued as ([0-9A-Za-z_-]+)$")


def queue_id_of(code, text):
    """The queue id of a `250 2.0.0 Ok: queued as ID` reply, or an AssertionError."""
    match = QUEUED_RE.match(text) if code == 250 else None
    if not match:
        raise AssertionError("expected 250 2.0.0 Ok: queued as ID, got %r %r" % (code, text))
    return match.group(1).decode("ascii")


def transaction(client, sender, recipients, message):
    """
    MAIL, RCPT..., DATA on an open session (after EHLO/AUTH); every step must be accepted.
    Returns the queue id.  message: bytes with CRLF line ends.
    """
    client.ehlo_or_helo_if_needed()
    code, text = client.mail(sender)
    assert code == 250, (code, text)
    for rcpt in recipients:
        code, text = client.rcpt(rcpt)
        assert code == 250, (rcpt, code, text)
    code, text = client.data(message)
    return queue_id_of(code, text)


def make_message(subject, sender="sender@example.org", to="user@example.com", body="Hello.\r\n",
                 extra_headers=()):
    """A small RFC 5322 message as CRLF bytes."""
    lines = ["From: <%s>" % sender, "To: <%s>" % to, "Subject: %s" % subject,
             "Message-ID: <%s@test.example>" % re.sub(r"[^A-Za-z0-9.-]", ".", subject)]
    lines += list(extra_headers)
    text = "\r\n".join(lines) + "\r\n\r\n" + body
    return text.encode("utf-8")


# --- the spool, read independently of mailgate.queue ----------------------------------------------

SPOOL_DIRS = ("tmp", "active", "deferred", "hold", "quarantine", "corrupt")
HEADER_RE = re.compile(rb"\AMGQ1 ([0-9]+) ([0-9]+) ([0-9a-f]{8})\n")


class BadEntry(AssertionError):
    pass


class Entry:
    def __init__(self, path, envelope, body, raw_size):
        self.path = path
        self.envelope = envelope
        self.body = body
        self.raw_size = raw_size

    @property
    def queue_id(self):
        return self.envelope["queue_id"]

    def message(self):
        return email.message_from_bytes(self.body, policy=email.policy.compat32)


def read_entry(path):
    """
    Parse and check one spool file: header line, lengths against the file size, the newline after
    the envelope JSON, crc32 of the body, queue_id == file name.  BadEntry for anything wrong.
    """
    with open(path, "rb") as f:
        data = f.read()
    match = HEADER_RE.match(data)
    if not match:
        raise BadEntry("%s: no valid MGQ1 header line: %r" % (path, data[:80]))
    json_len, body_len, crc = int(match.group(1)), int(match.group(2)), match.group(3).decode()
    json_start = match.end()
    json_end = json_start + json_len
    expected = json_end + 1 + body_len
    if expected != len(data):
        raise BadEntry("%s: header says %d bytes in all, file has %d (partial?)" % (path, expected, len(data)))
    if data[json_end:json_end + 1] != b"\n":
        raise BadEntry("%s: no newline after the envelope JSON" % (path,))
    body = data[json_end + 1:]
    actual = "%08x" % (zlib.crc32(body) & 0xFFFFFFFF)
    if actual != crc:
        raise BadEntry("%s: crc32 of body is %s, header says %s" % (path, actual, crc))
    try:
        envelope = json.loads(data[json_start:json_end].decode("utf-8"))
    except ValueError as e:
        raise BadEntry("%s: envelope is not JSON: %s" % (path, e))
    if not isinstance(envelope, dict) or envelope.get("queue_id") != os.path.basename(path):
        raise BadEntry("%s: envelope queue_id %r is not the file name"
                       % (path, envelope.get("queue_id") if isinstance(envelope, dict) else envelope))
    return Entry(path, envelope, body, len(data))


def spool_listing(spool):
    """{directory: sorted names} for every spool directory."""
    return {d: sorted(os.listdir(os.path.join(spool, d))) for d in SPOOL_DIRS
            if os.path.isdir(os.path.join(spool, d))}


# Where a message waits for delivery: accepted into active/, moved to deferred/ after a failed
# attempt (delivery never moves it back), removed when every recipient has an outcome.
QUEUED_DIRS = ("active", "deferred")


def queued_ids(spool):
    """The ids of every message waiting for delivery (active/ and deferred/).  active/ is listed
    first, so that a message moving to deferred/ meanwhile is seen in one or the other."""
    ids = set()
    for state in QUEUED_DIRS:
        directory = os.path.join(spool, state)
        if os.path.isdir(directory):
            ids.update(os.listdir(directory))
    return ids


def queued_state(spool, queue_id):
    """The directory (active or deferred) holding queue_id now, or None."""
    for _ in range(3):  # a move active -> deferred between the two checks: look again
        for state in QUEUED_DIRS:
            if os.path.lexists(os.path.join(spool, state, queue_id)):
                return state
    return None


def spool_entry(spool, queue_id, state=None):
    """
    The entry of queue_id, read from state (a spool directory) when given; by default from
    active/ or deferred/, wherever it is (it may move from one to the other while being looked for).
    """
    if state is not None:
        return read_entry(os.path.join(spool, state, queue_id))
    for _ in range(3):
        for where in QUEUED_DIRS:
            try:
                return read_entry(os.path.join(spool, where, queue_id))
            except FileNotFoundError:
                continue
    raise BadEntry("%s: in neither active/ nor deferred/ of %s: %s"
                   % (queue_id, spool, spool_listing(spool)))


def read_state(spool, queue_id):
    """The delivery state saved for queue_id (state/<id>, JSON), or None when there is none."""
    try:
        with open(os.path.join(spool, "state", queue_id), "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None


ENVELOPE_FIELDS = {"queue_id", "sender", "recipients", "client_ip", "client_port", "helo", "listener",
                   "user", "tls_version", "tls_cipher", "protocol", "received_at", "size", "body"}
