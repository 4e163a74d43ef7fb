"""
Tests for mailgate.filters.dnsbridge: pyspf's and dkimpy's blocking lookups answered by the gateway's
Twisted resolver, asked from a pool thread, against the loopback DNS server on the test reactor.

Nothing here (nor in the SPF, DKIM and DMARC tests, which use the helpers below) may reach the
system resolver: every resolver is pointed at a TestDNS on 127.0.0.1, and forbid_system_dns()
makes any use of pyspf's or dnspython's own lookups fail the test.
"""

import functools
import threading
import time

import dkim
import dns.resolver
import spf
from twisted.internet import defer, reactor, threads
from twisted.names import common
from twisted.trial.unittest import TestCase

from mailgate.config import DNSConfig
from mailgate.filters.dnsbridge import (
    BridgedSPFQuery, DNSBridge, TemporaryLookupError, bridge_from_context, context_value,
    normalize_domain,
)
from mailgate.envelope import Address
from mailgate.resolver import make_resolver
from tests.dnsserver import TestDNS

# --- helpers shared with test_spf, test_dkimverify and test_dmarc ------------------------------


def forbid_system_dns(test):
    """
    Make every way pyspf, dkimpy and dnspython have of asking the system's resolver raise, for
    the duration of test; at cleanup the test fails if anything tried.
    """
    attempts = []

    def forbidden(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("system DNS resolver used: %r" % (args,))

    test.patch(spf, "DNSLookup", forbidden)
    test.patch(dns.resolver, "query", forbidden)
    test.patch(dns.resolver, "resolve", forbidden)
    test.patch(dns.resolver, "get_default_resolver", forbidden)
    test.patch(dkim.dnsplug, "get_txt", forbidden)

    def check():
        if attempts:
            raise AssertionError("the system resolver was asked: %r" % (attempts,))

    test.addCleanup(check)


def serve(test, zone, timeout=2.0):
    """Serve zone on the test reactor; the gateway's resolver (with its cache) pointed at it."""
    zone.listen(reactor, test)
    return make_resolver(DNSConfig(nameservers=(zone.address,), timeout=timeout), reactor)


def run_in_thread(f, *args):
    """What the chain gives filters: run f in the reactor's thread pool."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


class FakeSession:
    """What the filters read of mailgate.session.Session."""

    def __init__(self, client_ip="192.0.2.10", helo="mail.sender.test", relay_allowed=False,
                 sender=None):
        self.id = "S1"
        self.client_ip = client_ip
        self.helo = helo
        self.relay_allowed = relay_allowed
        self.sender = sender
        self.transaction = {}

    @property
    def auth_results(self):
        return self.transaction.get("auth_results", [])


def sender(text):
    """A mailgate.envelope.Address from "local@domain" ("" for the null sender)."""
    if not text:
        return Address("", "")
    local, domain = text.rsplit("@", 1)
    return Address(local, domain.lower())


# --- the tests ---------------------------------------------------------------------------------


def bridge_zone():
    zone = TestDNS()
    zone.add("host.bridge.test", "A", "192.0.2.1")
    zone.add("host.bridge.test", "A", "192.0.2.2")
    zone.add("host.bridge.test", "AAAA", "2001:db8::1")
    zone.add("bridge.test", "MX", (10, "host.bridge.test"))
    zone.add("bridge.test", "MX", (20, "mx2.bridge.test"))
    zone.add("bridge.test", "TXT", ["v=spf1 ", "ip4:192.0.2.0/24 -all"])
    zone.add("bridge.test", "TXT", "other")
    zone.add("alias.bridge.test", "CNAME", "host.bridge.test")
    zone.add("1.2.0.192.in-addr.arpa", "PTR", "host.bridge.test")
    zone.add("sel._domainkey.bridge.test", "TXT", "v=DKIM1; k=rsa; p=" + "A" * 400)
    zone.fail("broken.bridge.test", "SERVFAIL")
    zone.fail("refused.bridge.test", "REFUSED")
    zone.hang("slow.bridge.test")
    return zone


class BridgeTests(TestCase):
    def setUp(self):
        forbid_system_dns(self)
        self.zone = bridge_zone()
        self.resolver = serve(self, self.zone, timeout=0.3)
        self.bridge = DNSBridge(reactor, self.resolver, timeout=2.0)

    def in_thread(self, f, *args, **kwargs):
        return run_in_thread(functools.partial(f, *args, **kwargs))

    @defer.inlineCallbacks
    def test_spf_shapes(self):
        """((name, type), value) pairs as spf.DNSLookup returns them."""
        look = self.bridge.spf_lookup
        self.assertEqual(
            (yield self.in_thread(look, "host.bridge.test", "A")),
            [(("host.bridge.test", "A"), "192.0.2.1"), (("host.bridge.test", "A"), "192.0.2.2")],
        )
        self.assertEqual((yield self.in_thread(look, "host.bridge.test", "AAAA")),
                         [(("host.bridge.test", "AAAA"), "2001:db8::1")])
        mx = yield self.in_thread(look, "bridge.test", "MX")
        self.assertEqual(sorted(v for _, v in mx),
                         [(10, "host.bridge.test"), (20, "mx2.bridge.test")])
        txt = yield self.in_thread(look, "bridge.test", "TXT")
        self.assertEqual(sorted(v for _, v in txt),
                         [[b"other"], [b"v=spf1 ", b"ip4:192.0.2.0/24 -all"]])
        self.assertTrue(all(isinstance(s, bytes) for _, v in txt for s in v))
        self.assertEqual((yield self.in_thread(look, "1.2.0.192.in-addr.arpa", "PTR")),
                         [(("1.2.0.192.in-addr.arpa", "PTR"), "host.bridge.test")])

    @defer.inlineCallbacks
    def test_cname_followed(self):
        """Answers are under the name asked about, CNAMEs followed (as dnspython's are)."""
        self.assertEqual(
            (yield self.in_thread(self.bridge.spf_lookup, "alias.bridge.test", "A")),
            [(("alias.bridge.test", "A"), "192.0.2.1"), (("alias.bridge.test", "A"), "192.0.2.2")],
        )

    @defer.inlineCallbacks
    def test_void(self):
        """NXDOMAIN and no records of the type: [] (a void lookup for pyspf)."""
        self.assertEqual((yield self.in_thread(self.bridge.spf_lookup, "nx.bridge.test", "A")), [])
        self.assertEqual((yield self.in_thread(self.bridge.spf_lookup, "bridge.test", "A")), [])
        self.assertEqual((yield self.in_thread(self.bridge.spf_lookup, "bridge.test", "SPF")), [])

    @defer.inlineCallbacks
    def test_spf_temperror(self):
        """SERVFAIL, REFUSED and timeouts are spf.TempError."""
        for name in ("broken.bridge.test", "refused.bridge.test", "slow.bridge.test"):
            d = self.in_thread(self.bridge.spf_lookup, name, "TXT")
            e = yield self.assertFailure(d, spf.TempError)
            self.assertIn(name, str(e))

    @defer.inlineCallbacks
    def test_spf_lookup_timeout_bounds_wait(self):
        """The caller's timeout bounds the lookup even when the resolver would wait longer."""
        pending = []

        class Waiting(common.ResolverBase):
            def _lookup(self, name, cls, type, timeout):
                d = defer.Deferred(lambda d: pending.remove(d))
                pending.append(d)
                return d

        bridge = DNSBridge(reactor, Waiting(), timeout=30)
        started = time.monotonic()
        d = self.in_thread(bridge.spf_lookup, "slow.bridge.test", "TXT", 0.2)
        e = yield self.assertFailure(d, spf.TempError)
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("timeout", str(e))
        self.assertEqual(pending, [])  # the resolver's lookup was cancelled, not left behind

    @defer.inlineCallbacks
    def test_dkim_txt(self):
        txt = self.bridge.dkim_txt
        value = yield self.in_thread(txt, b"sel._domainkey.bridge.test.", timeout=5)
        self.assertEqual(value, b"v=DKIM1; k=rsa; p=" + b"A" * 400)  # the strings joined
        self.assertIsNone((yield self.in_thread(txt, b"nx._domainkey.bridge.test.")))
        self.assertIsNone((yield self.in_thread(txt, b"h\xe9._domainkey.bridge.test.")))
        for name in (b"broken.bridge.test.", b"slow.bridge.test."):
            yield self.assertFailure(self.in_thread(self.bridge.dkim_txt, name, timeout=1),
                                     dkim.DnsTimeoutError)

    @defer.inlineCallbacks
    def test_shared_cache(self):
        """Lookups go through the gateway's resolver and its TTL cache."""
        for _ in range(3):
            yield self.in_thread(self.bridge.spf_lookup, "bridge.test", "TXT")
        yield self.resolver.lookupText("bridge.test")
        self.assertEqual(self.zone.count("bridge.test", "TXT"), 1)

    def test_not_on_reactor_thread(self):
        """Blocking on the reactor thread would deadlock: refused."""
        self.assertRaises(RuntimeError, self.bridge.lookup, "bridge.test", "TXT")

    @defer.inlineCallbacks
    def test_reactor_never_answers(self):
        """A pool thread never waits forever, even when the reactor does not run the call."""

        class Silent:
            def callFromThread(self, f, *args):
                pass

        bridge = DNSBridge(Silent(), self.resolver, timeout=0.05)
        started = time.monotonic()
        yield self.assertFailure(self.in_thread(bridge.lookup, "bridge.test", "TXT"),
                                 TemporaryLookupError)
        self.assertLess(time.monotonic() - started, 5)

    @defer.inlineCallbacks
    def test_spf_query_uses_bridge(self):
        query = self.bridge.spf_query("192.0.2.1", "someone@bridge.test", "helo.bridge.test")
        self.assertIsInstance(query, BridgedSPFQuery)
        result = yield self.in_thread(query.check)
        self.assertEqual(result[0], "pass")
        self.assertEqual(self.zone.count("bridge.test", "TXT"), 1)

    @defer.inlineCallbacks
    def test_quoted_local_part(self):
        """The domain as the SMTP parser split it, not at the first "@" of a quoted local part."""
        query = self.bridge.spf_query("192.0.2.1", '"a@b"@bridge.test', "helo.bridge.test",
                                      local='"a@b"', domain="bridge.test")
        result = yield self.in_thread(query.check)
        self.assertEqual(result[0], "pass")

    @defer.inlineCallbacks
    def test_two_gateways(self):
        """
        Two bridges (two resolvers, two zones) in one process, queried at the same time from
        several threads: each query sees its own zone only; pyspf's globals are untouched.
        """
        before = spf.DNSLookup
        other = TestDNS()
        other.add("bridge.test", "TXT", "v=spf1 -all")
        bridge2 = DNSBridge(reactor, serve(self, other), timeout=2.0)
        start = threading.Barrier(8)

        def check(bridge):
            start.wait(5)
            return bridge.spf_query("192.0.2.1", "x@bridge.test", "h.test").check()[0]

        results = yield defer.gatherResults(
            [run_in_thread(check, b) for b in [self.bridge, bridge2] * 4]
        )
        self.assertEqual(results, ["pass", "fail"] * 4)
        self.assertIs(spf.DNSLookup, before)

    def test_limits(self):
        """RFC 7208 4.6.4 limits, held by the query class whatever pyspf's globals say."""
        self.assertEqual((BridgedSPFQuery.MAX_LOOKUPS, BridgedSPFQuery.MAX_VOID_LOOKUPS), (10, 2))
        self.assertEqual((spf.MAX_LOOKUP, spf.MAX_VOID_LOOKUPS), (10, 2))
        query = self.bridge.spf_query("192.0.2.1", "x@bridge.test", "h.test")
        self.assertTrue(query.strict)
        self.assertGreaterEqual(query.budget, 20)


class HelperTests(TestCase):
    def test_normalize_domain(self):
        self.assertEqual(normalize_domain("Example.COM."), "example.com")
        self.assertEqual(normalize_domain(b"a.test"), "a.test")
        self.assertEqual(normalize_domain("b\xfccher.test"), "xn--bcher-kva.test")
        self.assertEqual(normalize_domain("_dmarc.a.test"), "_dmarc.a.test")
        for bad in ("", ".", "[192.0.2.1]", "a..test", "-a.test", "a b.test", "x" * 64 + ".test"):
            self.assertIsNone(normalize_domain(bad), bad)

    def test_context(self):
        class Config:
            dns = DNSConfig(timeout=1.5)

        for context in ({"config": Config(), "reactor": reactor, "resolver": "R"},
                        type("Context", (), {"config": Config(), "reactor": reactor,
                                             "resolver": "R"})()):
            bridge = bridge_from_context(context)
            self.assertEqual((bridge.reactor, bridge.resolver, bridge.timeout),
                             (reactor, "R", 2.5))
            self.assertIsNone(context_value(context, "missing"))
