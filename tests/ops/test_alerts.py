"""
mailgate.ops.alerts: each alert fires and clears exactly once per crossing on a Clock, with its log
event, its gauge and its command (a fake spawn); and once with a real /bin/sh on the real reactor.
"""

import os

from twisted.internet import defer, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailgate.ops.alerts import Alerts, format_value
from mailgate.config import AlertsConfig
from mailgate.envelope import Envelope
from mailgate.events import EventBus
from mailgate.ops.metrics import Metrics

from tests.smtphelp import MemoryQueue

T0 = 1_700_000_000


class FakeSpawn:
    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def __call__(self, protocol, executable, args=(), env=None, **kw):
        if self.fail:
            raise OSError(2, "No such file or directory")
        self.calls.append((protocol, executable, list(args), dict(env)))


def entry(queue_id, received_at):
    return Envelope(queue_id=queue_id, sender="a@remote.example", recipients=("u@example.com",),
                    client_ip="192.0.2.10", received_at=received_at)


class AlertCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.bus = EventBus(self.clock)
        self.metrics = Metrics(self.bus, self.clock)
        self.queue = MemoryQueue()
        self.spawn = FakeSpawn()
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self._ids = iter(range(1, 100000))

    def alerts(self, command="notify", **thresholds):
        config = AlertsConfig(interval=30.0, command=command, **thresholds)
        alerts = Alerts(config, self.clock, self.metrics, self.queue, spawn=self.spawn)
        alerts.start()
        self.addCleanup(alerts.stop)
        return alerts

    def add(self, n, state="active", age=0):
        ids = []
        for _ in range(n):
            queue_id = "Q%05d" % next(self._ids)
            self.queue.enqueue(entry(queue_id, self.clock.seconds() - age), b"x", state=state)
            ids.append(queue_id)
        return ids

    def tick(self, times=1):
        for _ in range(times):
            self.clock.advance(30)

    def alert_logs(self):
        return [(e["alert"], e["state"], e["log_level"]) for e in self.log
                if e.get("log_namespace") == "mailgate.ops.alerts" and "alert" in e and "state" in e
                and "alert_value" in e]

    def envs(self):
        return [(env["MAILGATE_ALERT"], env["MAILGATE_ALERT_STATE"], env["MAILGATE_ALERT_VALUE"],
                 env["MAILGATE_ALERT_THRESHOLD"]) for _, _, _, env in self.spawn.calls]

    def gauge(self, name):
        return self.metrics.registry.get_sample_value("mailgate_alert_active", {"alert": name})


class QueueSizeTests(AlertCase):
    def test_fires_once_and_clears_once(self):
        self.alerts(queue_size=5)
        self.assertEqual(self.gauge("queue_size"), 0)
        ids = self.add(4)
        self.tick()
        self.assertEqual(self.alert_logs(), [])
        ids += self.add(2, state="hold")
        self.tick(3)
        self.assertEqual(self.alert_logs(), [("queue_size", "firing", LogLevel.warn)])
        self.assertEqual(self.gauge("queue_size"), 1)
        for queue_id in ids[:3]:
            self.queue.remove(queue_id)
        self.tick(3)
        self.assertEqual(self.alert_logs(), [("queue_size", "firing", LogLevel.warn),
                                             ("queue_size", "cleared", LogLevel.warn)])
        self.assertEqual(self.gauge("queue_size"), 0)
        self.assertEqual(self.envs(), [("queue_size", "firing", "6", "5"), ("queue_size", "cleared", "3", "5")])

    def test_command_environment(self):
        self.alerts(command="echo $MAILGATE_ALERT >> /tmp/alerts", queue_size=1)
        self.add(1)
        self.tick()
        ((protocol, executable, args, env),) = self.spawn.calls
        self.assertEqual(executable, "/bin/sh")
        self.assertEqual(args, ["/bin/sh", "-c", "echo $MAILGATE_ALERT >> /tmp/alerts"])
        self.assertEqual(env, {"MAILGATE_ALERT": "queue_size", "MAILGATE_ALERT_STATE": "firing",
                               "MAILGATE_ALERT_VALUE": "1", "MAILGATE_ALERT_THRESHOLD": "1",
                               "PATH": os.environ.get("PATH") or os.defpath})

    def test_no_command_no_spawn(self):
        self.alerts(command=None, queue_size=1)
        self.add(1)
        self.tick()
        self.assertEqual(self.spawn.calls, [])
        self.assertEqual(len(self.alert_logs()), 1)

    def test_queue_gauges_refreshed_by_the_check(self):
        self.alerts(queue_size=100)
        self.add(3, state="deferred")
        self.tick()
        self.assertEqual(self.metrics.registry.get_sample_value(
            "mailgate_queue_messages", {"state": "deferred"}), 3)


class OtherAlertTests(AlertCase):
    def test_oldest_message_age_ignores_held_and_quarantined(self):
        self.alerts(oldest_message_age=3600)
        self.add(1, state="quarantine", age=86400)
        self.add(1, state="hold", age=86400)
        self.add(1, state="deferred", age=600)
        self.tick()
        self.assertEqual(self.alert_logs(), [])
        self.tick(100)  # 50 minutes later: 600 + 3000 s
        self.assertEqual(self.envs(), [("oldest_message_age", "firing", "3600", "3600")])
        self.queue.messages.clear()
        self.queue.where.clear()
        self.tick(2)
        self.assertEqual(self.envs(), [("oldest_message_age", "firing", "3600", "3600"),
                                       ("oldest_message_age", "cleared", "0", "3600")])

    def test_deferred_ratio(self):
        self.alerts(deferred_ratio=0.5)
        self.tick()  # empty queue: ratio 0
        active = self.add(3)
        self.add(2, state="deferred")
        self.tick()
        self.assertEqual(self.envs(), [])
        self.queue.remove(active[0])
        self.tick(2)
        self.assertEqual(self.envs(), [("deferred_ratio", "firing", "0.5", "0.5")])
        self.queue.remove(active[1])
        self.tick()
        self.assertEqual(len(self.envs()), 1)
        self.add(5)
        self.tick()
        self.assertEqual(self.envs()[-1], ("deferred_ratio", "cleared", "0.25", "0.5"))

    def test_connection_timeouts_per_minute(self):
        self.alerts(connection_timeouts_per_minute=3)

        def timeout():
            self.bus.emit("protocol", session="s", listener="relay", direction="in", event="reply",
                          data="421 4.4.2 mx.example.net Error: command timeout exceeded",
                          local="", remote="")

        self.clock.advance(15)
        timeout()
        timeout()
        self.clock.advance(15)  # the first check
        self.assertEqual(self.envs(), [])
        timeout()
        self.bus.emit("protocol", session="s", route="mx", direction="out", event="reply",
                      data="421 4.4.2 remote timed us out", local="", remote="")  # not inbound
        self.tick()
        self.assertEqual(self.envs(), [("connection_timeouts_per_minute", "firing", "3", "3")])
        self.tick()  # 75 s after the first two: they have left the window (the third: 60 s)
        self.assertEqual(self.envs()[-1], ("connection_timeouts_per_minute", "cleared", "0", "3"))
        self.tick(5)
        self.assertEqual(len(self.envs()), 2)

    def test_zero_thresholds_are_off(self):
        alerts = self.alerts()
        self.add(10, state="deferred", age=10 ** 6)
        self.tick(5)
        self.assertEqual(alerts.enabled, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.envs(), [])
        self.assertIsNone(self.gauge("queue_size"))

    def test_several_alerts_at_once(self):
        self.alerts(queue_size=2, deferred_ratio=1.0)
        self.add(2, state="deferred")
        self.tick()
        self.assertEqual(sorted(self.envs()), [("deferred_ratio", "firing", "1", "1"),
                                               ("queue_size", "firing", "2", "2")])


class FailureTests(AlertCase):
    def test_spawn_failure_is_logged_and_checks_go_on(self):
        self.spawn.fail = True
        self.alerts(queue_size=1)
        self.add(1)
        self.tick()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.queue.messages.clear()
        self.queue.where.clear()
        self.tick()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual([a[:2] for a in self.alert_logs()], [("queue_size", "firing"),
                                                              ("queue_size", "cleared")])

    def test_command_failure_is_logged(self):
        self.alerts(queue_size=1)
        self.add(1)
        self.tick()
        ((protocol, _, _, _),) = self.spawn.calls
        protocol.outReceived(b"mail: command not found\n")
        protocol.processEnded(Failure(ProcessTerminated(exitCode=127)))
        (event,) = [e for e in self.log if "failed" in e.get("log_format", "")]
        self.assertEqual(event["how"], "exit status 127")
        self.assertEqual(event["output"], "mail: command not found")
        self.assertEqual(self.successResultOf(protocol.ended), 127)

    def test_success_is_not_logged(self):
        self.alerts(queue_size=1)
        self.add(1)
        self.tick()
        ((protocol, _, _, _),) = self.spawn.calls
        protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual([e for e in self.log if "failed" in e.get("log_format", "")], [])

    def test_a_queue_that_cannot_be_listed(self):
        self.alerts(queue_size=1)
        self.add(1)
        self.tick()
        self.queue.list = lambda state=None: defer.fail(OSError(5, "I/O error"))
        self.tick(3)
        broken = self.flushLoggedErrors(OSError)
        self.assertEqual(len(broken), 1)  # logged once, not every interval
        self.assertEqual(self.envs(), [("queue_size", "firing", "1", "1")])  # state kept
        del self.queue.list
        self.queue.messages.clear()
        self.tick()
        self.assertEqual(self.envs()[-1][:2], ("queue_size", "cleared"))

    def test_format_value(self):
        self.assertEqual(format_value(3), "3")
        self.assertEqual(format_value(3600.0), "3600")
        self.assertEqual(format_value(0.25), "0.25")
        self.assertEqual(format_value(2 / 3), "0.667")


class RealCommandTests(unittest.TestCase):
    """The command runs under the real /bin/sh, spawned by the running reactor."""

    @defer.inlineCallbacks
    def test_command_writes_a_file(self):
        from twisted.internet import reactor

        out = os.path.abspath(self.mktemp())
        queue = MemoryQueue()
        queue.enqueue(entry("Q1", reactor.seconds()), b"x")
        metrics = Metrics(None, reactor)
        command = ('printf "%s %s %s %s %s\\n" "$MAILGATE_ALERT" "$MAILGATE_ALERT_STATE" '
                   '"$MAILGATE_ALERT_VALUE" "$MAILGATE_ALERT_THRESHOLD" "${HOME:-nohome}" > ' + out)
        alerts = Alerts(AlertsConfig(interval=0.05, queue_size=1, command=command), reactor, metrics, queue)
        alerts.start()
        self.addCleanup(alerts.stop)
        deadline = reactor.seconds() + 10
        while not alerts.processes:
            self.assertLess(reactor.seconds(), deadline)
            yield task.deferLater(reactor, 0.02, lambda: None)
        code = yield alerts.processes[0].ended
        self.assertEqual(code, 0)
        with open(out) as f:
            self.assertEqual(f.read(), "queue_size firing 1 1 nohome\n")
