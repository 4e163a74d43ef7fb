"""
Synchronous DNS for the synchronous libraries (pyspf, dkimpy), answered by the gateway's one
Twisted resolver (mailgate.resolver: configured servers only, TTL cache).

pyspf and dkimpy block, so the filters run them in the thread pool.  From there, DNSBridge sends
each question to the reactor thread, asks the shared IResolver (mailgate.resolver.lookup_records,
which follows CNAMEs) and waits for the answer, then hands it over in the shape each library
expects:

* pyspf: BridgedSPFQuery, a subclass of spf.query whose dns() method asks the bridge.  Only this
  query object is affected: the module-global spf.DNSLookup (and dnspython's default resolver)
  are never used nor replaced, so two gateways in one process cannot interfere.  Answers are
  ((name, type), value) pairs as spf.DNSLookup returns them (TXT values are lists of bytes
  strings); NXDOMAIN and "no records of that type" are [] (a void lookup); every other failure
  (timeout, SERVFAIL, REFUSED, a CNAME loop) is spf.TempError.  The RFC 7208 4.6.4 limits are
  held by the subclass itself (10 DNS-querying terms, 2 void lookups, a 20 s budget for the whole
  check), whatever the module globals say.
* dkimpy: DNSBridge.dkim_txt(name, timeout=5) is a dnsfunc: the key record's bytes (the strings of
  the first TXT record, joined), None when there is none, dkim.DnsTimeoutError on a temporary
  failure.

Waiting is bounded: the reactor side gives up after the lookup's timeout, and the pool thread
stops waiting a little later even if the reactor never answers (e.g. it is shutting down and
joining the pool), so no pool thread blocks forever.  Calling the bridge from the reactor thread
would deadlock and raises RuntimeError instead.
"""

import ipaddress
import queue
import re
import time

import dkim
import spf as pyspf
from twisted.internet import defer
from twisted.names import dns, error
from twisted.python import failure, threadable

from mailgate import resolver as resolvers

TYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "PTR": dns.PTR,
}

DEFAULT_TIMEOUT = 20.0  # per lookup, when neither the caller nor the config says
_GRACE = 1.0  # seconds the pool thread waits beyond the reactor side's own timeout

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def normalize_domain(text):
    """
    A domain (str or bytes) as DNS asks for it: lower case, A-labels, no trailing dot; None when it
    cannot be one (empty, an address literal, a bad label, over 253 octets).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    name = (text or "").strip().lower()
    name = name[:-1] if name.endswith(".") else name
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not 0 < len(name) <= 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


class TemporaryLookupError(Exception):
    """A lookup that may succeed later: timeout, SERVFAIL, REFUSED, CNAME loop, ..."""


def context_value(context, name, default=None):
    """An entry of the chain's filter context, whether it is an object or a mapping."""
    if isinstance(context, dict):
        return context.get(name, default)
    return getattr(context, name, default)


def bridge_from_context(context):
    """The DNSBridge for a filter context (its reactor, resolver and [dns] timeout)."""
    config = context_value(context, "config")
    dns_config = getattr(config, "dns", None)
    # The resolver gives up after its own [dns] timeout; the bridge's bound is a backstop above it.
    timeout = getattr(dns_config, "timeout", None)
    timeout = timeout + _GRACE if timeout else DEFAULT_TIMEOUT
    return DNSBridge(context_value(context, "reactor"), context_value(context, "resolver"),
                     timeout=timeout)


class DNSBridge:
    """
    Blocking lookups through a Twisted IResolver, for code running in a pool thread.

    reactor: the reactor the resolver runs on; resolver: the gateway's IResolver; timeout: the
    longest a lookup may take when the caller gives no timeout (seconds).
    """

    def __init__(self, reactor, resolver, timeout=DEFAULT_TIMEOUT):
        self.reactor = reactor
        self.resolver = resolver
        self.timeout = timeout

    # --- the generic lookup -------------------------------------------------------------------

    def lookup(self, name, rtype, timeout=None):
        """
        The records of type rtype ("A", "AAAA", "MX", "TXT", "PTR") of name (str or bytes, a
        trailing dot allowed), CNAMEs followed, as twisted.names payloads: [] when the name does
        not exist or has no such records, TemporaryLookupError for every other failure.  Must be
        called from a thread other than the reactor's.
        """
        if threadable.isInIOThread():
            raise RuntimeError("DNSBridge.lookup blocks: call it from a pool thread")
        code = TYPES[rtype]
        if isinstance(name, bytes):
            try:
                name = name.decode("ascii")
            except UnicodeDecodeError:
                return []  # not a name DNS can hold (DKIM d= and s= are ASCII): none
        timeout = self.timeout if timeout is None else max(float(timeout), 0.001)
        try:
            records = self._wait(self._start, (name, code, timeout), timeout + _GRACE)
        except error.DNSNameError:
            return []
        except TemporaryLookupError:
            raise
        except Exception as e:
            raise TemporaryLookupError(
                "%s/%s: %s" % (name, rtype, resolvers.describe_failure(failure.Failure(e)))
            ) from None
        return [payload for _, payload in records if payload.TYPE == code]

    def _start(self, name, code, timeout):
        """On the reactor thread: the lookup, bounded by timeout."""
        d = resolvers.lookup_records(self.resolver, name, code)
        d.addTimeout(timeout, self.reactor)
        return d

    def _wait(self, f, args, wait):
        """
        Run f(*args) on the reactor thread and wait (at most wait seconds) for its result, as
        twisted.internet.threads.blockingCallFromThread does, but never forever.
        """
        results = queue.Queue()

        def run():
            defer.maybeDeferred(f, *args).addBoth(results.put)

        self.reactor.callFromThread(run)
        try:
            result = results.get(timeout=wait)
        except queue.Empty:
            raise TemporaryLookupError("%s: no answer from the reactor in %.1fs" % (args[0], wait))
        if isinstance(result, failure.Failure):
            result.raiseException()
        return result

    # --- pyspf ----------------------------------------------------------------------------------

    def spf_lookup(self, name, qtype, timeout=None):
        """
        What spf.DNSLookup returns: [((name, qtype), value)], with A/AAAA values as address
        text, MX as (preference, exchange), PTR as a name, TXT as a
        list of bytes strings.  [] for NXDOMAIN or no records (and for type SPF, which RFC 7208
        3.1 retired); spf.TempError for the rest.
        """
        rtype = qtype
        if rtype not in TYPES:  # "SPF" (type 99, obsolete: RFC 7208 3.1), asked in harsh mode only
            return []
        try:
            payloads = self.lookup(name, rtype, timeout)
        except TemporaryLookupError as e:
            raise pyspf.TempError("DNS %s" % (e,)) from None
        return [((name, qtype), _spf_value(rtype, payload)) for payload in payloads]

    def spf_query(self, i, s, h, local=None, domain=None, **kwargs):
        """
        A pyspf query (call .check() on it, in a pool thread) whose lookups use this bridge.  local
        and domain, when given, are the sender's parts as the SMTP parser split them (pyspf splits
        s at its first "@", which is wrong for a quoted local part holding one).
        """
        query = BridgedSPFQuery(i, s, h, bridge=self, **kwargs)
        if domain is not None:
            query.l = local or "postmaster"
            query.o = query.d = domain
        return query

    # --- dkimpy ---------------------------------------------------------------------------------

    def dkim_txt(self, name, timeout=5):
        """
        A dkimpy dnsfunc: the first TXT record of name (bytes, its strings joined), None when
        there is none, dkim.DnsTimeoutError when the lookup failed for now.
        """
        try:
            payloads = self.lookup(name, "TXT", timeout)
        except TemporaryLookupError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        for payload in payloads:
            return b"".join(payload.data)
        return None


def _spf_value(rtype, payload):
    if rtype == "A":
        return payload.dottedQuad()
    if rtype == "AAAA":
        return str(ipaddress.IPv6Address(payload.address))
    if rtype == "MX":
        return (payload.preference, payload.name.name.decode("ascii", "replace"))
    if rtype == "PTR":
        return payload.name.name.decode("ascii", "replace")
    return list(payload.data)  # TXT: the character strings, as bytes


class BridgedSPFQuery(pyspf.query):
    """
    spf.query asking its questions through a DNSBridge instead of spf.DNSLookup.

    It keeps pyspf's per-query cache and its result semantics, and holds the RFC 7208 4.6.4
    processing limits itself: more than MAX_LOOKUPS DNS-querying terms or more than
    MAX_VOID_LOOKUPS void lookups is a permerror, and the whole check gets at most budget seconds
    (then a temperror).  Each lookup waits at most lookup_timeout seconds (default: the bridge's).
    """

    MAX_LOOKUPS = 10
    MAX_VOID_LOOKUPS = 2
    BUDGET = 20.0  # RFC 7208 4.6.4: "at least 20 seconds" for the whole evaluation

    def __init__(self, i, s, h, bridge, budget=None, lookup_timeout=None, **kwargs):
        kwargs.setdefault("strict", True)  # the limits are errors, not notes
        pyspf.query.__init__(self, i, s, h, **kwargs)
        self.bridge = bridge
        self.budget = self.BUDGET if budget is None else budget
        self.lookup_timeout = bridge.timeout if lookup_timeout is None else lookup_timeout
        self._deadline = None

    def check(self, spf=None):
        self._deadline = time.monotonic() + self.budget
        return super().check(spf)

    def check_lookups(self):
        self.lookups = self.lookups + 1
        if self.lookups > self.MAX_LOOKUPS:
            raise pyspf.PermError("Too many DNS lookups")

    def dns(self, name, qtype, cnames=None, ignore_void=False):
        """
        pyspf's DNS hook: the values of the qtype records of name ([] for none), answered from
        this query's cache or through the bridge, counting void lookups.
        """
        if not name:
            raise Exception("Invalid query")
        name = str(name)
        if name.endswith("."):
            name = name[:-1]
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # not a DNS name (empty or over-long label): nothing to find
        name = name.lower()
        key = (name, qtype)
        if key in self.cache:
            result = self.cache[key]
        else:
            if self._deadline is None:  # dns() called outside check(): the budget starts now
                self._deadline = time.monotonic() + self.budget
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise pyspf.TempError("DNS Error: exceeded max query lookup time")
            timeout = min(self.lookup_timeout, left)
            result = [value for _, value in self.bridge.spf_lookup(name, qtype, timeout)]
            self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > self.MAX_VOID_LOOKUPS:
                raise pyspf.PermError("Void lookup limit of %d exceeded" % self.MAX_VOID_LOOKUPS)
        return list(result)

