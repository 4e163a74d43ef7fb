"""
mailgate.processes: the channel's framing, what a receiver reports, and the main process's pool
(spawning, hearing, respawning, reload's generations) on a memory reactor with fake processes.
The real processes are tests/e2e/test_processes.py's.
"""

import json
import socket

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailgate.config import load_config_text
from mailgate.errors import ConfigError
from mailgate.events import EventBus
from mailgate.processes.channel import LineDecoder, encode
from mailgate.processes.pool import ReceiverPool, receiver_count
from mailgate.processes.receiver import Receiver


class ChannelTests(SynchronousTestCase):
    def test_lines_split_anywhere(self):
        data = encode({"t": "q", "id": "A", "s": "active"}) + encode({"t": "ready"})
        decoder = LineDecoder()
        out = []
        for i in range(len(data)):
            out += decoder.feed(data[i:i + 1])
        self.assertEqual(out, [{"t": "q", "id": "A", "s": "active"}, {"t": "ready"}])

    def test_garbage_is_dropped_and_counted(self):
        decoder = LineDecoder()
        self.assertEqual(decoder.feed(b"not json\n[1,2]\n" + encode({"t": "ready"})),
                         [{"t": "ready"}])
        self.assertEqual(decoder.dropped, 2)

    def test_unbounded_line_is_dropped(self):
        decoder = LineDecoder()
        decoder.feed(b"x" * (5 * 1024 * 1024))
        self.assertEqual(decoder.feed(encode({"t": "ready"})), [{"t": "ready"}])
        self.assertEqual(decoder.dropped, 1)

    def test_fields_that_are_not_json_are_sent_as_text(self):
        self.assertEqual(json.loads(encode({"f": {"x": object}})), {"f": {"x": str(object)}})


class FakeChannel:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


class ReceiverReportTests(SynchronousTestCase):
    def receiver(self, all_events=False):
        receiver = Receiver(MemoryReactorClock(), all_events, {})
        receiver.channel = FakeChannel()
        return receiver

    def protocol(self, event, data="", direction="in"):
        return {"event": event, "data": data, "direction": direction, "listener": "relay"}

    def test_summary_mode_sends_what_the_metrics_count(self):
        receiver = self.receiver()
        for event, data in (("connect", ""), ("command", "EHLO x"), ("reply", "250 ok"),
                            ("tls", "TLSv1.3 X"), ("reply", "421 4.4.2 timeout"),
                            ("disconnect", "")):
            receiver.observe("protocol", self.protocol(event, data))
        receiver.observe("tracking", {"event": "RECEIVE", "queue_id": "Q"})
        receiver.observe("dns", {"type": "TXT", "seconds": 0.1, "error": None})
        kinds = [(m["k"], m["f"].get("event")) for m in receiver.channel.sent]
        self.assertEqual(kinds, [("protocol", "connect"), ("protocol", "tls"),
                                 ("protocol", "reply"), ("protocol", "disconnect"),
                                 ("tracking", "RECEIVE"), ("dns", None)])

    def test_write_failures_are_sent(self):
        receiver = self.receiver()
        receiver.write_state("spool /q: the last write failed: No space left on device (ENOSPC)")
        self.assertEqual(receiver.channel.sent, [
            {"t": "w", "e": "spool /q: the last write failed: No space left on device (ENOSPC)"}])

    def test_all_mode_sends_everything(self):
        receiver = self.receiver(all_events=True)
        receiver.observe("protocol", self.protocol("command", "MAIL FROM:<a@b>"))
        self.assertEqual(len(receiver.channel.sent), 1)

    def test_counters_reported_and_applied(self):
        receiver = Receiver(MemoryReactorClock(), False, {})
        receiver.channel = FakeChannel()
        from mailgate.smtp.anvil import Anvil

        anvil = Anvil(receiver.reactor)
        receiver.gateway = type("G", (), {"anvil": anvil})()
        anvil.share(receiver.share)
        limits = type("L", (), {"max_connections": 2, "max_connections_per_ip": 0,
                                "connection_rate_per_ip": None})()
        receiver.counted("7", ["c", "192.0.2.1"])
        self.assertIsNone(anvil.connect("192.0.2.2", limits))
        self.assertEqual(anvil.connect("192.0.2.3", limits), "max_connections")
        self.assertEqual(receiver.channel.sent, [{"t": "anvil", "op": ["c", "192.0.2.2"]}])
        receiver.forget("7")
        self.assertIsNone(anvil.connect("192.0.2.3", limits))

    def test_commits_and_logs(self):
        from twisted.logger import LogLevel

        receiver = self.receiver()
        receiver.committed("Q1", "active")
        receiver.log({"log_level": LogLevel.debug, "log_format": "quiet"})
        receiver.log({"log_level": LogLevel.warn, "log_format": "careful {x}", "x": 1,
                      "log_namespace": "mailgate.smtp.server"})
        self.assertEqual(receiver.channel.sent, [
            {"t": "q", "id": "Q1", "s": "active"},
            {"t": "log", "lvl": "warn", "ns": "mailgate.smtp.server", "msg": "careful 1"}])

    def test_retire_waits_for_open_sessions(self):
        receiver = self.receiver()
        stopped = []
        receiver.reactor.stop = lambda: stopped.append(True)

        class Listening:
            stopped = False

            def stop_listening(self):
                self.stopped = True

        listening = Listening()
        receiver.gateway = type("G", (), {"listeners": lambda self: [listening], "running": False,
                                          "config": config()})()
        receiver.observe("protocol", self.protocol("connect"))
        receiver.retire()
        self.assertTrue(listening.stopped)
        self.assertIn({"t": "retired"}, receiver.channel.sent)
        receiver.reactor.advance(1)
        self.assertEqual(stopped, [])  # a session is open
        receiver.observe("protocol", self.protocol("disconnect"))
        receiver.reactor.advance(0)
        self.assertEqual(stopped, [True])


class FakeTransport:
    def __init__(self, proto):
        self.proto = proto
        self.written = []
        self.signals = []

    def write(self, data):
        self.written.append(data)

    def signalProcess(self, name):
        self.signals.append(name)

    def messages(self):
        return [json.loads(line) for chunk in self.written for line in chunk.splitlines()]


class ProcessReactor(MemoryReactorClock):
    def __init__(self):
        MemoryReactorClock.__init__(self)
        self.spawned = []

    def spawnProcess(self, proto, executable, args, env=None, path=None, uid=None, gid=None,
                     usePTY=False, childFDs=None):
        transport = FakeTransport(proto)
        proto.makeConnection(transport)
        self.spawned.append((proto, args, childFDs, env))
        return transport


class FakeQueue:
    def __init__(self):
        self.announced = []

    def announce(self, queue_id, state):
        if state not in ("active", "deferred", "hold", "quarantine"):
            raise ValueError(state)
        self.announced.append((queue_id, state))


class FakePort:
    def __init__(self, fd, family=socket.AF_INET):
        self._fd, self.addressFamily = fd, family

    def fileno(self):
        return self._fd


class FakeListening:
    def __init__(self, name, fd):
        self.listener = type("L", (), {"name": name})()
        self.port = FakePort(fd)


def config(hostname="mx.example.net", workers=2):
    return load_config_text(
        "[gateway]\nhostname = %s\nworkers = %s\n[queue]\npath = /var/spool/mailgate\n"
        "[listener:relay]\nendpoint = tcp:2525\nrole = relay\ntls = none\nauth = none\n"
        % (hostname, workers), "/etc/mailgate/mailgate.ini")


class FakeGateway:
    def __init__(self, reactor, workers=2):
        self.config = config(workers=workers)
        self.events = EventBus(reactor)
        self.queue = FakeQueue()
        self._listeners = [FakeListening("relay", 7), FakeListening("submission", 8)]

    def listeners(self):
        return self._listeners


def say(proto, *messages):
    data = b"".join(encode(m) for m in messages)
    proto.childDataReceived(3, data[:5])
    proto.childDataReceived(3, data[5:])


class PoolTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ProcessReactor()
        self.gateway = FakeGateway(self.reactor)
        self.pool = ReceiverPool(self.gateway, self.reactor, 2, executable="/usr/bin/python3")

    def start(self):
        self.pool.startService()
        self.addCleanup(lambda: self.pool.running and self.pool.stopService())
        return [proto for proto, _, _, _ in self.reactor.spawned]

    def test_receiver_count(self):
        self.assertEqual(receiver_count(self.gateway.config), 2)
        one = FakeGateway(self.reactor, workers=1).config
        self.assertEqual(receiver_count(one), 0)

    def test_spawns_with_the_sockets_and_sends_the_running_config(self):
        protos = self.start()
        self.assertEqual(len(protos), 2)
        _, args, child_fds, env = self.reactor.spawned[0]
        self.assertEqual(args[:3], ["/usr/bin/python3", "-m", "mailgate.processes.receiver"])
        self.assertIn("--listen", args)
        self.assertIn("relay=7:%d" % socket.AF_INET, args)
        self.assertEqual({k: v for k, v in child_fds.items() if k > 3}, {7: 7, 8: 8})
        self.assertEqual(child_fds[3], "r")
        first = protos[0].transport.messages()[0]
        self.assertEqual(first["t"], "config")
        self.assertEqual(first["path"], "/etc/mailgate/mailgate.ini")
        self.assertIn("hostname = mx.example.net", first["ini"])

    def test_what_receivers_say_lands_in_the_main_process(self):
        seen = []
        self.gateway.events.subscribe(lambda kind, fields: seen.append((kind, fields)))
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        proto = self.start()[0]
        say(proto, {"t": "ev", "k": "tracking", "f": {"event": "RECEIVE", "time": 5.0}},
            {"t": "q", "id": "Q1", "s": "active"}, {"t": "q", "id": "Q2", "s": "bogus"},
            {"t": "log", "lvl": "warn", "ns": "mailgate.smtp.server", "msg": "hello"})
        self.assertEqual(seen, [("tracking", {"event": "RECEIVE", "time": 5.0})])
        self.assertEqual(self.gateway.queue.announced, [("Q1", "active")])
        mine = [e for e in logged if e.get("log_namespace") == "mailgate.smtp.server"]
        self.assertEqual([(e["log_level"].name, e["msg"], e["receiver"]) for e in mine],
                         [("warn", "hello", 0)])

    def test_counters_are_shared_and_a_new_receiver_learns_the_open_connections(self):
        """
        mailgate.smtp.anvil across processes: each receiver's change goes to the others (not back
        to itself); a receiver that ends is forgotten by the others; one started later is told
        the connections still open on the others.
        """
        protos = self.start()
        for proto in protos:
            say(proto, {"t": "ready"})
            del proto.transport.written[:]
        say(protos[0], {"t": "anvil", "op": ["c", "192.0.2.1"]},
            {"t": "anvil", "op": ["c", "192.0.2.1"]}, {"t": "anvil", "op": ["d", "192.0.2.1"]},
            {"t": "anvil", "op": ["t", "message_rate_per_ip", "192.0.2.1", 5, 60.0, 1]})
        say(protos[1], {"t": "anvil", "op": ["c", "192.0.2.9"]})
        first, second = protos[0].origin, protos[1].origin
        self.assertNotEqual(first, second)
        self.assertEqual([m["op"][0] for m in protos[1].transport.messages()], ["c", "c", "d", "t"])
        self.assertEqual({m["o"] for m in protos[1].transport.messages()}, {first})
        self.assertEqual(protos[0].transport.messages(),
                         [{"t": "anvil", "o": second, "op": ["c", "192.0.2.9"]}])
        del protos[0].transport.written[:]
        protos[1].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(protos[0].transport.messages(), [{"t": "anvil-gone", "o": second}])
        self.reactor.advance(1)
        again = self.reactor.spawned[2][0]
        config = again.transport.messages()[0]
        self.assertEqual(config["anvil"], {first: {"192.0.2.1": 1}})
        self.assertNotEqual(again.origin, second)

    def test_health_until_all_accept(self):
        protos = self.start()
        self.assertEqual(self.pool.problems(), ["receivers: 0 of 2 accepting"])
        say(protos[0], {"t": "ready"})
        say(protos[1], {"t": "ready"})
        self.assertEqual(self.pool.problems(), [])

    def test_health_says_a_receivers_message_write_failed_until_one_works(self):
        # The main process's own probe may find a page free that a message does not fit in.
        protos = self.start()
        for proto in protos:
            say(proto, {"t": "ready"})
        why = "spool /q: the last write failed: No space left on device (ENOSPC)"
        say(protos[0], {"t": "w", "e": why})
        say(protos[1], {"t": "w", "e": why})
        self.assertEqual(self.pool.problems(), ["queue not writable: " + why])
        say(protos[0], {"t": "q", "id": "A", "s": "active"})  # the other one commits one
        self.assertEqual(self.pool.problems(), [])

    def test_a_dead_receiver_is_started_again_with_backoff(self):
        protos = self.start()
        for proto in protos:
            say(proto, {"t": "ready"})
        protos[1].processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.pool.problems(), ["receivers: 1 of 2 accepting"])
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 3)
        again = self.reactor.spawned[2][0]
        self.assertEqual(again.index, 1)
        again.processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.reactor.advance(1.5)
        self.assertEqual(len(self.reactor.spawned), 3)  # the next wait is 2 s
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_reload_new_generation_then_retire_the_old(self):
        old = self.start()
        for proto in old:
            say(proto, {"t": "ready"})
        prepared = self.pool.prepare(config(hostname="new.example.net"), {"relay": (9, socket.AF_INET)})
        new = [proto for proto, _, _, _ in self.reactor.spawned[2:]]
        self.assertEqual(len(new), 2)
        self.assertIn("hostname = new.example.net", new[0].transport.messages()[0]["ini"])
        self.assertNoResult(prepared)
        for proto in new:
            say(proto, {"t": "ready"})
        self.successResultOf(prepared)
        committed = self.pool.commit()
        for proto in old:
            self.assertIn({"t": "retire"}, proto.transport.messages())
        self.assertNoResult(committed)
        say(old[0], {"t": "retired"})
        old[1].processEnded(Failure(ProcessDone(0)))
        self.successResultOf(committed)
        self.assertEqual(self.pool.current, new)
        # A retired receiver that ends is not started again.
        old[0].processEnded(Failure(ProcessDone(0)))
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_reload_refused_when_a_new_receiver_cannot_start(self):
        old = self.start()
        for proto in old:
            say(proto, {"t": "ready"})
        prepared = self.pool.prepare(self.gateway.config, {})
        new = [proto for proto, _, _, _ in self.reactor.spawned[2:]]
        say(new[0], {"t": "fatal", "error": "/etc/mailgate/mailgate.ini: [tls] certificate: gone"})
        failure = self.failureResultOf(prepared, ConfigError)
        self.assertEqual(str(failure.value), "/etc/mailgate/mailgate.ini: [tls] certificate: gone")
        self.assertEqual(self.pool.current, old)
        self.assertIn({"t": "stop"}, new[1].transport.messages())

    def test_stop_tells_everyone_and_kills_the_stubborn(self):
        protos = self.start()
        d = self.pool.stopService()
        for proto in protos:
            self.assertIn({"t": "stop"}, proto.transport.messages())
        protos[0].processEnded(Failure(ProcessDone(0)))
        self.assertNoResult(d)
        self.reactor.advance(10)
        self.assertEqual(protos[1].transport.signals, ["KILL"])
        protos[1].processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)  # stopped: no respawn
