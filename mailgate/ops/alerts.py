"""
Threshold alerts: checked every [alerts] interval seconds on the injected reactor.

  queue_size                       messages in the queue, all states
  oldest_message_age               seconds since the oldest message waiting for delivery (states
                                   active and deferred: held and quarantined messages wait for a
                                   person on purpose) was received
  deferred_ratio                   deferred messages / all messages (0 when the queue is empty)
  connection_timeouts_per_minute   inbound sessions closed with "421 4.4.2" (a client exceeded a
                                   time limit) in the last 60 seconds

A threshold of 0 turns its alert off.  An alert fires when its value reaches its threshold
(value >= threshold) and clears when the value falls below it.  Each change is one WARNING log
event, sets mailgate_alert_active{alert} to 1 or 0, and, when [alerts] command is set, runs it as
`/bin/sh -c COMMAND` (reactor.spawnProcess, never waited for) with this environment only:
MAILGATE_ALERT (the name above), MAILGATE_ALERT_STATE (firing | cleared), MAILGATE_ALERT_VALUE,
MAILGATE_ALERT_THRESHOLD and PATH.  A command that cannot start, exits non-zero or is killed is
logged with the end of its output; one still running after COMMAND_TIMEOUT seconds is killed.
When the queue cannot be listed, the queue alerts keep their state until the next check.
"""

import os

from twisted.internet import defer, protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

ALERTS = ("queue_size", "oldest_message_age", "deferred_ratio", "connection_timeouts_per_minute")
QUEUE_ALERTS = ALERTS[:3]
DELIVERY_STATES = ("active", "deferred")
SHELL = "/bin/sh"
COMMAND_TIMEOUT = 60.0  # seconds an alert command may run
OUTPUT_KEPT = 2048  # bytes of a command's output kept for the log


def format_value(value):
    """A number for the environment and the log: integral values without a fraction."""
    value = float(value)
    if value.is_integer():
        return "%d" % value
    return ("%.3f" % value).rstrip("0").rstrip(".")


class _CommandProtocol(protocol.ProcessProtocol):
    """Closes stdin, keeps the end of the output, logs a failure, kills after COMMAND_TIMEOUT."""

    def __init__(self, alert, state, clock, timeout=COMMAND_TIMEOUT):
        self.alert = alert
        self.state = state
        self.output = b""
        self.ended = defer.Deferred()  # fires with the exit code (None when killed by a signal)
        self._clock = clock
        self._timeout = timeout
        self._timer = None

    def connectionMade(self):
        self.transport.closeStdin()
        if self._timeout:
            self._timer = self._clock.callLater(self._timeout, self._kill)

    def outReceived(self, data):
        self.output = (self.output + data)[-OUTPUT_KEPT:]

    errReceived = outReceived

    def _kill(self):
        self._timer = None
        log.warn("alert command for {alert} ({state}) still running after {timeout}s: killed",
                 alert=self.alert, state=self.state, timeout=self._timeout)
        try:
            self.transport.signalProcess("KILL")
        except Exception:
            pass

    def processEnded(self, reason):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        if code != 0:
            log.warn("alert command for {alert} ({state}) failed: {how}; output: {output}",
                     alert=self.alert, state=self.state,
                     how="exit status %s" % (code,) if code is not None else "signal %s" % (signal,),
                     output=self.output.decode("utf-8", "replace").strip() or "(none)")
        self.ended.callback(code)


class Alerts:
    """
    The checks of alerts_config (a mailgate.config.AlertsConfig) on reactor (IReactorTime, and
    IReactorProcess unless spawn is given), reading queue (an IQueue) and metrics (a
    mailgate.ops.metrics.Metrics: its recent_timeouts(), the queue gauges and mailgate_alert_active).
    spawn has reactor.spawnProcess's signature (tests give a fake).  .active: {alert: bool}.
    """

    def __init__(self, alerts_config, reactor, metrics, queue, spawn=None):
        self.config = alerts_config
        self.reactor = reactor
        self.metrics = metrics
        self.queue = queue
        self.spawn = spawn  # None: reactor.spawnProcess, looked up when a command runs
        self.thresholds = {name: getattr(alerts_config, name) or 0 for name in ALERTS}
        self.enabled = [name for name in ALERTS if self.thresholds[name] > 0]
        self.active = dict.fromkeys(self.enabled, False)
        self.processes = []  # _CommandProtocol of commands started (the last few)
        self._loop = None
        for name in self.enabled:
            metrics.alert_active.labels(name).set(0)

    def start(self):
        """Check every interval seconds (the first check one interval from now)."""
        if self._loop is None and self.enabled:
            self._loop = LoopingCall(self.check)
            self._loop.clock = self.reactor
            self._loop.start(self.config.interval, now=False)

    def stop(self):
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None

    def check(self):
        """One round of checks; fires when done, never with a failure."""
        values = {}
        if "connection_timeouts_per_minute" in self.enabled:
            values["connection_timeouts_per_minute"] = self.metrics.recent_timeouts(60)
        if not any(name in self.enabled for name in QUEUE_ALERTS):
            self._judge(values)
            return defer.succeed(None)
        # Through the metrics: the queue gauges get the same listing, and listings run at once share it.
        d = self.metrics.refresh_queue(self.queue)

        def listed(snapshot):
            if snapshot is None:  # the listing failed (logged by the metrics): keep the state
                return
            total = snapshot.total
            values["queue_size"] = total
            values["oldest_message_age"] = snapshot.oldest_age(DELIVERY_STATES)
            values["deferred_ratio"] = snapshot.counts.get("deferred", 0) / total if total else 0.0

        d.addCallback(listed)
        d.addCallback(lambda _: self._judge(values))
        d.addErrback(lambda f: log.failure("alerts: check failed", f))
        return d

    def _judge(self, values):
        for name in self.enabled:
            if name not in values:
                continue
            value, threshold = values[name], self.thresholds[name]
            firing = value >= threshold
            if firing != self.active[name]:
                self.active[name] = firing
                self._changed(name, firing, value, threshold)

    def _changed(self, name, firing, value, threshold):
        state = "firing" if firing else "cleared"
        self.metrics.alert_active.labels(name).set(1 if firing else 0)
        log.warn("alert {alert} {state}: {value} (threshold {threshold})", alert=name, state=state,
                 value=format_value(value), threshold=format_value(threshold),
                 alert_value=value, alert_threshold=threshold)
        if self.config.command:
            self._run(name, state, value, threshold)

    def _run(self, name, state, value, threshold):
        env = {
            "MAILGATE_ALERT": name,
            "MAILGATE_ALERT_STATE": state,
            "MAILGATE_ALERT_VALUE": format_value(value),
            "MAILGATE_ALERT_THRESHOLD": format_value(threshold),
            "PATH": os.environ.get("PATH") or os.defpath,
        }
        process = _CommandProtocol(name, state, self.reactor)
        try:
            spawn = self.spawn if self.spawn is not None else self.reactor.spawnProcess
            spawn(process, SHELL, [SHELL, "-c", self.config.command], env=env)
        except Exception:
            log.failure("alert command for {alert} ({state}) could not be started", alert=name,
                        state=state)
            return
        self.processes = self.processes[-9:] + [process]
