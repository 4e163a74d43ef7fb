"""
Next hops: which route a recipient domain takes, and where that route delivers it.

Router.route_for(domain) picks the RouteConfig; Router.hops(route, domain) is a Deferred list of
mailgate.envelope.Hop to try in order, or a RoutingError saying whether to bounce or to defer.
Smarthost routes go to their hosts in the configured order; MX routes follow RFC 5321 5.1 (MX by
preference, equal ones shuffled, implicit MX, RFC 7505 null MX) and never deliver to ourselves:
MX records at or above our own preference are dropped (we are ourselves one of them by name, or
by an address we listen on), and a route that leaves nothing else bounces as a mail loop (5.4.6).

Pure apart from the injected resolver (an IResolver, see mailgate.resolver): no sockets, no clock.
"""

import ipaddress
import random as _random

from twisted.internet import defer
from twisted.names import dns, error
from twisted.python.failure import Failure

from mailgate.envelope import Hop
from mailgate.errors import RoutingError
from mailgate.idn import a_label
from mailgate.resolver import describe_failure, ip_literal, lookup_addresses, lookup_records

_LOOPBACKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _normalise(domain):
    """Lower case, no trailing dot, an internationalised name as its A-label (routes and DNS)."""
    domain = domain.strip().lower()
    domain = domain[:-1] if domain.endswith(".") and not domain.startswith("[") else domain
    return a_label(domain)


class Router:
    """
    routes: RouteConfig in config order.  resolver: the shared IResolver.  hostname: ours (an
    MX of that name is us).  local_addresses: set of (ip str, port int) we listen on ("0.0.0.0"
    or "::" listen on every address).  mx_port: where MX hosts are reached.  random: a
    random.Random for shuffling equal-preference MX records.
    """

    def __init__(self, routes, resolver, hostname, local_addresses, mx_port, random=None):
        self.routes = tuple(routes)
        self.resolver = resolver
        self.hostname = _normalise(hostname)
        self.mx_port = int(mx_port)
        self.random = random if random is not None else _random.Random()
        self._exact = {}
        self._suffixes = []  # (".example.com", route), longest first
        self._wildcard = None
        for route in self.routes:
            for entry in route.domains:
                entry = entry.strip().lower().rstrip(".")
                if entry == "*":
                    self._wildcard = self._wildcard or route
                elif entry.startswith("."):
                    if entry not in [suffix for suffix, _ in self._suffixes]:
                        self._suffixes.append((entry, route))
                else:
                    self._exact.setdefault(entry, route)
        self._suffixes.sort(key=lambda item: -len(item[0]))
        self._listeners = set()  # (ip, port), normalised
        self._any_ports = set()  # ports we listen on at every address
        for ip, port in local_addresses:
            address = ip_literal(ip) or ip
            if address in ("0.0.0.0", "::"):
                self._any_ports.add(int(port))
            else:
                self._listeners.add((address, int(port)))
        self._local_ips = {address for address, _ in self._listeners}

    # --- which route ----------------------------------------------------------------------------

    def route_for(self, domain):
        """The RouteConfig for a recipient domain, or None: exact, then longest .suffix, then *."""
        domain = _normalise(domain)
        if domain.startswith("["):
            return self._wildcard
        if domain in self._exact:
            return self._exact[domain]
        for suffix, route in self._suffixes:
            if domain.endswith(suffix):
                return route
        return self._wildcard

    # --- where to -------------------------------------------------------------------------------

    def hops(self, route, domain):
        """Deferred[list of Hop] to try in order for domain on route; or a RoutingError."""
        domain = _normalise(domain)
        if route.mx:
            return defer.Deferred.fromCoroutine(self._mx_hops(domain))
        if route.smarthosts:
            return defer.Deferred.fromCoroutine(self._smarthost_hops(route, domain))
        text = "Route %s has neither smarthosts nor mx" % (route.name,)
        return defer.fail(RoutingError("4.3.5", text, permanent=False))

    async def _smarthost_hops(self, route, domain):
        resolved = await self._resolve([host for host, _ in route.smarthosts])
        hops, problems = [], []
        for (host, port), (ok, value) in zip(route.smarthosts, resolved):
            if not ok:
                problems.append("%s: %s" % (host, describe_failure(value)))
                continue
            if not value:
                problems.append("%s: no address" % (host,))
            hops += [Hop(host, address, port) for address in value]
        if not hops:
            text = "No smarthost of route %s could be resolved (%s)"
            text %= (route.name, "; ".join(problems))
            raise RoutingError("4.4.3", text, permanent=False)
        if any(self.is_local(hop.address, hop.port) for hop in hops):
            raise self._loop(domain)
        return _unique(hops)

    async def _mx_hops(self, domain):
        literal = self._literal(domain)
        if literal is not None:
            if self.is_local(literal, self.mx_port):
                raise self._loop(domain)
            return [Hop(literal, literal, self.mx_port)]
        mxs = await self._mx_records(domain)
        # Our own preference, by name: nothing at or above it is tried (RFC 5321 5.1).
        ours = [preference for preference, name in mxs if name == self.hostname]
        if ours:
            mxs = [(preference, name) for preference, name in mxs if preference < min(ours)]
        if not mxs:
            raise self._loop(domain)
        resolved = await self._resolve([name for _, name in mxs])
        # ... and by address: an MX host with an address we listen on is us as well.
        local = [
            preference
            for (preference, _), (ok, addresses) in zip(mxs, resolved)
            if ok and any(self.is_local(address, self.mx_port) for address in addresses)
        ]
        limit = min(local) if local else None
        hops, problems = [], []
        for (preference, name), (ok, value) in zip(mxs, resolved):
            if limit is not None and preference >= limit:
                continue
            if not ok:
                problems.append("%s: %s" % (name, describe_failure(value)))
            elif not value:
                problems.append("%s: no address" % (name,))
            hops += [Hop(name, address, self.mx_port) for address in (value if ok else [])]
        if not hops:
            if limit is not None and not any(preference < limit for preference, _ in mxs):
                raise self._loop(domain)
            text = "No mail exchanger for %s could be resolved (%s)" % (domain, "; ".join(problems))
            raise RoutingError("4.4.4", text, permanent=False)
        return _unique(hops)

    async def _mx_records(self, domain):
        """
        [(preference, name)] to try for domain, in order: sorted by preference, equal ones
        shuffled; the implicit MX [(0, domain)] when there is no MX but there are addresses.
        """
        try:
            records = await lookup_records(self.resolver, domain, dns.MX)
        except Exception as e:
            raise self._dns_error(domain, "MX", e) from None
        mxs = []
        for _, payload in records:
            try:
                name = _normalise(payload.name.name.decode("ascii"))
            except UnicodeDecodeError:
                continue  # not a host name anybody could resolve
            if (payload.preference, name) not in mxs:
                mxs.append((payload.preference, name))
        if mxs and all(name in ("", ".") for _, name in mxs):
            raise RoutingError("5.1.10", "Recipient domain does not accept mail (null MX)", True)
        mxs = [(preference, name) for preference, name in mxs if name not in ("", ".")]
        if not mxs:
            return await self._implicit_mx(domain)
        ordered = []
        for preference in sorted({preference for preference, _ in mxs}):
            same = [mx for mx in mxs if mx[0] == preference]
            self.random.shuffle(same)
            ordered += same
        return ordered

    async def _implicit_mx(self, domain):
        try:
            addresses = await lookup_addresses(self.resolver, domain)
        except Exception as e:
            raise self._dns_error(domain, "A/AAAA", e) from None
        if not addresses:
            raise RoutingError("5.1.2", "Domain %s has no MX or address records" % (domain,), True)
        return [(0, domain)]

    async def _resolve(self, names):
        """[(True, [address]) or (False, Failure)] for each name, looked up at the same time."""
        return await defer.DeferredList(
            [lookup_addresses(self.resolver, name) for name in names], consumeErrors=True
        )

    # --- helpers --------------------------------------------------------------------------------

    def is_local(self, address, port):
        """Whether (address, port) reaches one of our own listeners."""
        address = ip_literal(address)
        port = int(port)
        if address is None:
            return False
        ip = ipaddress.ip_address(address)
        if ip.is_unspecified:  # connecting to 0.0.0.0 or :: reaches this host's loopback
            address = "127.0.0.1" if ip.version == 4 else "::1"
        if (address, port) in self._listeners:
            return True
        if port not in self._any_ports:
            return False
        loopback = ip.is_unspecified or any(ip in net for net in _LOOPBACKS)
        return loopback or address in self._local_ips

    def _literal(self, domain):
        """The IP of an address-literal domain ("[192.0.2.1]"), None for a name; else 5.1.2."""
        if not domain.startswith("["):
            return None
        literal = ip_literal(domain)
        if literal is None:
            raise RoutingError("5.1.2", "Unsupported address literal %s" % (domain,), True)
        return literal

    def _dns_error(self, domain, what, e):
        failure = Failure(e)
        if failure.check(error.DNSNameError):
            return RoutingError("5.1.2", "Domain not found", permanent=True)
        text = "DNS lookup failed: %s for %s %s" % (describe_failure(failure), what, domain)
        return RoutingError("4.4.3", text, permanent=False)

    def _loop(self, domain):
        return RoutingError("5.4.6", "Mail for %s loops back to myself" % (domain,), permanent=True)


def _unique(hops):
    """Hops without repeats of the same (address, port), first one kept."""
    seen, out = set(), []
    for hop in hops:
        if (hop.address, hop.port) not in seen:
            seen.add((hop.address, hop.port))
            out.append(hop)
    return out
