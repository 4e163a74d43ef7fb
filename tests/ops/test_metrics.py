"""
mailgate.ops.metrics: counters from events (emitted on a bus, or by a real listener session and filter
chain), the queue gauges, the DNS wrapper, and /metrics and /healthz served over real HTTP on
127.0.0.1 by a real gateway (trial with the running reactor).
"""

import os
import shutil
import urllib.error
import urllib.request

import attr
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.names import dns, error as dnserror
from twisted.trial import unittest

from mailgate.config import (AuthConfig, Config, DNSConfig, GatewayConfig, Limits, MetricsConfig,
                             QueueConfig, TLSConfig)
from mailgate.envelope import Address, Envelope
from mailgate.errors import ConfigError
from mailgate.events import EventBus
from mailgate.filters import FilterContext
from mailgate.filters.chain import FilterChain
from mailgate.ops.metrics import (InstrumentedResolver, Metrics, MetricsService, QueueSnapshot,
                              reject_reason)
from mailgate.service import build_service as _build_service
from mailgate.verdict import Verdict

from tests.smtphelp import MemoryQueue, Session, listener


def scrape(metrics):
    """{(sample name, ((label, value), ...)): value} parsed from the text exposition."""
    return parse(metrics.exposition().decode("utf-8"))


def parse(text):
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


class EventCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.bus = EventBus(self.clock)
        self.metrics = Metrics(self.bus, self.clock)

    def protocol(self, event, data="", listener="relay", direction="in", **fields):
        self.bus.emit("protocol", session="s1", listener=listener, direction=direction, event=event,
                      data=data, local="127.0.0.1:25", remote="192.0.2.1:4000", **fields)


class ProtocolEventTests(EventCase):
    def test_connections_open_and_total_per_listener(self):
        for _ in range(3):
            self.protocol("connect")
        self.protocol("connect", listener="submission")
        self.protocol("disconnect")
        self.protocol("connect", listener=None, direction="out", route="exchange")  # outbound
        s = scrape(self.metrics)
        self.assertEqual(value(s, "mailgate_connections_open", listener="relay"), 2)
        self.assertEqual(value(s, "mailgate_connections_total", listener="relay"), 3)
        self.assertEqual(value(s, "mailgate_connections_open", listener="submission"), 1)
        self.assertEqual(value(s, "mailgate_connections_total", listener="submission"), 1)
        self.assertIsNone(value(s, "mailgate_connections_total", listener="none"))
        self.assertEqual(value(s, "mailgate_outbound_connections_total", route="exchange"), 1)

    def test_tls_sessions_by_version(self):
        self.protocol("tls", "TLSv1.3 TLS_AES_256_GCM_SHA384")
        self.protocol("tls", "TLSv1.3 TLS_AES_128_GCM_SHA256")
        self.protocol("tls", "TLSv1.2 ECDHE-RSA-AES256-GCM-SHA384")
        self.protocol("tls", "None None")
        s = scrape(self.metrics)
        self.assertEqual(value(s, "mailgate_tls_sessions_total", direction="in", version="TLSv1.3"), 2)
        self.assertEqual(value(s, "mailgate_tls_sessions_total", direction="in", version="TLSv1.2"), 1)
        self.assertEqual(value(s, "mailgate_tls_sessions_total", direction="in", version="unknown"), 1)

    def test_connection_timeouts_counted_and_kept_for_one_minute(self):
        self.protocol("reply", "421 4.4.2 mx.example.net Error: command timeout exceeded")
        self.protocol("reply", "421 4.7.0 mx.example.net Error: too many errors")
        self.protocol("reply", "250 2.0.0 Ok")
        self.clock.advance(30)
        self.protocol("reply", "421 4.4.2 mx.example.net Error: data timeout exceeded")
        self.assertEqual(self.metrics.recent_timeouts(), 2)
        self.assertEqual(value(scrape(self.metrics), "mailgate_connection_timeouts_total",
                               listener="relay"), 2)
        self.clock.advance(31)
        self.assertEqual(self.metrics.recent_timeouts(), 1)
        self.clock.advance(30)
        self.assertEqual(self.metrics.recent_timeouts(), 0)
        self.assertEqual(value(scrape(self.metrics), "mailgate_connection_timeouts_total",
                               listener="relay"), 2)

    def test_timeout_window_stays_small_under_a_flood(self):
        for i in range(10000):
            if i % 100 == 0:
                self.clock.advance(1)
            self.protocol("reply", "421 4.4.2 x Error: command timeout exceeded")
        self.assertLessEqual(len(self.metrics._timeouts), 61)
        self.assertEqual(self.metrics.recent_timeouts(), 6000)

    def test_declared_listeners_exist_at_zero(self):
        self.metrics.declare_listeners(["relay", "submission"])
        s = scrape(self.metrics)
        self.assertEqual(value(s, "mailgate_connections_open", listener="submission"), 0)
        self.assertEqual(value(s, "mailgate_messages_received_total", listener="relay"), 0)


class TrackingEventTests(EventCase):
    def test_received_and_accept_latency(self):
        self.bus.track("RECEIVE", listener="relay", queue_id="Q1", latency=0.02)
        self.bus.track("RECEIVE", listener="relay", queue_id="Q2", latency=0.3)
        self.bus.track("RECEIVE", listener="submission", queue_id="Q3", latency=2.0)
        s = scrape(self.metrics)
        self.assertEqual(value(s, "mailgate_messages_received_total", listener="relay"), 2)
        self.assertEqual(value(s, "mailgate_messages_received_total", listener="submission"), 1)
        self.assertEqual(value(s, "mailgate_accept_seconds_count"), 3)
        self.assertAlmostEqual(value(s, "mailgate_accept_seconds_sum"), 2.32)
        self.assertEqual(value(s, "mailgate_accept_seconds_bucket", le="0.025"), 1)
        self.assertEqual(value(s, "mailgate_accept_seconds_bucket", le="0.5"), 2)
        self.assertEqual(value(s, "mailgate_accept_seconds_bucket", le="+Inf"), 3)
        self.assertEqual(value(s, "mailgate_tracking_events_total", event="RECEIVE"), 3)

    def test_rejections_by_stage_and_reason(self):
        for stage, reply in [("RCPT", "554 5.7.1 <u@else.example>: Relay access denied"),
                             ("RCPT", "554 5.7.1 <v@else.example>: Relay access denied"),
                             ("MAIL", "552 5.3.4 Message size exceeds fixed limit"),
                             ("DATA", "451 4.3.0 Temporary failure, please try again later"),
                             ("DATA", "550 5.6.0 Message contains bare CR or LF characters")]:
            self.bus.track("REJECT", listener="relay", stage=stage, reply=reply)
        s = scrape(self.metrics)
        rejected = {key[1]: v for key, v in s.items() if key[0] == "mailgate_messages_rejected_total"}
        self.assertEqual(rejected, {
            (("listener", "relay"), ("reason", "denied"), ("severity", "permanent"), ("stage", "RCPT")): 2,
            (("listener", "relay"), ("reason", "size"), ("severity", "permanent"), ("stage", "MAIL")): 1,
            (("listener", "relay"), ("reason", "system"), ("severity", "temporary"), ("stage", "DATA")): 1,
            (("listener", "relay"), ("reason", "content"), ("severity", "permanent"), ("stage", "DATA")): 1,
        })

    def test_reject_reason(self):
        self.assertEqual(reject_reason("452 4.5.3 Too many recipients"), ("temporary", "too_many_recipients"))
        self.assertEqual(reject_reason("550 5.1.1 No such user"), ("permanent", "unknown_user"))
        self.assertEqual(reject_reason("530 5.7.0 Must issue a STARTTLS command first"),
                         ("permanent", "policy"))
        self.assertEqual(reject_reason("503 5.5.1 Need MAIL command"), ("permanent", "protocol"))
        self.assertEqual(reject_reason("550-5.7.26 first line\r\n550 5.7.26 second"), ("permanent", "policy"))
        self.assertEqual(reject_reason("550 no enhanced status"), ("permanent", "unknown"))
        self.assertEqual(reject_reason(None), ("unknown", "unknown"))

    def test_quarantine_auth_and_delivery_outcomes(self):
        self.bus.track("QUARANTINE", listener="relay", queue_id="Q1")
        self.bus.track("AUTH_FAIL", listener="submission", user_attempted="x")
        self.bus.track("DELIVER", queue_id="Q1", recipients=["a@x.example"], route="exchange", latency=4.0)
        self.bus.track("DELIVER", queue_id="Q1", recipients=["b@x.example"], route="exchange", latency=400.0)
        self.bus.track("DEFER", queue_id="Q2", recipients=["c@y.example"], route="mx", latency=1.0)
        self.bus.track("BOUNCE", queue_id="Q3", recipients=["d@z.example"], route=None, latency=0)
        self.bus.track("BOUNCE", queue_id="Q3", recipients=["e@z.example", "f@z.example"], route="mx")
        s = scrape(self.metrics)
        self.assertEqual(value(s, "mailgate_messages_quarantined_total"), 1)
        self.assertEqual(value(s, "mailgate_auth_failures_total", listener="submission"), 1)
        self.assertEqual(value(s, "mailgate_recipients_delivered_total", route="exchange"), 2)
        self.assertEqual(value(s, "mailgate_recipients_deferred_total", route="mx"), 1)
        self.assertEqual(value(s, "mailgate_recipients_bounced_total", route="none"), 1)
        self.assertEqual(value(s, "mailgate_recipients_bounced_total", route="mx"), 2)
        self.assertEqual(value(s, "mailgate_delivery_seconds_count"), 2)
        self.assertEqual(value(s, "mailgate_delivery_seconds_sum"), 404.0)
        self.assertEqual(value(s, "mailgate_delivery_seconds_bucket", le="5.0"), 1)

    def test_verdict_events(self):
        for action in ("next", "next", "reject", "quarantine"):
            self.bus.emit("verdict", filter="spf", action=action, stage="mail", session="s1")
        s = scrape(self.metrics)
        self.assertEqual(value(s, "mailgate_filter_verdicts_total", filter="spf", action="next"), 2)
        self.assertEqual(value(s, "mailgate_filter_verdicts_total", filter="spf", action="reject"), 1)
        self.assertEqual(value(s, "mailgate_filter_verdicts_total", filter="spf", action="quarantine"), 1)

    def test_close_stops_listening(self):
        self.metrics.close()
        self.bus.track("RECEIVE", listener="relay", latency=0.1)
        self.assertIsNone(value(scrape(self.metrics), "mailgate_messages_received_total", listener="relay"))

    def test_registries_are_per_instance(self):
        other = Metrics(self.bus, self.clock)
        self.bus.track("RECEIVE", listener="relay", latency=0.1)
        self.assertEqual(value(scrape(self.metrics), "mailgate_messages_received_total", listener="relay"), 1)
        self.assertEqual(value(scrape(other), "mailgate_messages_received_total", listener="relay"), 1)
        self.assertIsNot(other.registry, self.metrics.registry)
        from prometheus_client import REGISTRY

        self.assertIsNone(REGISTRY.get_sample_value("mailgate_messages_received_total", {"listener": "relay"}))


def send_message(s, rcpt="u@example.com"):
    s.cmd("MAIL FROM:<a@remote.example>")
    s.cmd("RCPT TO:<%s>" % rcpt)
    s.cmd("DATA")
    return s.cmd("Subject: hi\r\n\r\nbody\r\n.")


class SessionTests(unittest.TestCase):
    """A real listener session (tests/smtphelp.py) emitting on a bus that Metrics counts."""

    def setUp(self):
        self.clock = Clock()
        self.bus = EventBus(self.clock)
        self.metrics = Metrics(self.bus, self.clock)

    def test_session_metrics(self):
        s = Session(listener(name="relay", tls="none", auth="none"), clock=self.clock, events=self.bus)
        s.read()
        s.cmd("EHLO client.example")
        self.assertTrue(send_message(s).startswith("250 2.0.0 Ok: queued as"))
        s.cmd("MAIL FROM:<a@remote.example>")
        self.assertIn("Relay access denied", s.cmd("RCPT TO:<x@elsewhere.example>"))
        s.cmd("QUIT")
        s.proto.connectionLost(None)
        s2 = Session(listener(name="relay", tls="none", auth="none"), clock=self.clock, events=self.bus)
        s2.read()
        self.clock.advance(s2.factory.listener.limits.command_timeout + 1)
        self.assertIn("421 4.4.2", s2.read())
        samples = scrape(self.metrics)
        self.assertEqual(value(samples, "mailgate_connections_total", listener="relay"), 2)
        self.assertEqual(value(samples, "mailgate_connections_open", listener="relay"), 1)
        self.assertEqual(value(samples, "mailgate_messages_received_total", listener="relay"), 1)
        self.assertEqual(value(samples, "mailgate_messages_rejected_total", listener="relay",
                               stage="RCPT", severity="permanent", reason="denied"), 1)
        self.assertEqual(value(samples, "mailgate_accept_seconds_count"), 1)
        self.assertEqual(value(samples, "mailgate_connection_timeouts_total", listener="relay"), 1)
        self.assertEqual(self.metrics.recent_timeouts(), 1)


class ChainVerdictEventTests(unittest.TestCase):
    def make_chain(self, filters, events):
        from tests.filters.test_chain import Runner, make_config

        context = FilterContext(make_config(), Clock(), None, Runner(), events=events)
        return FilterChain(filters, context, "mx.example.net")

    def test_filter_context_stays_compatible(self):
        from tests.filters.test_chain import make_config

        context = FilterContext(make_config(), Clock(), None, None)
        self.assertIsNone(context.events)
        with self.assertRaises(attr.exceptions.FrozenInstanceError):
            context.events = object()

    def test_chain_emits_one_event_per_verdict(self):
        from tests.filters.test_chain import FakeSession, Filter, RAW, envelope

        calls, seen = [], []
        bus = EventBus(Clock())
        bus.subscribe(lambda kind, fields: seen.append((kind, dict(fields))))
        metrics = Metrics(bus, bus.clock)
        a = Filter("a", calls, mail=Verdict.next(), data=Verdict.quarantine("suspicious"))
        b = Filter("b", calls, mail=Verdict.accept(),
                   rcpt=Verdict.reject(550, "5.7.1", "no"))
        broken = Filter("broken", calls, data=lambda session, message: 1 / 0)
        chain = self.make_chain([a, b, broken], bus)
        session = FakeSession()
        chain.on_mail(session, Address("a", "remote.example"))
        chain.on_rcpt(session, Address("u", "example.com"))
        chain.on_data(session, envelope("Q7"), RAW)
        self.flushLoggedErrors(ZeroDivisionError)
        verdicts = [(f["filter"], f["action"], f["stage"], f["session"], f["queue_id"])
                    for kind, f in seen if kind == "verdict"]
        self.assertEqual(verdicts, [("a", "next", "mail", "s1", None), ("b", "accept", "mail", "s1", None),
                                    ("b", "reject", "rcpt", "s1", None), ("a", "quarantine", "data", "s1", "Q7"),
                                    ("broken", "error", "data", "s1", "Q7")])
        s = scrape(metrics)
        self.assertEqual(value(s, "mailgate_filter_verdicts_total", filter="b", action="reject"), 1)
        self.assertEqual(value(s, "mailgate_filter_verdicts_total", filter="broken", action="error"), 1)

    def test_no_events_without_a_bus(self):
        from tests.filters.test_chain import FakeSession, Filter

        chain = self.make_chain([Filter("a", [], mail=Verdict.next())], None)
        self.assertIsNone(chain.on_mail(FakeSession(), Address("a", "remote.example")).result)


class FakeResolver:
    """Answers lookups with Deferreds the test fires."""

    def __init__(self):
        self.pending = []
        self.cleared = False

    def _lookup(self, name, timeout=None):
        d = defer.Deferred()
        self.pending.append((name, d))
        return d

    lookupAddress = lookupMailExchange = lookupText = _lookup

    def query(self, query, timeout=None):
        return self._lookup(query.name.name, timeout)

    def lookupPointer(self, name, timeout=None):
        raise RuntimeError("boom")

    def clear(self):
        self.cleared = True


class ResolverTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(None, self.clock)
        self.upstream = FakeResolver()
        self.resolver = InstrumentedResolver(self.upstream, self.metrics, self.clock)

    def test_lookups_timed_by_type_and_failures_counted(self):
        answer = ([], [], [])
        d1 = self.resolver.lookupAddress("a.example")
        d2 = self.resolver.lookupMailExchange("b.example", timeout=(3,))
        d3 = self.resolver.lookupText("c.example")
        d4 = self.resolver.query(dns.Query(b"d.example", dns.AAAA))
        self.clock.advance(0.02)
        self.upstream.pending[0][1].callback(answer)
        self.clock.advance(0.2)
        self.upstream.pending[1][1].errback(dnserror.DNSNameError("nx"))
        self.upstream.pending[2][1].errback(dnserror.DNSQueryTimeoutError("t"))
        self.upstream.pending[3][1].errback(dnserror.DNSServerError("sf"))
        self.assertEqual(self.successResultOf(d1), answer)
        self.failureResultOf(d2, dnserror.DNSNameError)
        self.failureResultOf(d3, dnserror.DNSQueryTimeoutError)
        self.failureResultOf(d4, dnserror.DNSServerError)
        self.failureResultOf(self.resolver.lookupPointer("1.2.0.192.in-addr.arpa"), RuntimeError)
        s = scrape(self.metrics)
        self.assertEqual(value(s, "mailgate_dns_seconds_count", type="A"), 1)
        self.assertAlmostEqual(value(s, "mailgate_dns_seconds_sum", type="A"), 0.02)
        self.assertAlmostEqual(value(s, "mailgate_dns_seconds_sum", type="MX"), 0.22)
        self.assertEqual(value(s, "mailgate_dns_errors_total", type="MX", error="nxdomain"), 1)
        self.assertEqual(value(s, "mailgate_dns_errors_total", type="TXT", error="timeout"), 1)
        self.assertEqual(value(s, "mailgate_dns_errors_total", type="AAAA", error="servfail"), 1)
        self.assertEqual(value(s, "mailgate_dns_errors_total", type="PTR", error="other"), 1)
        self.assertEqual(self.upstream.pending[1][0], "b.example")

    def test_cancel_reaches_the_wrapped_lookup(self):
        d = self.resolver.lookupAddress("a.example")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(self.upstream.pending[0][1].called)
        self.assertEqual(value(scrape(self.metrics), "mailgate_dns_errors_total", type="A",
                               error="cancelled"), 1)

    def test_other_attributes_pass_through_and_it_is_an_iresolver(self):
        from twisted.internet.interfaces import IResolver
        from zope.interface.verify import verifyObject

        self.resolver.clear()
        self.assertTrue(self.upstream.cleared)
        self.assertTrue(verifyObject(IResolver, self.resolver))

    def test_with_the_resolver_helpers(self):
        from mailgate.resolver import lookup_records

        d = lookup_records(self.resolver, "a.example", dns.A)
        name, pending = self.upstream.pending[0]
        record = dns.RRHeader(b"a.example", dns.A, payload=dns.Record_A("192.0.2.1"))
        pending.callback(([record], [], []))
        self.assertEqual(len(self.successResultOf(d)), 1)
        self.assertEqual(value(scrape(self.metrics), "mailgate_dns_seconds_count", type="A"), 1)


def entry(queue_id, received_at):
    return Envelope(queue_id=queue_id, sender="a@remote.example", recipients=("u@example.com",),
                    client_ip="192.0.2.10", received_at=received_at)


class QueueGaugeTests(unittest.TestCase):
    def test_refreshed_every_interval_from_queue_list(self):
        clock = Clock()
        clock.advance(1000)
        queue = MemoryQueue()
        queue.enqueue(entry("Q1", 900), b"x")
        queue.enqueue(entry("Q2", 990), b"x", state="deferred")
        queue.enqueue(entry("Q3", 600), b"x", state="deferred")
        metrics = Metrics(None, clock, queue, queue_interval=15)
        metrics.start()
        self.addCleanup(metrics.stop)
        s = scrape(metrics)
        self.assertEqual(value(s, "mailgate_queue_messages", state="active"), 1)
        self.assertEqual(value(s, "mailgate_queue_messages", state="deferred"), 2)
        self.assertEqual(value(s, "mailgate_queue_messages", state="hold"), 0)
        self.assertEqual(value(s, "mailgate_queue_oldest_age_seconds", state="deferred"), 400)
        self.assertEqual(value(s, "mailgate_queue_oldest_age_seconds", state="quarantine"), 0)
        queue.remove("Q3")
        clock.advance(14)
        self.assertEqual(value(scrape(metrics), "mailgate_queue_messages", state="deferred"), 2)
        clock.advance(1)
        s = scrape(metrics)
        self.assertEqual(value(s, "mailgate_queue_messages", state="deferred"), 1)
        self.assertEqual(value(s, "mailgate_queue_oldest_age_seconds", state="deferred"), 25)
        self.assertEqual(value(s, "mailgate_queue_refresh_timestamp_seconds"), 1015)

    def test_concurrent_refreshes_share_one_listing_and_failures_are_logged(self):
        class SlowQueue:
            calls = 0

            def list(self, state=None):
                self.calls += 1
                self.d = defer.Deferred()
                return self.d

        queue = SlowQueue()
        metrics = Metrics(None, Clock(), queue)
        d1, d2 = metrics.refresh_queue(), metrics.refresh_queue()
        self.assertEqual(queue.calls, 1)
        queue.d.callback([("active", entry("Q1", 0))])
        first = self.successResultOf(d1)
        self.assertEqual(first.total, 1)
        self.assertIs(self.successResultOf(d2), first)
        d3 = metrics.refresh_queue()
        queue.d.errback(OSError("disk gone"))
        self.assertIsNone(self.successResultOf(d3))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(value(scrape(metrics), "mailgate_queue_messages", state="active"), 1)

    def test_snapshot(self):
        snapshot = QueueSnapshot([("active", entry("Q1", 10)), ("hold", entry("Q2", 5))], 20)
        self.assertEqual(snapshot.total, 2)
        self.assertEqual(snapshot.oldest_age(), 15)
        self.assertEqual(snapshot.oldest_age(("active", "deferred")), 10)
        self.assertEqual(QueueSnapshot([], 20).oldest_age(), 0)


# -- over HTTP, with the real reactor ----------------------------------------------------------------

def sync_runner(f, *args):
    return defer.maybeDeferred(f, *args)


def build_service(config, reactor, **kwargs):
    """build_service without the admin channel (when there is one: it is not what is tested here)."""
    import inspect

    if "admin" in inspect.signature(_build_service).parameters:
        kwargs.setdefault("admin", False)
    return _build_service(config, reactor, **kwargs)


def gateway_config(case, endpoint="tcp:0:interface=127.0.0.1"):
    root = os.path.abspath(case.mktemp())
    os.makedirs(root)
    return Config(
        path=root + "/mailgate.ini",
        gateway=GatewayConfig(hostname="mx.example.net", accepted_domains=("example.com",)),
        limits=Limits(), queue=QueueConfig(path=root + "/spool"), tls=TLSConfig(), auth=AuthConfig(),
        dns=DNSConfig(nameservers=(("127.0.0.1", 1),)),  # never asked
        listeners=(listener(name="relay", endpoint="tcp:0:interface=127.0.0.1", tls="none", auth="none"),
                   listener(name="submission", endpoint="tcp:0:interface=127.0.0.1", tls="none",
                            auth="none", role="submission")),
        metrics=MetricsConfig(endpoint=endpoint))


class HTTPTests(unittest.TestCase):
    """A real gateway on 127.0.0.1:0 with its MetricsService, asked over HTTP."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.config = gateway_config(self)
        self.gateway = build_service(self.config, reactor, run_in_thread=sync_runner, deliver=False)
        # As build_service may wire it: a child of the gateway, started and stopped with it.
        self.gateway.metrics.disownServiceParent()  # this test builds its own
        self.service = MetricsService(self.config, reactor, self.gateway)
        self.service.setServiceParent(self.gateway)
        self.gateway.startService()
        self.addCleanup(self.gateway.stopService)
        self.assertIsNotNone(self.service.port)

    def get(self, path):
        """(status, Content-Type, body) of GET path, asked by urllib in a thread."""
        from twisted.internet import threads

        url = "http://127.0.0.1:%d%s" % (self.service.port.getHost().port, path.decode("ascii"))

        def fetch():
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return response.status, response.headers["Content-Type"], response.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers["Content-Type"], e.read()

        return threads.deferToThread(fetch)

    def smtp_port(self, name):
        for child in self.gateway:
            if getattr(child, "listener", None) is not None and child.listener.name == name:
                return child.port.getHost().port

    @defer.inlineCallbacks
    def smtp_quit(self, port):
        """A real client on the loopback: banner, EHLO, QUIT (in a thread, with a deadline)."""
        from twisted.internet import threads
        import smtplib

        def talk():
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as c:
                c.ehlo()

        yield threads.deferToThread(talk)

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=10.0):
        deadline = self.reactor.seconds() + timeout
        while not predicate():
            if self.reactor.seconds() > deadline:
                self.fail("condition not met within %gs" % timeout)
            yield task.deferLater(self.reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_metrics_scraped_over_http(self):
        yield self.smtp_quit(self.smtp_port("relay"))
        yield self.wait_for(lambda: self.service.metrics.registry.get_sample_value(
            "mailgate_connections_open", {"listener": "relay"}) == 0)
        self.gateway.events.track("RECEIVE", listener="relay", latency=0.05)
        yield self.service.metrics.refresh_queue()
        status, content_type, body = yield self.get(b"/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(content_type, prometheus_client.CONTENT_TYPE_LATEST)
        s = parse(body.decode("utf-8"))
        self.assertEqual(value(s, "mailgate_connections_total", listener="relay"), 1)
        self.assertEqual(value(s, "mailgate_connections_open", listener="relay"), 0)
        self.assertEqual(value(s, "mailgate_connections_total", listener="submission"), 0)
        self.assertEqual(value(s, "mailgate_messages_received_total", listener="relay"), 1)
        self.assertEqual(value(s, "mailgate_accept_seconds_count"), 1)
        self.assertEqual(value(s, "mailgate_queue_messages", state="active"), 0)
        self.assertIn(("mailgate_build_info", (("version", "0.1.0"),)), s)

    @defer.inlineCallbacks
    def test_healthz(self):
        status, content_type, body = yield self.get(b"/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))
        self.assertEqual(content_type, "text/plain; charset=utf-8")

        # The spool cannot take messages: tmp/ is a file now (fails for root too).
        tmp = os.path.join(self.config.queue.path, "tmp")
        shutil.rmtree(tmp)
        with open(tmp, "w"):
            pass
        status, _, body = yield self.get(b"/healthz")
        self.assertEqual((status, body), (503, b"queue not writable\n"))
        self.flushLoggedErrors()

        os.remove(tmp)
        os.mkdir(tmp)
        status, _, body = yield self.get(b"/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))

        # A listener that is not bound.
        relay = [c for c in self.gateway if getattr(c, "name", None) == "listener:relay"][0]
        yield relay.stopService()
        status, _, body = yield self.get(b"/healthz")
        self.assertEqual((status, body), (503, b"listener relay not bound\n"))
        relay.startService()

    @defer.inlineCallbacks
    def test_healthz_with_a_queue_that_never_answers(self):
        class Stuck:
            def check_writable(self):
                return defer.Deferred()

        from mailgate.ops.metrics import health_problems

        self.gateway.queue = Stuck()
        clock = Clock()
        d = health_problems(self.gateway, clock, timeout=5)
        clock.advance(5)
        self.assertEqual((yield d), ["queue not writable: no answer within 5s"])

    @defer.inlineCallbacks
    def test_unknown_path_is_404(self):
        status, _, _ = yield self.get(b"/nothing")
        self.assertEqual(status, 404)


class ServiceTests(unittest.TestCase):
    def test_no_endpoint_no_port(self):
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        config = gateway_config(self, endpoint=None)
        gateway = build_service(config, reactor, run_in_thread=sync_runner, deliver=False)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway)
        service.startService()
        self.assertIsNone(service.port)
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(reactor.getDelayedCalls(), [])  # no queue refresh, no alerts
        service.stopService()

    def test_listens_on_the_injected_reactor(self):
        from twisted.internet.testing import MemoryReactorClock

        from tests.test_service import HeldRunner

        reactor = MemoryReactorClock()
        runner = HeldRunner()
        config = gateway_config(self, endpoint="tcp:9100:interface=127.0.0.1")
        gateway = build_service(config, reactor, run_in_thread=runner, deliver=False)
        gateway.startService()
        self.addCleanup(gateway.stopService)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway, queue_interval=15)
        service.startService()
        self.assertEqual(reactor.tcpServers[-1][0], 9100)
        self.assertEqual(reactor.tcpServers[-1][3], "127.0.0.1")
        # The queue gauges wait for the spool's recovery (the only job so far), then refresh.
        self.assertEqual([f.__name__ for _, f, _ in runner.jobs], ["_recover"])
        runner.run_all()
        self.assertEqual(len(reactor.getDelayedCalls()), 1)  # the next queue refresh
        self.assertEqual(service.metrics.registry.get_sample_value(
            "mailgate_queue_messages", {"state": "deferred"}), 0)
        service.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_alerts_run_without_an_endpoint(self):
        from twisted.internet.testing import MemoryReactorClock

        from mailgate.config import AlertsConfig

        reactor = MemoryReactorClock()
        config = attr.evolve(gateway_config(self, endpoint=None),
                             alerts=AlertsConfig(interval=10.0, queue_size=1000))
        gateway = build_service(config, reactor, run_in_thread=sync_runner, deliver=False)
        gateway.startService()
        self.addCleanup(gateway.stopService)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway)
        service.startService()
        self.assertEqual([call.getTime() for call in reactor.getDelayedCalls()], [10.0])
        reactor.advance(10)
        self.assertEqual(service.metrics.registry.get_sample_value(
            "mailgate_alert_active", {"alert": "queue_size"}), 0)
        self.assertEqual(service.metrics.registry.get_sample_value(
            "mailgate_queue_messages", {"state": "active"}), 0)
        service.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_metrics_made_before_the_gateway(self):
        """How build_service can wire it: one Metrics for the resolver and the service."""
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        config = gateway_config(self, endpoint=None)
        upstream = FakeResolver()
        gateway = build_service(config, reactor, run_in_thread=sync_runner, deliver=False,
                                resolver=upstream)
        metrics = Metrics(gateway.events, reactor)
        resolver = InstrumentedResolver(upstream, metrics, reactor)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway, metrics=metrics)
        self.assertIs(service.metrics, metrics)
        self.assertIs(metrics.queue, gateway.queue)
        resolver.lookupAddress("a.example")
        gateway.events.track("RECEIVE", listener="relay", latency=0.1)
        self.assertEqual(metrics.registry.get_sample_value("mailgate_messages_received_total",
                                                           {"listener": "relay"}), 1)
        self.assertEqual(metrics.registry.get_sample_value("mailgate_connections_open",
                                                           {"listener": "submission"}), 0)

    def test_port_in_use_is_a_config_error(self):
        import errno
        import socket

        from twisted.internet.error import CannotListenError
        from twisted.internet.testing import MemoryReactorClock

        class BusyReactor(MemoryReactorClock):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise CannotListenError(interface, port, socket.error(errno.EADDRINUSE, "in use"))

        reactor = BusyReactor()
        config = gateway_config(self, endpoint="tcp:9100")
        gateway = build_service(config, MemoryReactorClock(), run_in_thread=sync_runner, deliver=False)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway)
        error = self.assertRaises(ConfigError, service.startService)
        self.assertIn("[metrics] endpoint: cannot listen on tcp:9100", str(error))
        self.assertFalse(service.running)
        self.assertEqual(reactor.getDelayedCalls(), [])
