"""
Tests for mailgate.resolver (the shared resolver, its cache, address lookups) and for the
loopback DNS server in tests/dnsserver.py that they and other tests run against.

Every resolver here is pointed at a TestDNS on 127.0.0.1: nothing reaches the system resolver.
"""

import socket

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
from twisted.internet import defer, reactor, threads
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import client, common, dns as tdns, error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgate import resolver as resolver_module
from mailgate.config import DNSConfig
from mailgate.resolver import (
    CachingResolver, CNAMEChainError, describe_failure, ip_literal, is_temporary,
    lookup_addresses, lookup_records, make_resolver,
)
from tests.dnsserver import TestDNS


def example_zone():
    zone = TestDNS()
    zone.add("example.com", "MX", (10, "mx1.example.com"), ttl=300)
    zone.add("example.com", "MX", (20, "mx2.example.com"), ttl=300)
    zone.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    zone.add("mx1.example.com", "A", "127.0.0.2")
    zone.add("mx1.example.com", "AAAA", "::1")
    zone.add("mx2.example.com", "A", "127.0.0.3")
    zone.add("mx2.example.com", "A", "127.0.0.4")
    zone.add("www.example.com", "CNAME", "alias.example.com")
    zone.add("alias.example.com", "CNAME", "mx1.example.com")
    zone.add("deep.sub.example.com", "A", "127.0.0.9")
    zone.add("null.example", "MX", (0, "."))
    zone.add("long.example.com", "TXT", "v=DKIM1; k=rsa; p=" + "A" * 400)
    zone.add("parts.example.com", "TXT", ["v=spf1 ", "-all"])
    for i in range(4):  # four records: 800 bytes, too big for UDP without EDNS
        zone.add("big.example.com", "TXT", "%d%s" % (i, "x" * 200))
    zone.add("loop1.example.com", "CNAME", "loop2.example.com")
    zone.add("loop2.example.com", "CNAME", "loop1.example.com")
    zone.add("2.0.0.127.in-addr.arpa", "PTR", "mx1.example.com")
    zone.fail("broken.example.com", "SERVFAIL")
    zone.fail("refused.example.com", "REFUSED")
    zone.add("half.example.com", "A", "127.0.0.5")
    zone.fail("half.example.com", "SERVFAIL", rtype="AAAA")
    zone.add("gone.example.com", "A", "127.0.0.6")
    zone.nxdomain("gone.example.com")
    zone.hang("slow.example.com")
    return zone


# --- the loopback server, seen by an independent client (dnspython) ------------------------------


class ThreadedServerTests(SynchronousTestCase):
    """The thread variant, queried with dnspython: real DNS on the wire, no reactor."""

    host = "127.0.0.1"

    def setUp(self):
        self.zone = example_zone()
        self.zone.host = self.host
        self.port = self.zone.start_thread()
        self.addCleanup(self.zone.stop_thread)
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.nameservers = [self.host]
        self.resolver.port = self.port
        self.resolver.lifetime = 5.0
        self.resolver.retry_servfail = False

    def resolve(self, name, rtype):
        return self.resolver.resolve(name, rtype, search=False)

    def ask(self, name, rtype, timeout=5.0, tcp=False, **kwargs):
        query = dns.message.make_query(name, rtype, **kwargs)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(query, self.host, port=self.port, timeout=timeout)

    def test_mx(self):
        answer = self.resolve("example.com", "MX")
        found = sorted((r.preference, r.exchange.to_text()) for r in answer)
        self.assertEqual(found, [(10, "mx1.example.com."), (20, "mx2.example.com.")])
        self.assertEqual(answer.rrset.ttl, 300)

    def test_addresses(self):
        self.assertEqual([r.address for r in self.resolve("mx2.example.com", "A")],
                         ["127.0.0.3", "127.0.0.4"])
        self.assertEqual([r.address for r in self.resolve("MX1.Example.COM.", "AAAA")], ["::1"])

    def test_txt(self):
        self.assertEqual([r.strings for r in self.resolve("example.com", "TXT")],
                         [(b"v=spf1 ip4:192.0.2.0/24 -all",)])
        self.assertEqual([r.strings for r in self.resolve("parts.example.com", "TXT")],
                         [(b"v=spf1 ", b"-all")])
        strings = self.resolve("long.example.com", "TXT")[0].strings
        self.assertEqual([len(s) for s in strings], [255, 163])  # split into <= 255-byte strings
        self.assertEqual(b"".join(strings), b"v=DKIM1; k=rsa; p=" + b"A" * 400)

    def test_cname_chain(self):
        answer = self.resolve("www.example.com", "A")
        self.assertEqual(answer.canonical_name.to_text(), "mx1.example.com.")
        self.assertEqual([r.address for r in answer], ["127.0.0.2"])
        response = self.ask("www.example.com", "A")
        types = [dns.rdatatype.to_text(rrset.rdtype) for rrset in response.answer]
        self.assertEqual(types, ["CNAME", "CNAME", "A"])
        cname = self.resolve("www.example.com", "CNAME")
        self.assertEqual(cname[0].target.to_text(), "alias.example.com.")

    def test_null_mx(self):
        answer = self.resolve("null.example", "MX")
        self.assertEqual([(r.preference, r.exchange.to_text()) for r in answer], [(0, ".")])

    def test_ptr(self):
        answer = self.resolve("2.0.0.127.in-addr.arpa", "PTR")
        self.assertEqual(answer[0].target.to_text(), "mx1.example.com.")

    def test_nxdomain_has_soa(self):
        self.assertRaises(dns.resolver.NXDOMAIN, self.resolve, "nowhere.example.com", "A")
        response = self.ask("nowhere.example.com", "A")
        self.assertEqual(response.rcode(), dns.rcode.NXDOMAIN)
        self.assertEqual([rrset.rdtype for rrset in response.authority], [dns.rdatatype.SOA])
        self.assertEqual(response.authority[0][0].minimum, 60)

    def test_nodata(self):
        """The name exists with other types, or has names below it: NOERROR, no answer."""
        self.assertRaises(dns.resolver.NoAnswer, self.resolve, "mx2.example.com", "AAAA")
        self.assertRaises(dns.resolver.NoAnswer, self.resolve, "sub.example.com", "A")
        response = self.ask("mx2.example.com", "MX")
        self.assertEqual((response.rcode(), response.answer), (dns.rcode.NOERROR, []))
        self.assertEqual([rrset.rdtype for rrset in response.authority], [dns.rdatatype.SOA])

    def test_failures(self):
        self.assertEqual(self.ask("broken.example.com", "MX").rcode(), dns.rcode.SERVFAIL)
        self.assertEqual(self.ask("refused.example.com", "A").rcode(), dns.rcode.REFUSED)
        self.assertEqual(self.ask("gone.example.com", "A").rcode(), dns.rcode.NXDOMAIN)
        self.assertEqual(self.ask("half.example.com", "AAAA").rcode(), dns.rcode.SERVFAIL)
        self.assertEqual(self.ask("half.example.com", "A").rcode(), dns.rcode.NOERROR)

    def test_cname_loop_is_servfail(self):
        self.assertEqual(self.ask("loop1.example.com", "A").rcode(), dns.rcode.SERVFAIL)

    def test_hang(self):
        self.assertRaises(dns.exception.Timeout, self.ask, "slow.example.com", "A", timeout=0.05)
        self.assertEqual(self.zone.count("slow.example.com", "A"), 1)

    def test_truncation_and_tcp(self):
        response = self.ask("big.example.com", "TXT")
        self.assertTrue(response.flags & dns.flags.TC)
        self.assertEqual(response.answer, [])
        response = self.ask("big.example.com", "TXT", tcp=True)
        self.assertEqual(len(response.answer[0]), 4)
        # dnspython's resolver retries over TCP by itself; with EDNS it fits in UDP
        self.assertEqual(len(self.resolve("big.example.com", "TXT")), 4)
        response = self.ask("big.example.com", "TXT", use_edns=0, payload=1232)
        self.assertFalse(response.flags & dns.flags.TC)
        self.assertEqual(response.edns, 0)

    def test_changes_and_counts(self):
        self.zone.add("new.example.com", "A", "127.0.0.7")
        self.assertEqual([r.address for r in self.resolve("new.example.com", "A")], ["127.0.0.7"])
        self.zone.remove("new.example.com", "A")
        self.assertRaises(dns.resolver.NXDOMAIN, self.resolve, "new.example.com", "A")
        self.zone.restore("gone.example.com")
        self.assertEqual([r.address for r in self.resolve("gone.example.com", "A")], ["127.0.0.6"])
        self.assertEqual(self.zone.count("new.example.com"), 2)
        self.assertEqual(self.zone.count("new.example.com", "A"), 2)
        self.assertEqual(self.zone.count(rtype="MX"), 0)
        self.assertEqual(self.zone.queries[-1], ("gone.example.com", "A"))

    def test_garbage(self):
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(5)
        header = b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6  # one question, which is cut short
        sock.sendto(header + b"\x3fabc", (self.host, self.port))
        reply = dns.message.from_wire(sock.recv(4096))
        self.assertEqual((reply.id, reply.rcode()), (0x1234, dns.rcode.FORMERR))

    def test_stop(self):
        self.zone.stop_thread()
        self.assertRaises(dns.exception.Timeout, self.ask, "example.com", "MX", timeout=0.05)


class ThreadedServerIPv6Tests(ThreadedServerTests):
    host = "::1"


class ReactorServerTests(TestCase):
    """The reactor variant: dnspython talks to it from a thread while the reactor serves."""

    def setUp(self):
        self.zone = example_zone()
        self.port = self.zone.listen(reactor, self)

    def ask(self, name, rtype, tcp=False):
        query = dns.message.make_query(name, rtype)
        send = dns.query.tcp if tcp else dns.query.udp
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), send, query,
                                         "127.0.0.1", port=self.port, timeout=5)

    @defer.inlineCallbacks
    def test_udp_and_tcp(self):
        response = yield self.ask("example.com", "MX")
        self.assertEqual(sorted(r.preference for r in response.answer[0]), [10, 20])
        response = yield self.ask("big.example.com", "TXT")
        self.assertTrue(response.flags & dns.flags.TC)
        response = yield self.ask("big.example.com", "TXT", tcp=True)
        self.assertEqual(len(response.answer[0]), 4)
        self.assertEqual(self.zone.count("big.example.com", "TXT"), 2)


class ListenRetryTests(TestCase):
    @defer.inlineCallbacks
    def test_tcp_port_taken(self):
        """When the UDP port's number is taken for TCP, listen() tries another port."""
        taken = []

        class Busy:
            def __getattr__(self, name):
                return getattr(reactor, name)

            def listenTCP(self, port, factory, interface):
                if not taken:
                    taken.append(port)
                    raise CannotListenError(interface, port, OSError("in use"))
                return reactor.listenTCP(port, factory, interface=interface)

        zone = example_zone()
        port = zone.listen(Busy(), self)
        self.assertEqual(len(taken), 1)
        self.assertEqual(zone.address, ("127.0.0.1", port))
        resolver = make_resolver(DNSConfig(nameservers=(zone.address,), timeout=2), reactor)
        answers, _, _ = yield resolver.lookupMailExchange("example.com")
        self.assertEqual(len(answers), 2)


class ThreadedServerTwistedClientTests(TestCase):
    """The thread variant (as end-to-end tests run it), asked by mailgate's own resolver."""

    def setUp(self):
        self.zone = example_zone()
        self.zone.start_thread()
        self.addCleanup(self.zone.stop_thread)
        self.resolver = make_resolver(DNSConfig(nameservers=(self.zone.address,), timeout=2),
                                      reactor)

    @defer.inlineCallbacks
    def test_lookups(self):
        self.assertEqual((yield lookup_addresses(self.resolver, "www.example.com")),
                         ["127.0.0.2", "::1"])
        records = yield lookup_records(self.resolver, "example.com", tdns.MX)
        self.assertEqual(sorted(r.preference for _, r in records), [10, 20])
        yield self.assertFailure(self.resolver.lookupAddress("nowhere.example.com"),
                                 error.DNSNameError)

    def test_dnspython_resolver(self):
        answer = self.zone.dnspython_resolver().resolve("example.com", "TXT", search=False)
        self.assertEqual(answer[0].strings, (b"v=spf1 ip4:192.0.2.0/24 -all",))


# --- make_resolver and the cache, against the server on the test reactor ------------------------


class ResolverTests(TestCase):
    timeout = 0.2  # seconds a query waits for a server that never answers

    def setUp(self):
        self.zone = example_zone()
        port = self.zone.listen(reactor, self)
        self.config = DNSConfig(nameservers=(("127.0.0.1", port),), timeout=self.timeout)
        self.resolver = make_resolver(self.config, reactor)

    def test_configured_servers_only(self):
        """Only the configured servers: /etc/resolv.conf is not read, no timer is left."""
        upstream = self.resolver.upstream
        self.assertIsInstance(upstream, client.Resolver)
        self.assertEqual(upstream.servers, [("127.0.0.1", self.zone.port)])
        self.assertIsNone(upstream.resolv)
        self.assertEqual(upstream.dynServers, ())
        self.assertEqual(upstream.timeout, (self.timeout,))

    @defer.inlineCallbacks
    def test_queries_write_nothing_to_the_log(self):
        """Twisted's two lines per UDP query ("... starting on N", "(UDP Port N Closed)") are gone."""
        from twisted.logger import formatEvent, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for name in ("example.com", "mx1.example.com"):  # two queries, two ports
            yield self.resolver.lookupAddress(name)
        yield defer.succeed(None)
        lines = [formatEvent(event) for event in events]
        self.assertEqual([line for line in lines if "UDP" in line or "starting on" in line], [])
        self.assertGreaterEqual(len(self.zone.queries), 2)

    @defer.inlineCallbacks
    def test_mx(self):
        answers, authority, additional = yield self.resolver.lookupMailExchange("example.com")
        found = sorted((rr.payload.preference, rr.payload.name.name) for rr in answers)
        self.assertEqual(found, [(10, b"mx1.example.com"), (20, b"mx2.example.com")])
        self.assertEqual({rr.ttl for rr in answers}, {300})

    @defer.inlineCallbacks
    def test_address_lookups(self):
        answers, _, _ = yield self.resolver.lookupAddress("mx2.example.com")
        self.assertEqual([rr.payload.dottedQuad() for rr in answers], ["127.0.0.3", "127.0.0.4"])
        answers, _, _ = yield self.resolver.lookupIPV6Address("mx1.example.com")
        self.assertEqual([socket.inet_ntop(socket.AF_INET6, rr.payload.address) for rr in answers],
                         ["::1"])

    @defer.inlineCallbacks
    def test_txt(self):
        answers, _, _ = yield self.resolver.lookupText("long.example.com")
        self.assertEqual(b"".join(answers[0].payload.data), b"v=DKIM1; k=rsa; p=" + b"A" * 400)

    @defer.inlineCallbacks
    def test_txt_over_tcp(self):
        """A reply too big for UDP: the client asks again over TCP."""
        answers, _, _ = yield self.resolver.lookupText("big.example.com")
        self.assertEqual(len(answers), 4)
        self.assertEqual(self.zone.count("big.example.com", "TXT"), 2)
        yield self.close_tcp()

    def close_tcp(self):
        """Close the client's lasting TCP connections (the server waits for them to go)."""
        for connection in list(self.resolver.upstream.connections):
            connection.transport.loseConnection()
        return self.zone.stop_listening()

    @defer.inlineCallbacks
    def test_nxdomain(self):
        yield self.assertFailure(self.resolver.lookupAddress("nowhere.example.com"), error.DNSNameError)
        yield self.assertFailure(self.resolver.lookupAddress("gone.example.com"), error.DNSNameError)

    @defer.inlineCallbacks
    def test_servfail(self):
        yield self.assertFailure(self.resolver.lookupMailExchange("broken.example.com"),
                                 error.DNSServerError)
        yield self.assertFailure(self.resolver.lookupAddress("refused.example.com"),
                                 error.DNSQueryRefusedError)

    @defer.inlineCallbacks
    def test_timeout(self):
        started = reactor.seconds()
        yield self.assertFailure(self.resolver.lookupAddress("slow.example.com"), defer.TimeoutError)
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(self.zone.count("slow.example.com"), 1)  # one try: the queue retries

    @defer.inlineCallbacks
    def test_cache_hit(self):
        first, _, _ = yield self.resolver.lookupMailExchange("example.com")
        second, _, _ = yield self.resolver.lookupMailExchange("EXAMPLE.com.")
        self.assertEqual(self.zone.count("example.com", "MX"), 1)
        self.assertEqual([rr.payload for rr in first], [rr.payload for rr in second])
        yield self.resolver.lookupAddress("example.com")  # another type is another question
        self.assertEqual(self.zone.count("example.com"), 2)

    @defer.inlineCallbacks
    def test_negative_answers_cached(self):
        for attempt in range(2):
            yield self.assertFailure(self.resolver.lookupAddress("nowhere.example.com"),
                                     error.DNSNameError)
            answers, _, _ = yield self.resolver.lookupIPV6Address("mx2.example.com")
            self.assertEqual(answers, [])
        self.assertEqual(self.zone.count("nowhere.example.com"), 1)
        self.assertEqual(self.zone.count("mx2.example.com"), 1)

    @defer.inlineCallbacks
    def test_failures_not_cached(self):
        for attempt in range(2):
            yield self.assertFailure(self.resolver.lookupAddress("broken.example.com"),
                                     error.DNSServerError)
        self.assertEqual(self.zone.count("broken.example.com"), 2)


class ResolvConfTests(SynchronousTestCase):
    def test_system_servers_without_nameservers(self):
        """No nameservers: resolv.conf (here a copy, on a fake reactor: nothing is sent)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        self.patch(resolver_module, "RESOLV_CONF", path)
        fake = MemoryReactorClock()
        resolver = make_resolver(DNSConfig(timeout=2.0), fake)
        self.assertEqual(resolver.upstream.resolv, path)
        self.assertEqual(resolver.upstream.dynServers, [("127.0.0.1", 53)])
        self.assertEqual(resolver.upstream.timeout, (2.0,))
        self.assertEqual(fake.tcpClients, [])  # nothing sent (a MemoryReactor has no UDP at all)
        self.assertEqual(len(fake.getDelayedCalls()), 1)  # client.Resolver re-reads the file


class CacheClockTests(TestCase):
    """TTLs count down on an injected clock, while the server is real."""

    def setUp(self):
        self.zone = example_zone()
        self.zone.add("short.example.com", "A", "127.0.0.8", ttl=30)
        port = self.zone.listen(reactor, self)
        upstream = client.Resolver(servers=[("127.0.0.1", port)], resolv=None, reactor=reactor,
                                   timeout=(2,))
        self.clock = Clock()
        self.clock.advance(1000)
        self.resolver = CachingResolver(upstream, self.clock, negative_ttl=20)

    @defer.inlineCallbacks
    def test_ttl_expiry(self):
        yield self.resolver.lookupAddress("short.example.com")
        self.clock.advance(29.5)
        answers, _, _ = yield self.resolver.lookupAddress("short.example.com")
        self.assertEqual(answers[0].ttl, 1)  # counted down
        self.assertEqual(self.zone.count("short.example.com"), 1)
        self.clock.advance(0.5)
        answers, _, _ = yield self.resolver.lookupAddress("short.example.com")
        self.assertEqual(answers[0].ttl, 30)
        self.assertEqual(self.zone.count("short.example.com"), 2)

    @defer.inlineCallbacks
    def test_smallest_ttl_wins(self):
        self.zone.add("mixed.example.com", "A", "127.0.0.1", ttl=100)
        self.zone.add("mixed.example.com", "A", "127.0.0.2", ttl=10)
        yield self.resolver.lookupAddress("mixed.example.com")
        self.clock.advance(10)
        yield self.resolver.lookupAddress("mixed.example.com")
        self.assertEqual(self.zone.count("mixed.example.com"), 2)

    @defer.inlineCallbacks
    def test_negative_ttl(self):
        """Kept for the SOA's TTL (60 here) but no longer than negative_ttl (20)."""
        yield self.assertFailure(self.resolver.lookupAddress("nowhere.example.com"),
                                 error.DNSNameError)
        self.zone.add("nowhere.example.com", "A", "127.0.0.1")
        self.clock.advance(19)
        yield self.assertFailure(self.resolver.lookupAddress("nowhere.example.com"),
                                 error.DNSNameError)
        self.clock.advance(1)
        answers, _, _ = yield self.resolver.lookupAddress("nowhere.example.com")
        self.assertEqual(len(answers), 1)
        self.assertEqual(self.zone.count("nowhere.example.com"), 2)

    @defer.inlineCallbacks
    def test_zero_ttl_not_cached(self):
        self.zone.add("zero.example.com", "A", "127.0.0.1", ttl=0)
        yield self.resolver.lookupAddress("zero.example.com")
        yield self.resolver.lookupAddress("zero.example.com")
        self.assertEqual(self.zone.count("zero.example.com"), 2)

    @defer.inlineCallbacks
    def test_full_cache_drops_oldest(self):
        self.resolver._max_entries = 2
        for name in ("mx1.example.com", "mx2.example.com", "half.example.com", "mx1.example.com"):
            yield self.resolver.lookupAddress(name)
        self.assertEqual(self.zone.count("mx1.example.com"), 2)
        self.assertLessEqual(len(self.resolver._cache), 2)


# --- lookup_addresses and lookup_records --------------------------------------------------------


class LookupTests(TestCase):
    def setUp(self):
        self.zone = example_zone()
        port = self.zone.listen(reactor, self)
        self.resolver = make_resolver(DNSConfig(nameservers=(("127.0.0.1", port),), timeout=0.2),
                                      reactor)

    @defer.inlineCallbacks
    def test_ipv4_first(self):
        self.assertEqual((yield lookup_addresses(self.resolver, "mx1.example.com")),
                         ["127.0.0.2", "::1"])
        self.assertEqual((yield lookup_addresses(self.resolver, "mx2.example.com.")),
                         ["127.0.0.3", "127.0.0.4"])

    @defer.inlineCallbacks
    def test_cname_followed(self):
        self.assertEqual((yield lookup_addresses(self.resolver, "www.example.com")),
                         ["127.0.0.2", "::1"])
        records = yield lookup_records(self.resolver, "www.example.com", tdns.A)
        self.assertEqual([(owner, r.dottedQuad()) for owner, r in records],
                         [(b"mx1.example.com", "127.0.0.2")])

    @defer.inlineCallbacks
    def test_ip_literal_needs_no_dns(self):
        for literal, expected in [("192.0.2.1", "192.0.2.1"), ("[192.0.2.1]", "192.0.2.1"),
                                  ("2001:DB8::1", "2001:db8::1"), ("[IPv6:2001:db8::1]", "2001:db8::1"),
                                  ("::ffff:192.0.2.1", "192.0.2.1")]:
            self.assertEqual((yield lookup_addresses(self.resolver, literal)), [expected])
        self.assertEqual(self.zone.queries, [])

    @defer.inlineCallbacks
    def test_no_addresses(self):
        self.assertEqual((yield lookup_addresses(self.resolver, "example.com")), [])

    @defer.inlineCallbacks
    def test_nxdomain(self):
        yield self.assertFailure(lookup_addresses(self.resolver, "nowhere.example.com"),
                                 error.DNSNameError)

    @defer.inlineCallbacks
    def test_partial_failure(self):
        """A failing AAAA lookup does not hide the IPv4 addresses."""
        self.assertEqual((yield lookup_addresses(self.resolver, "half.example.com")), ["127.0.0.5"])

    @defer.inlineCallbacks
    def test_temporary_failure_wins_over_nxdomain(self):
        self.zone.add("odd.example.com", "TXT", "x")
        self.zone.fail("odd.example.com", "NXDOMAIN", rtype="A")
        self.zone.fail("odd.example.com", "SERVFAIL", rtype="AAAA")
        yield self.assertFailure(lookup_addresses(self.resolver, "odd.example.com"),
                                 error.DNSServerError)

    @defer.inlineCallbacks
    def test_timeout(self):
        yield self.assertFailure(lookup_addresses(self.resolver, "slow.example.com"),
                                 defer.TimeoutError)

    @defer.inlineCallbacks
    def test_cname_loop(self):
        yield self.assertFailure(lookup_addresses(self.resolver, "loop1.example.com"),
                                 error.DNSServerError)  # the server's verdict
        fake = FakeResolver({
            (b"a.test", tdns.A): [cname(b"a.test", b"b.test")],
            (b"b.test", tdns.A): [cname(b"b.test", b"a.test")],
        })
        yield self.assertFailure(lookup_records(fake, "a.test", tdns.A), CNAMEChainError)

    @defer.inlineCallbacks
    def test_cname_target_asked_for(self):
        """An answer that stops at a CNAME: the target is asked about."""
        fake = FakeResolver({
            (b"a.test", tdns.A): [cname(b"a.test", b"b.test")],
            (b"b.test", tdns.A): [address(b"b.test", "192.0.2.7")],
        })
        self.assertEqual((yield lookup_addresses(fake, "A.test")), ["192.0.2.7"])
        self.assertEqual(sorted(fake.asked),
                         [(b"a.test", tdns.A), (b"a.test", tdns.AAAA), (b"b.test", tdns.A)])

    @defer.inlineCallbacks
    def test_invalid_name(self):
        yield self.assertFailure(lookup_addresses(self.resolver, "bad..name\udcff"), error.DNSNameError)


class HelperTests(SynchronousTestCase):
    def test_ip_literal(self):
        self.assertEqual(ip_literal("[IPv6:::1]"), "::1")
        self.assertEqual(ip_literal("[ipv6:2001:db8::1]"), "2001:db8::1")
        self.assertIsNone(ip_literal("[IPv6:192.0.2.1]"))
        self.assertIsNone(ip_literal("example.com"))
        self.assertIsNone(ip_literal("[tag:stuff]"))
        self.assertEqual(ip_literal(b"127.0.0.1"), "127.0.0.1")

    def test_describe_failure(self):
        cases = [
            (error.DNSNameError(), "NXDOMAIN", False),
            (error.DNSServerError(), "SERVFAIL", True),
            (defer.TimeoutError(), "timeout", True),
            (error.DNSQueryRefusedError(), "REFUSED", True),
            (CNAMEChainError(), "CNAME loop", True),
            (ValueError("x"), "ValueError: x", True),
        ]
        for exception, text, temporary in cases:
            self.assertEqual(describe_failure(Failure(exception)), text)
            self.assertEqual(is_temporary(Failure(exception)), temporary)


class FakeResolver(common.ResolverBase):
    """Canned answers by (name, type); anything else is NOERROR without records."""

    def __init__(self, answers):
        common.ResolverBase.__init__(self)
        self.answers = answers
        self.asked = []

    def _lookup(self, name, cls, type, timeout):
        self.asked.append((name, type))
        return defer.succeed((self.answers.get((name, type), []), [], []))


def cname(owner, target):
    return tdns.RRHeader(owner, tdns.CNAME, tdns.IN, 60, tdns.Record_CNAME(target, 60))


def address(owner, ip):
    return tdns.RRHeader(owner, tdns.A, tdns.IN, 60, tdns.Record_A(ip, 60))
