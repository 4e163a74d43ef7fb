"""
Prometheus metrics: counters, gauges and histograms fed by the gateway's events.

Metrics(events, clock) owns its own prometheus_client CollectorRegistry (never the global
REGISTRY: two gateways, or many tests, in one process do not collide) and counts what the gateway
emits on its mailgate.events.EventBus:

  protocol events (inbound, direction "in", unless said otherwise)
    mailgate_connections_open{listener}               gauge: connect +1, disconnect -1
    mailgate_connections_total{listener}
    mailgate_connection_timeouts_total{listener}      replies "421 4.4.2" (command/data/session
                                                      time limit); the last minute of them is what
                                                      the connection_timeouts_per_minute alert sees
    mailgate_tls_sessions_total{direction,version}    "tls" events, data "<version> <cipher>"
                                                      (inbound and, direction "out", delivery)
    mailgate_outbound_connections_total{route}        delivery connections ("out" connect events)
  tracking events
    mailgate_tracking_events_total{event}             every tracking event by name (RECEIVE, ...)
    mailgate_messages_received_total{listener}        RECEIVE
    mailgate_accept_seconds                           histogram of RECEIVE latency (end of DATA to
                                                      queued: filters and the durable write)
    mailgate_messages_rejected_total{listener,stage,severity,reason}
                                                      REJECT: one per refused MAIL, RCPT or message
    mailgate_limit_refusals_total{limit}              REJECT events naming a limit across sessions
                                                      (max_connections_per_ip, message_rate_per_ip,
                                                      max_auth_failures_per_ip, early_talker, ...)
    mailgate_messages_quarantined_total               QUARANTINE
    mailgate_auth_failures_total{listener}            AUTH_FAIL
    mailgate_recipients_delivered_total{route}        DELIVER (one per recipient)
    mailgate_recipients_deferred_total{route}         DEFER
    mailgate_recipients_bounced_total{route}          BOUNCE (route "none": no route matched)
    mailgate_delivery_seconds                         histogram of DELIVER latency (seconds since
                                                      the message was received, retries included)
  verdict events (mailgate.filters.chain)
    mailgate_filter_verdicts_total{filter,action}     action: next, accept, reject, tempfail,
                                                      quarantine, or error (the hook failed)
  the queue, refreshed from queue.list() every queue_interval seconds (not on scrape: listing
  reads every entry's header from disk, which is not cheap for a big spool)
    mailgate_queue_messages{state}
    mailgate_queue_oldest_age_seconds{state}          0 when the state is empty
    mailgate_queue_refresh_timestamp_seconds          when the values above were taken
  DNS, through InstrumentedResolver
    mailgate_dns_seconds{type}                        histogram of every lookup (cache hits too:
                                                      it is the time mail flow waits)
    mailgate_dns_errors_total{type,error}             error: nxdomain, servfail, refused,
                                                      timeout, cancelled, other
  alerts (mailgate.ops.alerts)
    mailgate_alert_active{alert}                      1 while firing, 0 otherwise

The rejection reason comes from the enhanced status code (RFC 3463) of the reply, X.Y.Z:
severity is "temporary" (4xx) or "permanent" (5xx); reason is "size" (X.3.4), "too_many_recipients"
(X.5.3), "unknown_user" (X.1.1), "denied" (X.7.1: relay access denied, access denied, DMARC and
other policy refusals), else the subject of Y: "address" (1), "mailbox" (2), "system" (3: e.g.
451 4.3.0 when a filter or the queue fails), "network" (4), "protocol" (5: syntax, sequence),
"content" (6: bare LF, long lines), "policy" (7: TLS or AUTH required, bad credentials...), "other"
(0), or "unknown" without an enhanced status.  All label values are bounded: listener, route and
filter names come from the configuration.

The HTTP side (/metrics, /healthz) is mailgate.ops.httpd; the health check mailgate.ops.health.
"""

import collections
import re

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailgate.resolver import TimedResolver
from mailgate.version import __version__

log = Logger()

QUEUE_STATES = ("active", "deferred", "hold", "quarantine")
QUEUE_INTERVAL = 15.0  # seconds between queue gauge refreshes
TIMEOUT_REPLY = "421 4.4.2"  # smtpd's answer when a client exceeds a time limit
TIMEOUT_WINDOW = 60  # seconds of timeouts kept for the alert

ACCEPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DELIVERY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600,
                    86400, 3 * 86400, 5 * 86400)
DNS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_ENHANCED = re.compile(r"^\s*([245])\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})\b")
_CODE = re.compile(r"^\s*([245])\d\d\b")
_DETAIL_REASONS = {"3.4": "size", "5.3": "too_many_recipients", "1.1": "unknown_user", "7.1": "denied"}
_SUBJECT_REASONS = {"0": "other", "1": "address", "2": "mailbox", "3": "system", "4": "network",
                    "5": "protocol", "6": "content", "7": "policy"}


def reject_reason(reply):
    """(severity, reason) of a refusal reply such as "550 5.7.1 Relay access denied"."""
    text = str(reply or "")
    match = _ENHANCED.match(text)
    if match is None:
        code = _CODE.match(text)
        severity = {"4": "temporary", "5": "permanent"}.get(code.group(1) if code else "", "unknown")
        return severity, "unknown"
    klass, subject, detail = match.group(1), match.group(3), match.group(4)
    severity = "temporary" if klass == "4" else "permanent" if klass == "5" else "unknown"
    reason = _DETAIL_REASONS.get("%s.%s" % (subject, detail)) or _SUBJECT_REASONS.get(subject, "other")
    return severity, reason


def _label(value, default="none"):
    return default if value is None or value == "" else str(value)


class QueueSnapshot:
    """What queue.list() said at `taken`: entries per state and the oldest received_at per state."""

    def __init__(self, entries, now):
        self.taken = now
        self.counts = dict.fromkeys(QUEUE_STATES, 0)
        self.oldest = {}
        for state, envelope in entries:
            self.counts[state] = self.counts.get(state, 0) + 1
            received = getattr(envelope, "received_at", None)
            if received is not None and (state not in self.oldest or received < self.oldest[state]):
                self.oldest[state] = received

    @property
    def total(self):
        return sum(self.counts.values())

    def oldest_age(self, states=None):
        """Seconds since the oldest message (of states, default all) was received; 0 when none."""
        times = [t for s, t in self.oldest.items() if states is None or s in states]
        return max(0.0, self.taken - min(times)) if times else 0.0


class Metrics:
    """
    The gateway's metrics in their own registry, fed by events (a mailgate.events.EventBus, or
    None) on clock (an IReactorTime).  queue (an IQueue) and queue_interval: what start() refreshes
    the queue gauges from, and how often.  The registry is .registry; exposition() is the text.
    """

    def __init__(self, events=None, clock=None, queue=None, queue_interval=QUEUE_INTERVAL):
        self.clock = clock
        self.queue = queue
        self.queue_interval = queue_interval
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.snapshot = None  # the last QueueSnapshot
        self._refreshing = None
        self._list_failing = False
        self._loop = None
        self._timeouts = collections.deque()  # [second, count], for the last TIMEOUT_WINDOW seconds

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=registry)

        def gauge(name, doc, labels=()):
            return Gauge(name, doc, labels, registry=registry)

        self.build_info = gauge("mailgate_build_info", "mailgate's version", ("version",))
        self.build_info.labels(__version__).set(1)
        self.connections_open = gauge("mailgate_connections_open", "Open inbound SMTP connections",
                                      ("listener",))
        self.connections = counter("mailgate_connections_total", "Inbound SMTP connections accepted",
                                   ("listener",))
        self.connection_timeouts = counter(
            "mailgate_connection_timeouts_total",
            "Inbound sessions closed for exceeding a time limit (421 4.4.2)", ("listener",))
        self.outbound_connections = counter("mailgate_outbound_connections_total",
                                            "SMTP connections made for delivery", ("route",))
        self.tls_sessions = counter("mailgate_tls_sessions_total", "TLS sessions by protocol version",
                                    ("direction", "version"))
        self.tracking_events = counter("mailgate_tracking_events_total",
                                       "Message tracking events by name", ("event",))
        self.received = counter("mailgate_messages_received_total", "Messages accepted and queued",
                                ("listener",))
        self.rejected = counter(
            "mailgate_messages_rejected_total",
            "Refused MAIL, RCPT and messages, by SMTP stage and reason (enhanced status code)",
            ("listener", "stage", "severity", "reason"))
        self.limit_refusals = counter(
            "mailgate_limit_refusals_total",
            "Connections, commands and messages refused by a limit across sessions", ("limit",))
        self.quarantined = counter("mailgate_messages_quarantined_total", "Messages quarantined")
        self.auth_failures = counter("mailgate_auth_failures_total", "Failed SMTP AUTH attempts",
                                     ("listener",))
        self.delivered = counter("mailgate_recipients_delivered_total", "Recipients delivered",
                                 ("route",))
        self.deferred = counter("mailgate_recipients_deferred_total",
                                "Recipient delivery attempts deferred", ("route",))
        self.bounced = counter("mailgate_recipients_bounced_total", "Recipients bounced", ("route",))
        self.accept_seconds = Histogram(
            "mailgate_accept_seconds", "Seconds from end of DATA until the message was queued",
            buckets=ACCEPT_BUCKETS, registry=registry)
        self.delivery_seconds = Histogram(
            "mailgate_delivery_seconds", "Seconds from receipt until a recipient was delivered",
            buckets=DELIVERY_BUCKETS, registry=registry)
        self.dns_seconds = Histogram("mailgate_dns_seconds", "Seconds per DNS lookup", ("type",),
                                     buckets=DNS_BUCKETS, registry=registry)
        self.dns_errors = counter("mailgate_dns_errors_total", "DNS lookups that failed",
                                  ("type", "error"))
        self.filter_verdicts = counter("mailgate_filter_verdicts_total", "Filter verdicts",
                                       ("filter", "action"))
        self.queue_messages = gauge("mailgate_queue_messages", "Messages in the queue by state",
                                    ("state",))
        self.queue_oldest = gauge("mailgate_queue_oldest_age_seconds",
                                  "Age of the oldest message in each queue state", ("state",))
        self.queue_refreshed = gauge("mailgate_queue_refresh_timestamp_seconds",
                                     "When the queue gauges were last refreshed (POSIX seconds)")
        self.alert_active = gauge("mailgate_alert_active", "1 while an alert is firing", ("alert",))
        self._unsubscribe = events.subscribe(self.observe) if events is not None else None

    # -- events ------------------------------------------------------------------------------

    def observe(self, kind, fields):
        """The EventBus observer."""
        if kind == "protocol":
            self._protocol(fields)
        elif kind == "tracking":
            self._tracking(fields)
        elif kind == "verdict":
            self.filter_verdicts.labels(_label(fields.get("filter")), _label(fields.get("action"))).inc()
        elif kind == "dns":
            rtype = _label(fields.get("type"))
            self.dns_seconds.labels(rtype).observe(fields.get("seconds") or 0.0)
            if fields.get("error"):
                self.dns_errors.labels(rtype, fields["error"]).inc()

    def _protocol(self, fields):
        event = fields.get("event")
        direction = fields.get("direction")
        if event == "tls":
            version = str(fields.get("data") or "").split(" ", 1)[0]
            self.tls_sessions.labels(_label(direction, "in"),
                                     version if version and version != "None" else "unknown").inc()
            return
        if direction not in (None, "in"):
            if direction == "out" and event == "connect":
                self.outbound_connections.labels(_label(fields.get("route"))).inc()
            return
        listener = _label(fields.get("listener"))
        if event == "connect":
            self.connections.labels(listener).inc()
            self.connections_open.labels(listener).inc()
        elif event == "disconnect":
            self.connections_open.labels(listener).dec()
        elif event == "reply" and str(fields.get("data") or "").startswith(TIMEOUT_REPLY):
            self.connection_timeouts.labels(listener).inc()
            self._note_timeout(fields.get("time"))

    def _tracking(self, fields):
        event = fields.get("event")
        self.tracking_events.labels(_label(event)).inc()
        recipients = fields.get("recipients")
        count = len(recipients) if recipients is not None else 1
        if event == "RECEIVE":
            self.received.labels(_label(fields.get("listener"))).inc()
            if fields.get("latency") is not None:
                self.accept_seconds.observe(max(0.0, fields["latency"]))
        elif event == "REJECT":
            severity, reason = reject_reason(fields.get("reply"))
            self.rejected.labels(_label(fields.get("listener")), _label(fields.get("stage")),
                                 severity, reason).inc()
            if fields.get("limit"):
                self.limit_refusals.labels(str(fields["limit"])).inc()
        elif event == "QUARANTINE":
            self.quarantined.inc()
        elif event == "AUTH_FAIL":
            self.auth_failures.labels(_label(fields.get("listener"))).inc()
        elif event == "DELIVER":
            self.delivered.labels(_label(fields.get("route"))).inc(count)
            if fields.get("latency") is not None:
                self.delivery_seconds.observe(max(0.0, fields["latency"]))
        elif event == "DEFER":
            self.deferred.labels(_label(fields.get("route"))).inc(count)
        elif event == "BOUNCE":
            self.bounced.labels(_label(fields.get("route"))).inc(count)

    def declare_listeners(self, names):
        """Make the per-listener series exist (at 0) before the first connection."""
        for name in names:
            self.connections_open.labels(name)
            self.connections.labels(name)
            self.connection_timeouts.labels(name)
            self.received.labels(name)
            self.auth_failures.labels(name)

    # -- connection timeouts over the last minute (for the alert) ------------------------------

    def _now(self):
        return self.clock.seconds() if self.clock is not None else 0.0

    def _note_timeout(self, when):
        second = int(when if when is not None else self._now())
        if self._timeouts and self._timeouts[-1][0] == second:
            self._timeouts[-1][1] += 1
        else:
            self._timeouts.append([second, 1])
        self._prune_timeouts(second)

    def _prune_timeouts(self, now):
        while self._timeouts and self._timeouts[0][0] <= now - TIMEOUT_WINDOW:
            self._timeouts.popleft()

    def recent_timeouts(self, window=TIMEOUT_WINDOW):
        """Inbound connection timeouts (421 4.4.2) in the last window seconds (at most 60)."""
        now = self._now()
        self._prune_timeouts(int(now))
        return sum(count for second, count in self._timeouts if second > now - window)

    # -- the queue -------------------------------------------------------------------------------

    def set_queue(self, snapshot):
        """Set the queue gauges from a QueueSnapshot."""
        self.snapshot = snapshot
        for state, count in snapshot.counts.items():
            self.queue_messages.labels(state).set(count)
            self.queue_oldest.labels(state).set(snapshot.oldest_age((state,)))
        self.queue_refreshed.set(snapshot.taken)

    def refresh_queue(self, queue=None):
        """
        List the queue and set the gauges; fires with the QueueSnapshot (never fails: a failed
        listing is logged and fires with None).  Calls made while a listing runs share it.
        """
        if self._refreshing is not None:
            mine = defer.Deferred()
            self._refreshing.append(mine)
            return mine
        queue = queue if queue is not None else self.queue
        self._refreshing = waiting = []
        d = defer.maybeDeferred(queue.list)

        def listed(entries):
            if self._list_failing:
                self._list_failing = False
                log.info("the queue can be listed again for metrics")
            snapshot = QueueSnapshot(entries, self._now())
            self.set_queue(snapshot)
            return snapshot

        def failed(failure):
            if not self._list_failing:  # once, not every queue_interval
                self._list_failing = True
                log.failure("could not list the queue for metrics", failure)
            return None

        def done(result):
            self._refreshing = None
            for other in waiting:
                other.callback(result)
            return result

        return d.addCallbacks(listed, failed).addBoth(done)

    def start(self):
        """Refresh the queue gauges now and every queue_interval seconds (needs queue and clock)."""
        if self._loop is None and self.queue is not None:
            self._loop = LoopingCall(self.refresh_queue)
            self._loop.clock = self.clock
            self._loop.start(self.queue_interval, now=True)

    def stop(self):
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None

    def close(self):
        """Stop refreshing and stop listening to events."""
        self.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def exposition(self):
        """The Prometheus text exposition of the registry (bytes)."""
        return prometheus_client.generate_latest(self.registry)


# -- DNS -------------------------------------------------------------------------------------------

class _Direct:
    """An event bus with one observer, metrics: for InstrumentedResolver outside a gateway."""

    def __init__(self, metrics):
        self.metrics = metrics

    def emit(self, kind, **fields):
        self.metrics.observe(kind, fields)


def InstrumentedResolver(resolver, metrics, clock):
    """resolver with every lookup timed into metrics (mailgate.resolver.TimedResolver)."""
    return TimedResolver(resolver, _Direct(metrics), clock)
