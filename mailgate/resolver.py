"""
The gateway's one DNS resolver, and address lookups on top of it.

make_resolver(dns_config, reactor) builds a twisted.names IResolver: a client.Resolver for the
configured nameservers (or, only when none are configured, the ones in /etc/resolv.conf) behind
a CachingResolver that keeps answers for their TTL.  Nothing here reads /etc/resolv.conf unless
asked to, and nothing imports the global reactor.

lookup_records(resolver, name, rtype) follows CNAMEs; lookup_addresses(resolver, name) is the
A and AAAA addresses of a name as strings, IPv4 first.  Failures are twisted.names errors:
DNSNameError (NXDOMAIN), DNSServerError (SERVFAIL), twisted.internet.defer.TimeoutError, ...;
describe_failure() turns one into a short text for logs and bounce messages.
"""

import ipaddress
import socket

from twisted.internet import base, defer, udp
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IResolver
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.names import client, common, dns, error
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()

RESOLV_CONF = "/etc/resolv.conf"
_MAX_CNAMES = 8  # CNAME links followed before giving up (a loop or a silly chain)


class CNAMEChainError(error.DomainError):
    """A CNAME loop, or a chain longer than we follow: a broken zone, treated as temporary."""


class _QuietUDPPort(udp.Port):
    """
    udp.Port without its two log lines a port ("... starting on N", "(UDP Port N Closed)"): the
    same steps as Twisted's _bindSocket and connectionLost, which log unconditionally (a test in
    tests/test_resolver.py notices when a Twisted release changes them).
    """

    def _bindSocket(self):
        try:
            skt = self.createInternetSocket()
            skt.bind((self.interface, self.port))
        except OSError as le:
            raise CannotListenError(self.interface, self.port, le)
        self._realPortNumber = skt.getsockname()[1]
        self.connected = 1
        self.socket = skt
        self.fileno = self.socket.fileno

    def connectionLost(self, reason=None):
        self._realPortNumber = None
        self.maxThroughput = -1
        base.BasePort.connectionLost(self, reason)
        self.protocol.doStop()
        self.socket.close()
        del self.socket
        del self.fileno


class _QuietUDP:
    """
    The reactor as client.Resolver sees it.  The resolver opens a UDP port of a random number for
    every query (source-port randomisation, the defence against cache poisoning, so it is kept),
    and Twisted logs two lines for each ("DNSDatagramProtocol starting on N", "(UDP Port N
    Closed)"): thousands a minute on a busy gateway.  On the posix reactors (all that run
    mailgate) the port is made quiet.  Everything else is the reactor's.
    """

    def __init__(self, reactor):
        self._reactor = reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if not isinstance(self._reactor, PosixReactorBase):
            return self._reactor.listenUDP(port, protocol, interface, maxPacketSize)
        p = _QuietUDPPort(port, protocol, interface, maxPacketSize, self._reactor)
        p.startListening()
        return p


def make_resolver(dns_config, reactor):
    """The shared IResolver for a mailgate.config.DNSConfig: client.Resolver behind a cache."""
    timeout = (dns_config.timeout,)  # one try per server; the queue owns the retries
    quiet = _QuietUDP(reactor)
    if dns_config.nameservers:
        servers = [(str(ip), int(port)) for ip, port in dns_config.nameservers]
        upstream = client.Resolver(servers=servers, resolv=None, reactor=quiet, timeout=timeout)
    else:
        upstream = client.Resolver(resolv=RESOLV_CONF, reactor=quiet, timeout=timeout)
    return CachingResolver(upstream, reactor)


class CachingResolver(common.ResolverBase):
    """
    Answers from upstream (an IResolver), kept for their TTL by clock (an IReactorTime).

    A positive answer is kept for its smallest TTL (at most max_ttl), with the TTLs it returns
    counted down.  A negative answer (NXDOMAIN, or NOERROR without records of the type asked
    for) is kept for the SOA's negative TTL (RFC 2308), at most negative_ttl, or negative_ttl
    without a SOA.  SERVFAIL, timeouts and other failures are never kept.  Expired entries are
    dropped when met and whenever the cache outgrows max_entries; no timers are left behind.

    twisted.names.cache.CacheResolver is not used: in a ResolverChain it is never filled (only
    twisted.names.server fills it), it schedules one reactor timer per entry (a dirty reactor in
    tests), and it keeps negative answers for no time at all.
    """

    def __init__(self, upstream, clock, max_ttl=86400, negative_ttl=300, max_entries=10000):
        common.ResolverBase.__init__(self)
        self.upstream = upstream
        self._clock = clock
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._cache = {}  # (name, cls, type) -> (stored at, expires at, result or exception)

    def _lookup(self, name, cls, type, timeout):
        if type in (dns.AXFR, dns.IXFR, dns.ALL_RECORDS):
            return self.upstream.query(dns.Query(name, type, cls), timeout)
        key = (name.lower().rstrip(b"."), cls, type)
        now = self._clock.seconds()
        entry = self._cache.get(key)
        if entry is not None:
            stored, expires, result = entry
            if now < expires:
                if isinstance(result, Exception):
                    return defer.fail(result.__class__(*result.args))  # a fresh one each time
                return defer.succeed(_aged(result, now - stored))
            del self._cache[key]
        d = self.upstream.query(dns.Query(name, type, cls), timeout)
        d.addCallbacks(self._store, self._store_failure, callbackArgs=(key,), errbackArgs=(key,))
        return d

    def _store(self, result, key):
        answers, authority, additional = result
        if answers:
            ttl = min(min(rr.ttl for rr in answers), self._max_ttl)
        else:
            ttl = self._negative(authority)
        self._put(key, ttl, result)
        return result

    def _store_failure(self, failure, key):
        if failure.check(error.DNSNameError):
            message = failure.value.args[0] if failure.value.args else None
            self._put(key, self._negative(getattr(message, "authority", ())), failure.value)
        return failure

    def _negative(self, authority):
        ttls = [min(rr.ttl, rr.payload.minimum) for rr in authority if rr.type == dns.SOA]
        return min(ttls + [self._negative_ttl])

    def _put(self, key, ttl, result):
        if ttl <= 0:
            return
        now = self._clock.seconds()
        if len(self._cache) >= self._max_entries:
            self._prune(now)
        self._cache[key] = (now, now + ttl, result)

    def _prune(self, now):
        for key in [key for key, entry in self._cache.items() if entry[1] <= now]:
            del self._cache[key]
        while len(self._cache) >= self._max_entries:  # still full: the oldest go first
            del self._cache[next(iter(self._cache))]

    def clear(self):
        self._cache.clear()


def _aged(result, elapsed):
    """A cached result with its TTLs counted down by elapsed seconds."""
    elapsed = int(elapsed)
    return tuple(
        [
            dns.RRHeader(
                rr.name.name, rr.type, rr.cls, max(rr.ttl - elapsed, 0), rr.payload, rr.auth
            )
            for rr in section
        ]
        for section in result
    )


# --- lookups ---------------------------------------------------------------------------------


def ip_literal(text):
    """
    The normalised IP address (str) that text spells, or None: "192.0.2.1", "2001:db8::1",
    and the bracketed forms "[192.0.2.1]", "[IPv6:2001:db8::1]" (RFC 5321 address literals).
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
            if "." in text and ":" not in text:
                return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


_LOOKUPS = {
    dns.A: "lookupAddress",
    dns.AAAA: "lookupIPV6Address",
    dns.MX: "lookupMailExchange",
    dns.TXT: "lookupText",
    dns.PTR: "lookupPointer",
    dns.NS: "lookupNameservers",
}


def lookup_records(resolver, name, rtype):
    """
    Deferred[list of (owner name bytes, record payload)]: the records of type rtype (dns.A,
    dns.MX, ...) of name, following CNAMEs (in the answer, or asked for again when the answer
    stops at one).  [] when name exists without such records; failures as the resolver's.
    """
    return defer.Deferred.fromCoroutine(_lookup_records(resolver, name, rtype))


async def _lookup_records(resolver, name, rtype):
    lookup = getattr(resolver, _LOOKUPS[rtype])
    chain = [_domain(name).lower()]  # every name met; the last is the one to ask about
    while True:
        asked = chain[-1]
        answers, _, _ = await lookup(asked)
        current = asked
        while True:
            here = [rr for rr in answers if rr.name.name.lower() == current]
            found = [rr for rr in here if rr.type == rtype]
            if found:
                return [(rr.name.name, rr.payload) for rr in found]
            cnames = [rr for rr in here if rr.type == dns.CNAME]
            if not cnames or rtype == dns.CNAME:
                break
            current = cnames[0].payload.name.name.lower()
            if current in chain or len(chain) > _MAX_CNAMES:
                raise CNAMEChainError("CNAME loop or chain too long at %r" % (current,))
            chain.append(current)
        if current == asked:
            return []
        # The answer stopped at a CNAME without the target's records: ask about the target.


def lookup_addresses(resolver, name):
    """
    Deferred[list of IP str]: the A then AAAA addresses of name, CNAMEs followed, duplicates
    dropped.  An IP literal ("192.0.2.1", "::1", "[IPv6:::1]") is its own answer, without DNS.

    When either lookup finds addresses, those are the answer (a failing AAAA lookup does not
    hide working IPv4).  Otherwise: a failure other than NXDOMAIN (timeout, SERVFAIL, ...) if
    there was one, else DNSNameError if both said NXDOMAIN, else [] (the name has no addresses).
    """
    literal = ip_literal(name)
    if literal is not None:
        return defer.succeed([literal])
    return defer.Deferred.fromCoroutine(_lookup_addresses(resolver, name))


async def _lookup_addresses(resolver, name):
    results = await defer.DeferredList(
        [
            defer.Deferred.fromCoroutine(_lookup_records(resolver, name, dns.A)),
            defer.Deferred.fromCoroutine(_lookup_records(resolver, name, dns.AAAA)),
        ],
        consumeErrors=True,
    )
    addresses = []
    for ok, value in results:
        if ok:
            for _, payload in value:
                address = _address_text(payload)
                if address not in addresses:
                    addresses.append(address)
    if addresses:
        return addresses
    failures = [value for ok, value in results if not ok]
    for failure in failures:
        if not failure.check(error.DNSNameError):
            failure.raiseException()
    if len(failures) == len(results):
        failures[0].raiseException()
    return []


def _address_text(payload):
    if payload.TYPE == dns.A:
        return socket.inet_ntop(socket.AF_INET, payload.address)
    return str(ipaddress.IPv6Address(payload.address))


def _domain(name):
    """
    A name as the bytes twisted.names asks for: IDNA-encoded, without a trailing dot; a name
    that cannot be one is DNSNameError (it cannot exist).
    """
    if isinstance(name, str):
        name = name[:-1] if name.endswith(".") else name
        try:
            name = name.encode("ascii") if name.isascii() else name.encode("idna")
        except UnicodeError as e:
            raise error.DNSNameError("not a valid domain name: %r (%s)" % (name, e)) from None
    return name[:-1] if name.endswith(b".") else name


def is_temporary(failure):
    """Whether a lookup failure may go away by itself (everything but NXDOMAIN)."""
    return not failure.check(error.DNSNameError)


def describe_failure(failure):
    """A short text for a lookup failure: "NXDOMAIN", "SERVFAIL", "timeout", ..."""
    for kind, text in (
        (error.DNSNameError, "NXDOMAIN"),
        (error.DNSServerError, "SERVFAIL"),
        (error.DNSQueryRefusedError, "REFUSED"),
        (error.DNSFormatError, "FORMERR"),
        (error.DNSNotImplementedError, "NOTIMP"),
        (defer.TimeoutError, "timeout"),
        (CNAMEChainError, "CNAME loop"),
        (error.DNSUnknownError, "unknown DNS error"),
    ):
        if failure.check(kind):
            return text
    return "%s: %s" % (failure.type.__name__, failure.getErrorMessage())


# --- timing every lookup ------------------------------------------------------------------------

_METHOD_TYPES = {method: dns.QUERY_TYPES.get(rtype) or dns.EXT_QUERIES.get(rtype) or str(rtype)
                 for rtype, method in common.typeToMethod.items()}


def _dns_error(failure):
    if failure.check(defer.CancelledError):
        return "cancelled"
    if failure.check(error.DNSNameError):
        return "nxdomain"
    if failure.check(error.DNSServerError):
        return "servfail"
    if failure.check(error.DNSQueryRefusedError):
        return "refused"
    if failure.check(defer.TimeoutError):  # DNSQueryTimeoutError is one
        return "timeout"
    return "other"


@implementer(IResolver)
class TimedResolver:
    """
    resolver (a twisted.names IResolver), with every lookup*, query and getHostByName call timed
    on clock and published on events as a "dns" event: type (the record type), seconds, and
    error (None, or nxdomain, servfail, refused, timeout, cancelled, other).  The metrics turn
    them into mailgate_dns_seconds and mailgate_dns_errors_total, in whichever process they run.
    The caller gets the wrapped resolver's own Deferred (cancelling it cancels the lookup).
    Anything else (e.g. clear()) is the wrapped resolver's.
    """

    def __init__(self, resolver, events, clock):
        self.resolver = resolver
        self.events = events
        self.clock = clock

    def __getattr__(self, name):
        if name == "resolver":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        target = getattr(self.resolver, name)
        if name.startswith("lookup") and callable(target):
            rtype = _METHOD_TYPES.get(name) or name[len("lookup"):].upper()
            return lambda *args, **kwargs: self._timed(rtype, target, *args, **kwargs)
        return target

    def query(self, query, timeout=None):
        rtype = dns.QUERY_TYPES.get(query.type) or dns.EXT_QUERIES.get(query.type) or str(query.type)
        return self._timed(rtype, self.resolver.query, query, timeout)

    def getHostByName(self, name, timeout=None, effort=10):
        return self._timed("A", self.resolver.getHostByName, name, timeout, effort)

    def _timed(self, rtype, call, *args, **kwargs):
        started = self.clock.seconds()
        try:
            d = call(*args, **kwargs)
        except Exception:
            d = defer.fail(Failure())
        if not isinstance(d, defer.Deferred):
            d = defer.succeed(d)

        def observe(result):
            error = _dns_error(result) if isinstance(result, Failure) else None
            self.events.emit("dns", type=rtype, seconds=max(0.0, self.clock.seconds() - started),
                             error=error)
            return result

        return d.addBoth(observe)


# Every IResolver lookup method is defined on the class (zope's verifyObject looks there).
for _name in IResolver.names():
    if _name.startswith("lookup") and not hasattr(TimedResolver, _name):
        def _make(name):
            def lookup(self, *args, **kwargs):
                return getattr(self, "__getattr__")(name)(*args, **kwargs)

            lookup.__name__ = name
            return lookup

        setattr(TimedResolver, _name, _make(_name))
del _name
