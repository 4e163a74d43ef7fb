"""
Listeners behind a load balancer: the PROXY protocol (HAProxy's, v1 text and v2 binary) in front
of an SMTP session, for `endpoint = haproxy:...` listeners.

Twisted's own `haproxy:` endpoint wrapper starts the wrapped protocol the moment the connection
is made, before the header has been read: the session would judge `allowed_ips` on, greet and
log the balancer's address, and take any peer's header.  This wrapper keeps Twisted's parsers
(twisted.protocols.haproxy) but changes the order:

1. a connection from a peer outside the listener's `proxy_from` is refused (closed, logged)
   before a byte is read: only the balancers may say who the client is;
2. the header is read first, within HEADER_TIMEOUT and a bounded buffer (a v1 line is at most
   107 bytes; a v2 header at most 16 + 65535), in as many pieces as it arrives;
3. only then does the wrapped protocol (TLS for implicit-TLS listeners, then SMTP) start, and
   its transport's getPeer()/getHost() answer the addresses the header names, so allowed_ips,
   relay_ips, limits, logs, the Received header and SPF all see the real client.

A v2 LOCAL header (a balancer's health check) and a v1 `PROXY UNKNOWN` name no client: the
session then sees the balancer's own address, as the protocol says.  A broken header closes the
connection, logged, without a reply: the peer speaks PROXY, not SMTP.
"""

import ipaddress
import struct

import attr
from twisted.internet.address import IPv4Address, IPv6Address

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import directlyProvides, providedBy

from mailgate.smtp.policy import ip_in

log = Logger()

HEADER_TIMEOUT = 10.0  # seconds a balancer may take to send the header
V1_MAX = 107  # RFC-style limit of the text header, CRLF included (the protocol's spec)
V2_FIXED = 16
V1_SIGNATURE = b"PROXY "


def _describe(address):
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", None) or "unix socket"
    return "%s:%s" % (host, getattr(address, "port", ""))


def parse_header(buffer):
    """
    (ProxyInfo, the bytes after the header) once buffer holds a whole header; (None, None) while it
    may still become one; InvalidProxyHeader when it cannot.
    """
    prefix = V2Parser.PREFIX
    if buffer[:len(prefix)] == prefix[:len(buffer)]:
        if len(buffer) < V2_FIXED:
            return None, None
        if buffer[12] & 0xF0 != 0x20:
            raise InvalidProxyHeader()
        size = V2_FIXED + struct.unpack("!H", buffer[14:16])[0]
        if len(buffer) < size:
            return None, None
        return _canonical(V2Parser.parse(buffer[:size])), buffer[size:]
    if buffer[:len(V1_SIGNATURE)] == V1_SIGNATURE[:len(buffer)]:
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise InvalidProxyHeader()
            return None, None
        line = buffer[:end]
        if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
            # The spec's "no address to tell" (Twisted's parser refuses it): the balancer's own.
            return ProxyInfo(line, None, None), buffer[end + 2:]
        return _canonical(V1Parser.parse(line)), buffer[end + 2:]
    raise InvalidProxyHeader()


def _canonical_address(address):
    """Twisted's v2 parser spells IPv6 addresses uncompressed (2001:db8:0:0:0:0:0:7): compress."""
    host = getattr(address, "host", None)
    if host is None:
        return address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return address
    cls = IPv6Address if ip.version == 6 else IPv4Address
    return cls(address.type, str(ip), address.port)


def _canonical(info):
    return attr.evolve(info, source=_canonical_address(info.source) if info.source else None,
                       destination=_canonical_address(info.destination) if info.destination else None)


class ProxyHeaderProtocol(policies.ProtocolWrapper):
    """One connection: the PROXY header first, then the wrapped protocol with the real addresses."""

    def __init__(self, factory, wrappedProtocol):
        policies.ProtocolWrapper.__init__(self, factory, wrappedProtocol)
        self._buffer = b""
        self._info = None
        self._started = False
        self._timer = None

    def makeConnection(self, transport):
        # As ProtocolWrapper's, but the wrapped protocol is connected only once the header is in.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self):
        peer = self.transport.getPeer()
        if not self.factory.may_send_header(peer):
            log.warn("refused {peer} on listener {listener}: not in proxy_from, may not send a "
                     "PROXY header", peer=_describe(peer), listener=self.factory.listener_name,
                     event="proxy_refused")
            self.factory.refused += 1
            self.loseConnection()
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def _timed_out(self):
        self._timer = None
        log.info("no PROXY header from {peer} on listener {listener} within {timeout}s; closed",
                 peer=_describe(self.transport.getPeer()), listener=self.factory.listener_name,
                 timeout=self.factory.timeout)
        self.transport.loseConnection()

    def dataReceived(self, data):
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
            return
        self._buffer += data
        try:
            info, rest = parse_header(self._buffer)
        except InvalidProxyHeader:
            log.warn("bad PROXY header from {peer} on listener {listener}: {start!r}; closed",
                     peer=_describe(self.transport.getPeer()), listener=self.factory.listener_name,
                     start=self._buffer[:40], event="proxy_invalid")
            self._stop_timer()
            self._buffer = b""
            self.loseConnection()
            return
        if info is None:
            return
        self._stop_timer()
        self._buffer = b""
        self._info = info
        self._started = True
        log.debug("PROXY header from {peer}: client {client}", peer=_describe(self.transport.getPeer()),
                  client=_describe(info.source) if info.source else "not given")
        self.wrappedProtocol.makeConnection(self)
        if rest and not self.disconnecting:
            self.wrappedProtocol.dataReceived(rest)

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def getPeer(self):
        if self._info is not None and self._info.source is not None:
            return self._info.source
        return self.transport.getPeer()

    def getHost(self):
        if self._info is not None and self._info.destination is not None:
            return self._info.destination
        return self.transport.getHost()

    def connectionLost(self, reason):
        self._stop_timer()
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None


class ProxyHeaderFactory(policies.WrappingFactory):
    """
    Wraps a listener's factory.  settings is the listener's SMTPFactory, read at each connection,
    so that a reload changing proxy_from applies to the next connection.
    """

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrappedFactory, settings, clock, timeout=HEADER_TIMEOUT):
        policies.WrappingFactory.__init__(self, wrappedFactory)
        self.settings = settings
        self.clock = clock
        self.timeout = timeout
        self.refused = 0

    @property
    def listener_name(self):
        return self.settings.listener.name

    def may_send_header(self, peer):
        """A unix socket's peers are whom its permissions let in; an IP peer must be in proxy_from."""
        host = getattr(peer, "host", None)
        if host is None:
            return True
        return ip_in(self.settings.listener.proxy_from, host)

    def logPrefix(self):
        return "%s (PROXY)" % (self.wrappedFactory.__class__.__name__,)
