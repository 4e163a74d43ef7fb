"""
mailgate.ops.metrics: counters from events (emitted on a bus, or by a real listener session and filter
chain), the queue gauges and the DNS wrapper.  tests/ops/test_httpd.py serves them over HTTP.
"""


import attr
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns, error as dnserror
from twisted.trial import unittest

from mailgate.envelope import Address, Envelope
from mailgate.events import EventBus
from mailgate.filters import FilterContext
from mailgate.filters.chain import FilterChain
from mailgate.ops.metrics import InstrumentedResolver, Metrics, QueueSnapshot, reject_reason
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


    def test_limit_refusals_by_limit(self):
        """Real sessions over limits across sessions: each refusal is counted under its name."""
        from mailgate.config import Limits, Rate
        from mailgate.smtp.anvil import Anvil

        anvil = Anvil(self.clock)
        config = listener(name="relay", tls="none", auth="none", limits=Limits(
            max_connections_per_ip=1, message_rate_per_ip=Rate(1, 3600.0), limit_exempt_ips=()))

        def session():
            s = Session(config, clock=self.clock, events=self.bus)
            s.factory.anvil = anvil
            s.proto = s.factory.buildProtocol(None)
            s.transport.clear()
            s.proto.makeConnection(s.transport)
            return s

        s = session()
        self.assertEqual(session().read(), "421 4.7.0 mx.example.net Too many connections\r\n")
        s.read()
        s.cmd("EHLO c.example")
        self.assertTrue(send_message(s).startswith("250 2.0.0"))
        self.assertEqual(s.cmd("MAIL FROM:<a@remote.example>"),
                         "450 4.7.1 Too much mail from 192.0.2.10, try again later\r\n")
        samples = scrape(self.metrics)
        self.assertEqual(value(samples, "mailgate_limit_refusals_total",
                               limit="max_connections_per_ip"), 1)
        self.assertEqual(value(samples, "mailgate_limit_refusals_total",
                               limit="message_rate_per_ip"), 1)
        self.assertEqual(value(samples, "mailgate_messages_rejected_total", listener="relay",
                               stage="MAIL", severity="temporary", reason="denied"), 1)


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
