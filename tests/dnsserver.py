"""
A real DNS server on loopback for tests: an in-memory zone answered over UDP and TCP.

    zone = TestDNS()
    zone.add("example.com", "MX", (10, "mx1.example.com"), ttl=300)
    zone.add("mx1.example.com", "A", "127.0.0.1")
    zone.add("example.com", "TXT", "v=spf1 -all")     # or a list of strings; long ones are split
    zone.add("www.example.com", "CNAME", "example.com")
    zone.add("null.example", "MX", (0, "."))          # RFC 7505 null MX
    zone.fail("broken.example", "SERVFAIL")           # any rcode name; rtype= for one type only
    zone.nxdomain("gone.example.com")                 # even if records exist
    zone.hang("slow.example")                         # never answered: for timeouts

    port = zone.listen(reactor, self)   # in a trial test: on the test's reactor, cleaned up by self
    port = zone.start_thread()          # or: in a thread of its own (blocking code, child processes)
    zone.stop_thread()

    DNSConfig(nameservers=(zone.address,), timeout=0.5)   # mailgate's resolver, pointed at it
    zone.dnspython_resolver()                             # dnspython (for pyspf, dkimpy), the same

Both ways listen on UDP and TCP of one ephemeral port of 127.0.0.1 (or host="::1") and answer
the same way: the wire format is parsed and written by twisted.names.dns, never by the client
under test's code path, and the tests check it with dnspython too.

It answers like a recursive resolver would: CNAMEs are followed inside the zone (the answer holds
the chain, then the target's records), a name that does not exist and has nothing under it is
NXDOMAIN, a name that exists (or has names under it) without the asked type is NOERROR with an
empty answer; both negative answers carry a SOA (owner ".", minimum and TTL = negative_ttl) so
that resolvers can cache them (RFC 2308).  Over UDP a reply larger than 512 bytes (or the EDNS
payload size the query advertised) is truncated (TC set, no records) so the client retries over
TCP.  Every question is recorded in zone.queries as (name, type) in lower case, e.g.
("example.com", "MX"); zone.count(name, rtype) counts them.
"""

import errno
import ipaddress
import selectors
import socket
import struct
import threading
import traceback

from twisted.internet import defer, error, protocol
from twisted.names import dns
from twisted.protocols.basic import Int16StringReceiver

TYPES = {
    "A": dns.A,
    "AAAA": dns.AAAA,
    "MX": dns.MX,
    "TXT": dns.TXT,
    "CNAME": dns.CNAME,
    "PTR": dns.PTR,
    "NS": dns.NS,
}
TYPE_NAMES = {value: name for name, value in TYPES.items()}
TYPE_NAMES[dns.ALL_RECORDS] = "ANY"
RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}

HANG = object()  # an override that never answers
_UDP_LIMIT = 512
_MAX_CHAIN = 16  # CNAMEs followed before answering SERVFAIL


def _name(name):
    """The canonical form of a name: str, lower case, no trailing dot ("" is the root)."""
    if isinstance(name, bytes):
        name = name.decode("ascii")
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def _type_name(rtype):
    names = (TYPE_NAMES, dns.QUERY_TYPES, dns.EXT_QUERIES)
    return next((table[rtype] for table in names if rtype in table), str(rtype))


def _txt_strings(value):
    """TXT data as a list of <= 255-byte strings; a long string is split (as for DKIM keys)."""
    items = [value] if isinstance(value, (str, bytes)) else list(value)
    out = []
    for item in items:
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        out += [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    return out


def _payload(rtype, value, ttl):
    if rtype == dns.A:
        return dns.Record_A(str(ipaddress.IPv4Address(value)), ttl)
    if rtype == dns.AAAA:
        return dns.Record_AAAA(str(ipaddress.IPv6Address(value)), ttl)
    if rtype == dns.MX:
        preference, exchange = value
        return dns.Record_MX(int(preference), _name(exchange).encode("ascii"), ttl)
    if rtype == dns.TXT:
        return dns.Record_TXT(*_txt_strings(value), ttl=ttl)
    if rtype == dns.CNAME:
        return dns.Record_CNAME(_name(value).encode("ascii"), ttl)
    if rtype == dns.PTR:
        return dns.Record_PTR(_name(value).encode("ascii"), ttl)
    if rtype == dns.NS:
        return dns.Record_NS(_name(value).encode("ascii"), ttl)
    raise ValueError("unsupported record type %r" % (rtype,))


class TestDNS:
    """An in-memory zone and the loopback DNS server that answers from it (see the module doc)."""

    __test__ = False  # not a pytest test class, although its name starts with "Test"

    def __init__(self, host="127.0.0.1", negative_ttl=60):
        self.host = host
        self.negative_ttl = negative_ttl
        self.queries = []  # (name, type name) of every question received, in order
        self.port = None
        self._records = {}  # name -> [(rtype, payload)], in the order added
        self._overrides = {}  # (name, rtype or None) -> rcode int or HANG
        self._lock = threading.Lock()
        self._ports = []
        self._connections = set()
        self._thread = None
        self._wake = None

    @property
    def address(self):
        """(host, port) of the running server: a nameservers entry for mailgate's DNSConfig."""
        return (self.host, self.port)

    def dnspython_resolver(self, lifetime=5.0):
        """A dnspython Resolver that asks this server only (never the system's resolvers)."""
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        return resolver

    # --- the zone ---------------------------------------------------------------------------

    def add(self, name, rtype, value, ttl=300):
        """Add one record; rtype is "A", "AAAA", "MX", "TXT", "CNAME", "PTR" or "NS"."""
        code = TYPES[rtype.upper()]
        payload = _payload(code, value, ttl)
        with self._lock:
            self._records.setdefault(_name(name), []).append((code, payload))
        return self

    def remove(self, name, rtype=None):
        """Remove the records of name (of one type, or all of them)."""
        code = None if rtype is None else TYPES[rtype.upper()]
        with self._lock:
            kept = [r for r in self._records.pop(_name(name), []) if code not in (None, r[0])]
            if kept:
                self._records[_name(name)] = kept

    def fail(self, name, rcode="SERVFAIL", rtype=None):
        """Answer questions about name (of one type, or all) with rcode, e.g. "REFUSED"."""
        self._override(name, rtype, RCODES[rcode.upper()])

    def nxdomain(self, name):
        self.fail(name, "NXDOMAIN")

    def hang(self, name, rtype=None):
        """Never answer questions about name (of one type, or all)."""
        self._override(name, rtype, HANG)

    def restore(self, name):
        """Drop the fail/nxdomain/hang overrides of name."""
        with self._lock:
            for key in [key for key in self._overrides if key[0] == _name(name)]:
                del self._overrides[key]

    def _override(self, name, rtype, what):
        code = None if rtype is None else TYPES[rtype.upper()]
        with self._lock:
            self._overrides[(_name(name), code)] = what

    def count(self, name=None, rtype=None):
        """How many questions were received (about name, of type rtype)."""
        name = None if name is None else _name(name)
        rtype = None if rtype is None else rtype.upper()
        return sum(
            1 for n, t in list(self.queries) if name in (None, n) and rtype in (None, t)
        )

    # --- answering ----------------------------------------------------------------------------

    def respond(self, request):
        """The reply (a dns.Message) to a request (a dns.Message), or None to stay silent."""
        response = dns.Message(id=request.id, answer=1, opCode=request.opCode,
                               recDes=request.recDes, recAv=1, auth=0, maxSize=0)
        response.queries = list(request.queries)
        if request.answer:
            return None
        if request.opCode != dns.OP_QUERY:
            response.rCode = dns.ENOTIMP
            return response
        if len(request.queries) != 1:
            response.rCode = dns.EFORMAT
            return response
        query = request.queries[0]
        try:
            qname = _name(query.name.name)
        except UnicodeDecodeError:
            response.rCode = dns.EFORMAT
            return response
        self.queries.append((qname, _type_name(query.type)))
        if query.cls != dns.IN:
            response.rCode = dns.EREFUSED
            return response
        with self._lock:
            rcode = self._resolve(query.name.name, qname, query.type, response.answers)
        if rcode is HANG:
            return None
        response.rCode = rcode
        if rcode == dns.ENAME or (rcode == dns.OK and not self._answered(response, query.type)):
            response.authority.append(self._soa())
        return response

    def _resolve(self, owner, name, qtype, answers):
        """Fill answers for name (following CNAMEs); the rcode, or HANG."""
        seen = set()
        while True:
            what = self._overrides.get((name, qtype), self._overrides.get((name, None)))
            if what is not None:
                return what
            records = self._records.get(name, [])
            matching = [p for t, p in records if qtype in (t, dns.ALL_RECORDS)]
            cnames = [p for t, p in records if t == dns.CNAME]
            if matching:
                answers += [self._rr(owner, p) for p in matching]
                return dns.OK
            if not cnames or qtype == dns.CNAME:
                return dns.OK if self._exists(name) else dns.ENAME
            answers.append(self._rr(owner, cnames[0]))
            seen.add(name)
            name = owner = _name(cnames[0].name.name)
            if name in seen or len(seen) > _MAX_CHAIN:
                return dns.ESERVER

    def _exists(self, name):
        """Whether name has records, or names under it (RFC 8020: then it exists)."""
        if not name:
            return True
        suffix = "." + name
        return any(n == name or n.endswith(suffix) for n in self._records)

    @staticmethod
    def _answered(response, qtype):
        return any(rr.type == qtype or qtype == dns.ALL_RECORDS for rr in response.answers)

    @staticmethod
    def _rr(owner, payload):
        return dns.RRHeader(owner, payload.TYPE, dns.IN, payload.ttl, payload)

    def _soa(self):
        ttl = self.negative_ttl
        soa = dns.Record_SOA(b"ns.test", b"hostmaster.test", serial=1, refresh=3600, retry=600,
                             expire=86400, minimum=ttl, ttl=ttl)
        return dns.RRHeader(b"", dns.SOA, dns.IN, ttl, soa)

    def handle(self, data, udp):
        """The reply's wire bytes for a request's wire bytes, or None (no reply)."""
        request = dns.Message()
        try:
            request.fromStr(data)
        except Exception:  # not DNS: FORMERR if there is at least a header to answer
            if len(data) < 12:
                return None
            query_id = struct.unpack("!H", data[:2])[0]
            return dns.Message(id=query_id, answer=1, rCode=dns.EFORMAT, maxSize=0).toStr()
        response = self.respond(request)
        if response is None:
            return None
        edns = [rr for rr in request.additional if rr.type == dns.OPT]
        limit = _UDP_LIMIT
        if edns:  # answer EDNS with EDNS (RFC 6891), and use the payload size offered
            limit = max(_UDP_LIMIT, min(edns[0].cls, 4096))
            response.additional.append(
                dns.RRHeader(b"", dns.OPT, 4096, 0, dns.UnknownRecord(b""))
            )
        wire = response.toStr()
        if udp and len(wire) > limit:
            response.trunc = 1
            response.answers, response.authority = [], []
            response.additional = response.additional[-1:] if edns else []
            wire = response.toStr()
        return wire

    # --- serving on a Twisted reactor ---------------------------------------------------------

    def listen(self, reactor, test=None):
        """
        Serve on reactor (UDP and TCP on one ephemeral port); the port number.  With test (a
        trial TestCase), stopping is added to its cleanups; else call stop_listening().
        """
        factory = protocol.ServerFactory.forProtocol(lambda: _TCPServer(self))
        factory.noisy = False
        for attempt in range(50):
            udp_port = reactor.listenUDP(0, _UDPServer(self), interface=self.host)
            number = udp_port.getHost().port
            try:
                tcp_port = reactor.listenTCP(number, factory, interface=self.host)
            except error.CannotListenError:
                udp_port.stopListening()
                continue
            self._ports += [udp_port, tcp_port]
            self.port = number
            if test is not None:
                test.addCleanup(self.stop_listening)
            return number
        raise RuntimeError("no port free for both UDP and TCP on %s" % (self.host,))

    def stop_listening(self):
        """Stop the reactor servers and close their TCP connections; a Deferred."""
        waits = [defer.maybeDeferred(port.stopListening) for port in self._ports]
        for connection in list(self._connections):
            waits.append(connection.closed)
            connection.transport.loseConnection()
        self._ports = []
        return defer.DeferredList(waits)

    # --- serving in a thread ------------------------------------------------------------------

    def start_thread(self):
        """Serve from a thread of its own (no reactor); the port number."""
        if self._thread is not None:
            raise RuntimeError("already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for attempt in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            number = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, number))
            except OSError as e:
                udp.close()
                tcp.close()
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            tcp.listen(16)
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP on %s" % (self.host,))
        self._wake, wake_end = socket.socketpair()
        self.port = number
        self._thread = threading.Thread(
            target=_ThreadServer(self, udp, tcp, wake_end).run, name="TestDNS", daemon=True
        )
        self._thread.start()
        return number

    def stop_thread(self):
        if self._thread is None:
            return
        self._wake.send(b"x")
        self._thread.join(10)
        self._wake.close()
        self._thread = self._wake = None


class _UDPServer(protocol.DatagramProtocol):
    noisy = False

    def __init__(self, zone):
        self.zone = zone

    def datagramReceived(self, data, address):
        reply = self.zone.handle(data, udp=True)
        if reply is not None:
            self.transport.write(reply, address)


class _TCPServer(Int16StringReceiver):
    def __init__(self, zone):
        self.zone = zone
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.zone._connections.add(self)

    def stringReceived(self, data):
        reply = self.zone.handle(data, udp=False)
        if reply is not None:
            self.sendString(reply)

    def connectionLost(self, reason):
        self.zone._connections.discard(self)
        self.closed.callback(None)


class _ThreadServer:
    """One thread, one selector: the UDP socket, the TCP listener and its connections."""

    def __init__(self, zone, udp, tcp, wake):
        self.zone, self.udp, self.tcp, self.wake = zone, udp, tcp, wake
        self.buffers = {}
        self.selector = selectors.DefaultSelector()

    def run(self):
        for sock in (self.udp, self.tcp, self.wake):
            self.selector.register(sock, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in self.selector.select():
                    sock = key.fileobj
                    if sock is self.wake:
                        return
                    if sock is self.udp:
                        self._datagram()
                    elif sock is self.tcp:
                        self._accept()
                    else:
                        self._stream(sock)
        finally:
            for sock in [self.udp, self.tcp, self.wake] + list(self.buffers):
                sock.close()
            self.selector.close()

    def _handle(self, data, udp):
        try:
            return self.zone.handle(data, udp)
        except Exception:  # a bug here must not silence the server: say it, answer nothing
            traceback.print_exc()
            return None

    def _datagram(self):
        try:
            data, address = self.udp.recvfrom(65535)
        except OSError:
            return
        reply = self._handle(data, udp=True)
        if reply is not None:
            self.udp.sendto(reply, address)

    def _accept(self):
        try:
            connection, _ = self.tcp.accept()
        except OSError:
            return
        self.buffers[connection] = b""
        self.selector.register(connection, selectors.EVENT_READ)

    def _stream(self, connection):
        try:
            data = connection.recv(65535)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(connection)
            del self.buffers[connection]
            connection.close()
            return
        buffer = self.buffers[connection] + data
        while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]:
            size = struct.unpack("!H", buffer[:2])[0]
            message, buffer = buffer[2:2 + size], buffer[2 + size:]
            reply = self._handle(message, udp=False)
            if reply is not None:
                connection.sendall(struct.pack("!H", len(reply)) + reply)
        self.buffers[connection] = buffer
