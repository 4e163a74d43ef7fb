"""
mailgate.ops.logs: protocol.log and tracking.log as JSON Lines, written off the reactor thread.

Most tests use a Clock and the synchronous writer seam (threaded=False: flush() does what the
writer thread does); the writer thread itself is tested with the real reactor.  gateway_day()
runs a whole day of one gateway (a real SMTPFactory session with TLS, AUTH, a refusal and two
messages, then the scheduler delivering them over real sockets to a sink, one of them deferred
once) into a log directory; tests/ops/test_trace.py reads the same logs back.
"""

import base64
import datetime
import json
import os
import threading
import time
import types

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgate.config import (DeliveryConfig, GatewayConfig, Limits, LoggingConfig, RouteConfig,
                             TLSConfig)
from mailgate.delivery.client import Deliverer
from mailgate.envelope import Hop
from mailgate.events import EventBus
from mailgate.ops.logs import LogFile, LogService, encode, iso_time, log_files, rotated_name
from mailgate.delivery.scheduler import DeliveryService
from tests.sinks import Sink
from tests.smtphelp import MemoryQueue, Session, listener
from tests.tlsutil import make_ca

START = 1795909581.0  # 2026-11-28T23:46:21Z
ISO = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"
DAY = 86400.0


def read(path):
    """The JSON objects of a log file, checking that every line is one."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw.endswith(b"\n") or not raw
    return [json.loads(line) for line in raw.decode("ascii").splitlines()]


def utc(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


class TickingClock(Clock):
    """A Clock whose every reading is a millisecond later: no two events share a time."""

    def seconds(self):
        self.rightNow += 0.001
        return self.rightNow


class Logs:
    """A LogService on a Clock with the synchronous writer, in a fresh directory."""

    def __init__(self, testcase, max_size=1024 * 1024, retention_days=30, max_queue=100000,
                 directory=None, clock=None):
        self.dir = directory or os.path.abspath(testcase.mktemp())
        self.clock = clock or Clock()
        if clock is None:
            self.clock.advance(START)
        self.bus = EventBus(self.clock)
        config = LoggingConfig(dir=self.dir, max_size=max_size, retention_days=retention_days)
        self.service = LogService(config, self.clock, self.bus, max_queue=max_queue,
                                  threaded=False)

    def start(self):
        self.service.startService()
        return self

    def path(self, kind="protocol"):
        return os.path.join(self.dir, kind + ".log")

    def protocol(self, n, **fields):
        values = dict(session="s%d" % n, listener="relay", direction="in", local="10.0.0.1:25",
                      remote="192.0.2.10:40000", event="command", data="NOOP %d" % n)
        values.update(fields)
        self.bus.emit("protocol", **values)


# --- lines ---------------------------------------------------------------------------------------


class LineTests(SynchronousTestCase):
    def test_iso_time(self):
        self.assertEqual(iso_time(START + 0.705), "2026-11-28T23:46:21.705Z")
        self.assertEqual(iso_time(START), "2026-11-28T23:46:21.000Z")
        self.assertEqual(iso_time(START + 0.9999), "2026-11-28T23:46:22.000Z")
        self.assertEqual(iso_time(0), "1970-01-01T00:00:00.000Z")

    def test_encode(self):
        line = encode({"event": "RECEIVE", "queue_id": "Q1", "user": None, "time": START + 0.5,
                       "recipients": ["a@b.example"], "subject": "caf\u00e9\n", "raw": b"x\xff"})
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        line.decode("ascii")
        self.assertTrue(line.startswith(b'{"time":"2026-11-28T23:46:21.500Z",'))
        record = json.loads(line)
        self.assertEqual(list(record), ["time", "event", "queue_id", "recipients", "subject",
                                        "raw"])
        self.assertEqual(record["subject"], "caf\u00e9\n")
        self.assertEqual(record["raw"], "x\ufffd")
        self.assertNotIn("user", record)

    def test_rotated_name(self):
        self.assertEqual(rotated_name("protocol", START + 0.9), "protocol.log.20261128T234621")


# --- the service, synchronous writer ----------------------------------------------------------


class ServiceTests(SynchronousTestCase):
    def test_lines(self):
        logs = Logs(self).start()
        self.assertTrue(os.path.isdir(logs.dir))
        logs.protocol(1)
        logs.clock.advance(0.25)
        logs.bus.track("RECEIVE", queue_id="Q1", sender="a@x.example", recipients=["b@y.example"],
                       size=120, user=None, verdicts=[["spf", "pass"]], latency=0.012)
        logs.bus.emit("metrics", value=1)  # not ours
        logs.service.flush()
        [protocol] = read(logs.path("protocol"))
        [tracking] = read(logs.path("tracking"))
        self.assertEqual(protocol, {
            "time": "2026-11-28T23:46:21.000Z", "session": "s1", "listener": "relay",
            "direction": "in", "local": "10.0.0.1:25", "remote": "192.0.2.10:40000",
            "event": "command", "data": "NOOP 1"})
        self.assertEqual(list(protocol)[0], "time")
        self.assertEqual(tracking, {
            "time": "2026-11-28T23:46:21.250Z", "event": "RECEIVE", "queue_id": "Q1",
            "sender": "a@x.example", "recipients": ["b@y.example"], "size": 120,
            "verdicts": [["spf", "pass"]], "latency": 0.012})
        self.assertEqual(sorted(os.listdir(logs.dir)), ["protocol.log", "tracking.log"])

    def test_the_observer_never_writes(self):
        logs = Logs(self).start()
        for n in range(100):
            logs.protocol(n)
        self.assertFalse(os.path.exists(logs.path()))  # only queued
        logs.service.flush()
        self.assertEqual([r["data"] for r in read(logs.path())],
                         ["NOOP %d" % n for n in range(100)])

    def test_appends_to_an_existing_log(self):
        logs = Logs(self)
        os.makedirs(logs.dir)
        with open(logs.path(), "wb") as f:
            f.write(encode({"time": START - 10, "event": "connect"}))
        logs.start()
        logs.protocol(1)
        logs.service.flush()
        self.assertEqual([r["event"] for r in read(logs.path())], ["connect", "command"])

    def test_rotation_by_size(self):
        line = len(encode(dict(time=START, session="s1", listener="relay", direction="in",
                               local="10.0.0.1:25", remote="192.0.2.10:40000", event="command",
                               data="NOOP 1")))
        logs = Logs(self, max_size=3 * line + 10).start()
        for n in range(10):
            logs.protocol(n % 10)
            logs.clock.advance(1)
        logs.service.flush()
        files = log_files(logs.dir, "protocol")
        self.assertEqual([os.path.basename(p) for _, _, p in files], [
            "protocol.log.20261128T234624", "protocol.log.20261128T234627",
            "protocol.log.20261128T234630", "protocol.log"])
        self.assertEqual(files[0][0], None)
        self.assertEqual(files[1][0], files[0][1])
        self.assertEqual(files[-1][1], None)
        data = []
        for _, _, path in files:
            self.assertLessEqual(os.path.getsize(path), 3 * line + 10)
            data += [r["data"] for r in read(path)]
        self.assertEqual(data, ["NOOP %d" % n for n in range(10)])  # nothing lost, in order
        self.assertFalse(os.path.exists(logs.path("tracking")))  # each file on its own

    def test_rotation_twice_in_one_second(self):
        logs = Logs(self, max_size=200).start()
        for n in range(5):
            logs.protocol(n)
        logs.service.flush()
        names = [os.path.basename(p) for _, _, p in log_files(logs.dir, "protocol")]
        self.assertEqual(names, ["protocol.log.20261128T234621", "protocol.log.20261128T234621-1",
                                 "protocol.log.20261128T234621-2",
                                 "protocol.log.20261128T234621-3", "protocol.log"])

    def test_rotation_at_midnight(self):
        logs = Logs(self).start()
        midnight = (START // DAY + 1) * DAY
        logs.clock.advance(midnight - 1.5 - START)
        logs.protocol(1)
        logs.service.flush()
        logs.clock.advance(1)
        logs.protocol(2)  # 23:59:59.5, same day
        logs.clock.advance(3)
        logs.protocol(3)  # the first line of the next day: rotation
        logs.protocol(4)
        logs.service.flush()
        rotated = os.path.join(logs.dir, "protocol.log.20261129T000002")
        self.assertEqual([r["data"] for r in read(rotated)], ["NOOP 1", "NOOP 2"])
        self.assertEqual([r["data"] for r in read(logs.path())], ["NOOP 3", "NOOP 4"])
        self.assertEqual(read(logs.path())[0]["time"], "2026-11-29T00:00:02.500Z")

    def test_rotation_at_midnight_within_one_batch(self):
        logs = Logs(self).start()
        logs.clock.advance((START // DAY + 1) * DAY - 1 - START)
        logs.protocol(1)
        logs.clock.advance(2)
        logs.protocol(2)
        logs.service.flush()
        self.assertEqual(len(log_files(logs.dir, "protocol")), 2)
        self.assertEqual([r["data"] for r in read(logs.path())], ["NOOP 2"])

    def test_yesterdays_log_is_rotated_at_the_first_write(self):
        logs = Logs(self)
        os.makedirs(logs.dir)
        with open(logs.path(), "wb") as f:
            f.write(encode({"time": START - DAY, "event": "connect"}))
        os.utime(logs.path(), (START - DAY, START - DAY))
        logs.start()
        logs.protocol(1)
        logs.service.flush()
        self.assertEqual([os.path.basename(p) for _, _, p in log_files(logs.dir, "protocol")],
                         ["protocol.log.20261128T234621", "protocol.log"])
        self.assertEqual([r["data"] for r in read(logs.path())], ["NOOP 1"])

    def make_rotated(self, directory, ages):
        os.makedirs(directory, exist_ok=True)
        for kind in ("protocol", "tracking"):
            for age in ages:
                with open(os.path.join(directory, rotated_name(kind, START - age)), "wb") as f:
                    f.write(b"{}\n")
        with open(os.path.join(directory, "unrelated.log.20200101T000000"), "wb") as f:
            f.write(b"kept\n")

    def test_retention_at_start(self):
        logs = Logs(self, retention_days=7)
        self.make_rotated(logs.dir, [8 * DAY, 7 * DAY + 1, 7 * DAY - 1, 3600])
        logs.start()
        self.assertEqual(sorted(os.listdir(logs.dir)), [
            "protocol.log.20261121T234622", "protocol.log.20261128T224621",
            "tracking.log.20261121T234622", "tracking.log.20261128T224621",
            "unrelated.log.20200101T000000"])

    def test_retention_at_rotation(self):
        logs = Logs(self, retention_days=7, max_size=100)
        self.make_rotated(logs.dir, [6 * DAY])
        logs.start()
        logs.clock.advance(DAY + 1)  # the file of 6 days ago is 7 days old now
        logs.protocol(1)
        logs.protocol(2)  # past max_size: rotation, and retention
        logs.service.flush()
        names = sorted(os.listdir(logs.dir))
        self.assertNotIn(rotated_name("protocol", START - 6 * DAY), names)
        self.assertIn(rotated_name("tracking", START - 6 * DAY), names)  # its own rotation: later
        self.assertIn(rotated_name("protocol", START + DAY + 1), names)

    def test_full_queue_drops_and_never_blocks(self):
        logs = Logs(self, max_queue=3).start()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for n in range(5):
            logs.protocol(n)
        self.assertEqual(logs.service.dropped, 2)
        full = [e for e in logged if "queue full" in e["log_format"]]
        self.assertEqual(len(full), 1)  # said once, not once per line
        logs.service.flush()
        logs.protocol(5)  # accepted again: the count is reported
        dropped = [e for e in logged if e.get("count") == 2]
        self.assertEqual(len(dropped), 1)
        logs.service.flush()
        self.assertEqual([r["data"] for r in read(logs.path())],
                         ["NOOP 0", "NOOP 1", "NOOP 2", "NOOP 5"])

    def test_write_error_loses_lines_but_goes_on(self):
        logs = Logs(self)
        os.makedirs(logs.path())  # protocol.log is a directory: cannot be opened
        logs.start()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        logs.protocol(1)
        logs.bus.track("RECEIVE", queue_id="Q1")
        logs.service.flush()
        self.assertEqual(logs.service.lost, 1)
        self.assertEqual([r["queue_id"] for r in read(logs.path("tracking"))], ["Q1"])
        [error] = [e for e in logged if "cannot write" in e["log_format"]]
        self.assertEqual(error["path"], logs.path())

    def test_stop_drains_and_unsubscribes(self):
        logs = Logs(self).start()
        for n in range(3):
            logs.protocol(n)
        d = logs.service.stopService()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(read(logs.path())), 3)
        logs.protocol(4)  # after stop: not ours any more
        logs.service.flush()
        self.assertEqual(len(read(logs.path())), 3)


# --- the writer thread -------------------------------------------------------------------------


class WriterThreadTests(TestCase):
    timeout = 30

    def service(self, **kw):
        directory = os.path.abspath(self.mktemp())
        clock = Clock()
        clock.advance(START)
        bus = EventBus(clock)
        service = LogService(LoggingConfig(dir=directory, **kw), reactor, bus, max_queue=1000)
        return service, bus, directory

    @defer.inlineCallbacks
    def test_stop_drains(self):
        service, bus, directory = self.service()
        service.startService()
        for n in range(500):
            bus.emit("protocol", session="s", event="command", data="NOOP %d" % n)
            bus.track("RECEIVE", queue_id="Q%d" % n)
        yield service.stopService()
        service._thread.join(10)  # it fired the Deferred as its last act
        self.assertFalse(service._thread.is_alive())
        protocol = read(os.path.join(directory, "protocol.log"))
        tracking = read(os.path.join(directory, "tracking.log"))
        self.assertEqual([r["data"] for r in protocol], ["NOOP %d" % n for n in range(500)])
        self.assertEqual([r["queue_id"] for r in tracking], ["Q%d" % n for n in range(500)])

    @defer.inlineCallbacks
    def test_a_stuck_disk_never_blocks_the_reactor(self):
        service, bus, directory = self.service()
        release = threading.Event()
        original = LogFile.write

        def slow(self, entries):
            release.wait(20)
            original(self, entries)

        self.patch(LogFile, "write", slow)
        service.startService()
        began = time.monotonic()
        for n in range(3000):
            bus.emit("protocol", session="s", event="command", data="NOOP %d" % n)
        self.assertLess(time.monotonic() - began, 5)  # the writer waits; emit did not
        self.assertGreaterEqual(service.dropped, 1000)
        release.set()
        yield service.stopService()
        lines = read(os.path.join(directory, "protocol.log"))
        self.assertEqual(len(lines) + service.dropped, 3000)
        self.assertEqual(lines[0]["data"], "NOOP 0")


# --- one day of a gateway ----------------------------------------------------------------------


ALICE = "alice@example.com"
MESSAGE_1 = (b"From: <alice@example.com>\r\nTo: <bob@example.org>\r\n"
             b"Message-ID: <m1.2026@example.com>\r\nSubject: one\r\n\r\n"
             b"Hello Bob, secret plans.\r\n")
MESSAGE_2 = (b"From: <alice@example.com>\r\nTo: <carol@example.org>\r\n"
             b"Message-ID: <m2.2026@example.com>\r\nSubject: two\r\n\r\nHello Carol.\r\n")


class _FakeTLS:
    def get_protocol_version_name(self):
        return "TLSv1.3"

    def get_cipher_name(self):
        return "TLS_AES_256_GCM_SHA384"


class _Router:
    def __init__(self, route, port):
        self.route, self.port = route, port

    def route_for(self, domain):
        return self.route

    def hops(self, route, domain):
        return defer.succeed([Hop("sink.test", "127.0.0.1", self.port)])


def _b64(text):
    return base64.b64encode(text.encode()).decode()


@defer.inlineCallbacks
def gateway_day(testcase):
    """
    Into a fresh log directory: one inbound session (TLS, a refused AUTH, AUTH, a refused MAIL,
    two messages Q0001 to bob and Q0002 to carol), then delivery over TLS with AUTH to a sink:
    Q0002 delivered, Q0001 deferred (451 on its connection), then delivered 61 s later.
    -> dict(dir, session (the inbound one), sink).
    """
    ca = make_ca(testcase.mktemp())
    cert, key = ca.issue("127.0.0.1", testcase.mktemp())
    sink = Sink(starttls=True, cert=cert, key=key, auth=("relay", "s3cret"),
                per_connection=[{}, {"rcpt": {"bob@example.org": (451, "4.2.0 Mailbox busy")}}])
    sink.start()
    testcase.addCleanup(sink.stop)
    clock = TickingClock()
    clock.advance(START)
    logs = Logs(testcase, clock=clock).start()
    queue = MemoryQueue()

    # No delay on the failed AUTH: the day's timeline below is second by second.
    s = Session(listener(limits=Limits(auth_failure_delay=0.0)), events=logs.bus, clock=clock,
                queue=queue)
    s.transport.getHandle = _FakeTLS
    assert s.read().startswith("220 ")
    clock.advance(1)
    s.cmd("EHLO client.example")
    s.start_tls()
    clock.advance(1)
    assert s.cmd("AUTH PLAIN " + _b64("\0%s\0wrong" % ALICE)).startswith("535")
    assert s.cmd("AUTH LOGIN").startswith("334")
    s.cmd(_b64(ALICE))
    assert s.cmd(_b64("secret")).startswith("235")
    clock.advance(1)
    assert s.cmd("MAIL FROM:<mallory@other.test>").startswith("553")
    for message, rcpt in ((MESSAGE_1, "bob@example.org"), (MESSAGE_2, "carol@example.org")):
        clock.advance(1)
        assert s.cmd("MAIL FROM:<%s>" % ALICE).startswith("250")
        assert s.cmd("RCPT TO:<%s>" % rcpt).startswith("250")
        assert s.cmd("DATA").startswith("354")
        s.send(message + b".\r\n")
        assert s.read().startswith("250 2.0.0 Ok: queued as Q000")
    clock.advance(1)
    s.cmd("QUIT")
    s.proto.connectionLost(None)
    session = s.proto.session.id

    route = RouteConfig(name="smarthost", domains=("*",), tls="required", username="relay",
                        password="s3cret")
    config = types.SimpleNamespace(delivery=DeliveryConfig(retry=(60.0,), delay_warning=0.0),
                                   gateway=GatewayConfig(hostname="mx.example.net"))
    deliverer = Deliverer(reactor, "mx.example.net",
                          DeliveryConfig(connect_timeout=5.0, command_timeout=5.0,
                                         connection_cache_time=0.0),  # a connection a message
                          TLSConfig(),
                          events=logs.bus)
    scheduler = DeliveryService(queue, _Router(route, sink.port), deliverer, config, clock,
                                lambda: "DSN1", events=logs.bus)
    clock.advance(5)
    yield scheduler.wake("Q0002")
    clock.advance(5)
    yield scheduler.wake("Q0001")
    assert "Q0001" in queue.messages
    clock.advance(61)
    yield scheduler.wake("Q0001")
    assert not queue.messages
    yield logs.service.stopService()
    return dict(dir=logs.dir, session=session, sink=sink)


class GatewayDayTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_logs_field_by_field(self):
        day = yield gateway_day(self)
        directory, session = day["dir"], day["session"]
        self.assertEqual(len(day["sink"].messages), 2)
        tracking = read(os.path.join(directory, "tracking.log"))
        protocol = read(os.path.join(directory, "protocol.log"))
        for record in tracking + protocol:
            self.assertRegex(record["time"], ISO)
            self.assertEqual(list(record)[0], "time")
            self.assertNotIn(None, record.values())
        times = [r["time"] for r in protocol]
        self.assertEqual(times, sorted(times))

        self.assertEqual([(r["event"], r.get("queue_id")) for r in tracking], [
            ("AUTH_FAIL", None), ("REJECT", None), ("RECEIVE", "Q0001"), ("RECEIVE", "Q0002"),
            ("DELIVER", "Q0002"), ("DEFER", "Q0001"), ("DELIVER", "Q0001")])
        auth_fail, reject, receive = tracking[:3]
        self.assertEqual(auth_fail["user_attempted"], ALICE)
        self.assertEqual(auth_fail["session"], session)
        self.assertEqual(auth_fail["client"], "192.0.2.10")
        self.assertEqual(auth_fail["listener"], "test")
        self.assertNotIn("user", auth_fail)
        self.assertEqual(reject["stage"], "MAIL")
        self.assertEqual(reject["sender"], "mallory@other.test")  # the refused sender
        self.assertEqual(reject["user"], ALICE)
        self.assertTrue(reject["reply"].startswith("553 5.7.1 Sender address rejected"))
        self.assertEqual(receive["message_id"], "<m1.2026@example.com>")
        self.assertEqual(receive["sender"], ALICE)
        self.assertEqual(receive["recipients"], ["bob@example.org"])
        self.assertEqual(receive["user"], ALICE)
        self.assertEqual(receive["session"], session)
        self.assertEqual(receive["tls"], "TLSv1.3")
        self.assertEqual(receive["verdicts"], [])
        self.assertGreater(receive["size"], len(MESSAGE_1))  # with our Received header
        self.assertIsInstance(receive["latency"], float)
        defer_, deliver = tracking[5:]
        self.assertEqual(defer_["route"], "smarthost")
        self.assertEqual(defer_["recipients"], ["bob@example.org"])
        self.assertEqual(defer_["reply"], "451 4.2.0 Mailbox busy")
        self.assertEqual(defer_["remote_host"], "sink.test")
        self.assertRegex(deliver["tls"], r"^TLSv1\.[23]$")
        self.assertEqual(deliver["message_id"], "<m1.2026@example.com>")

        inbound = [r for r in protocol if r["direction"] == "in"]
        self.assertEqual({r["session"] for r in inbound}, {session})
        self.assertEqual({r["listener"] for r in inbound}, {"test"})
        self.assertEqual({r["remote"] for r in inbound}, {"192.0.2.10:40000"})
        self.assertNotIn("route", inbound[0])
        steps = [(r["event"], r["data"]) for r in inbound]
        self.assertEqual(steps[0], ("connect", ""))
        self.assertEqual(steps[-1], ("disconnect", ""))
        self.assertIn(("tls", "TLSv1.3 TLS_AES_256_GCM_SHA384"), steps)
        commands = [d for e, d in steps if e == "command"]
        self.assertEqual(commands[:7], ["EHLO client.example", "STARTTLS", "EHLO client.example",
                                        "AUTH PLAIN ****", "AUTH LOGIN", "****", "****"])
        self.assertIn(("reply", "553 5.7.1 Sender address rejected: <mallory@other.test> not"
                                " owned by user alice@example.com"), steps)
        self.assertIn(("reply", "250 2.0.0 Ok: queued as Q0001"), steps)

        outbound = [r for r in protocol if r["direction"] == "out"]
        sessions = list(dict.fromkeys(r["session"] for r in outbound))
        self.assertEqual(len(sessions), 3)
        self.assertNotIn(session, sessions)
        for r in outbound:
            self.assertEqual(r["route"], "smarthost")
            self.assertEqual(r["remote"], "127.0.0.1:%d" % day["sink"].port)
            self.assertNotIn("listener", r)
        connects = [r for r in outbound if r["event"] == "connect"]
        self.assertEqual([r.get("message_id") for r in connects],
                         ["<m2.2026@example.com>", "<m1.2026@example.com>",
                          "<m1.2026@example.com>"])
        out_commands = [r["data"] for r in outbound if r["event"] == "command"]
        self.assertEqual(out_commands.count("AUTH PLAIN ****"), 3)
        self.assertIn("RCPT TO:<bob@example.org>", out_commands)
        self.assertIn("451 4.2.0 Mailbox busy", [r["data"] for r in outbound])

        everything = b"".join(open(os.path.join(directory, name), "rb").read()
                              for name in os.listdir(directory))
        for secret in (b"s3cret", b"wrong", _b64("secret").encode(), _b64("s3cret").encode(),
                       b"Hello Bob", b"Hello Carol", b"Subject: one"):
            self.assertNotIn(secret, everything)
