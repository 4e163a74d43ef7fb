"""
The PROXY protocol in front of SMTP (mailgate.smtp.proxy), driven in memory with raw v1 and v2
headers: who may send one, what the session then sees, and every way a header can be wrong.
"""

import ipaddress
import socket
import struct

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailgate.smtp.proxy import HEADER_TIMEOUT, ProxyHeaderFactory, parse_header
from mailgate.smtp.server import SMTPFactory
from tests.smtphelp import GATEWAY, MemoryAuth, MemoryQueue, Session, TLSStringTransport, listener

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source, destination=None, sport=40001, dport=25, family=None):
    destination = destination or ("2001:db8::25" if ":" in source else "192.0.2.25")
    family = family or ("TCP6" if ":" in source else "TCP4")
    return ("PROXY %s %s %s %d %d\r\n" % (family, source, destination, sport, dport)).encode()


def v2(source, destination=None, sport=40001, dport=25, command=1, tlvs=b""):
    destination = destination or ("2001:db8::25" if ":" in source else "192.0.2.25")
    if ":" in source:
        family, packed = 0x21, socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(
            socket.AF_INET6, destination)
    else:
        family, packed = 0x11, socket.inet_aton(source) + socket.inet_aton(destination)
    body = packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_local():
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def networks(*items):
    return tuple(ipaddress.ip_network(item) for item in items)


class Connection(Session):
    """One connection from peer to a proxied listener, in memory (send, read, cmd: Session's)."""

    def __init__(self, peer="10.0.0.5", proxy_from=("10.0.0.0/24",), clock=None, **settings):
        self.clock = clock or Clock()
        self.queue = MemoryQueue()
        config = listener(tls="none", auth="none", endpoint="haproxy:tcp:25",
                          proxy_from=networks(*proxy_from), **settings)
        ids = iter("Q%04d" % i for i in range(1, 100))
        self.smtp = SMTPFactory(config, GATEWAY, self.clock, self.queue, lambda: next(ids),
                                auth=MemoryAuth(), tls=None)
        self.factory = ProxyHeaderFactory(self.smtp, self.smtp, self.clock)
        address = UNIXAddress("/run/mg.sock") if peer is None else IPv4Address("TCP", peer, 51000)
        self.transport = TLSStringTransport(peerAddress=address,
                                            hostAddress=IPv4Address("TCP", "10.0.0.25", 25))
        self.proto = self.factory.buildProtocol(address)
        self.proto.makeConnection(self.transport)

    @property
    def session(self):
        return self.proto.wrappedProtocol


class ParseTests(TestCase):
    def test_v1_and_v2_in_pieces(self):
        for header in (v1("203.0.113.7"), v2("203.0.113.7"), v1("2001:db8::7"), v2("2001:db8::7")):
            for cut in range(1, len(header)):
                self.assertEqual(parse_header(header[:cut]), (None, None), (header, cut))
            info, rest = parse_header(header + b"EHLO x\r\n")
            self.assertIn(info.source.host, ("203.0.113.7", "2001:db8::7"))
            self.assertEqual(info.source.port, 40001)
            self.assertEqual(rest, b"EHLO x\r\n")

    def test_garbage(self):
        from twisted.protocols.haproxy._exceptions import InvalidProxyHeader

        for data in (b"EHLO client\r\n", b"PROXY TCP4 nonsense\r\n", b"PROXY " + b"1" * 120,
                     V2_SIGNATURE + b"\x10\x11\x00\x0c",  # version 1 in a v2 header
                     b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c"):
            self.assertRaises(InvalidProxyHeader, parse_header, data)


class ProxyTests(TestCase):
    def test_v1_the_session_sees_the_client(self):
        c = Connection()
        self.assertEqual(c.read(), "")  # nothing before the header: not even a banner
        c.send(v1("203.0.113.7"))
        self.assertTrue(c.read().startswith("220 mx.example.net ESMTP"))
        self.assertEqual((c.session.client_ip, c.session.client_port), ("203.0.113.7", 40001))
        self.assertEqual(c.session.transport.getHost().host, "192.0.2.25")

    def test_v2_ipv6_and_pipelined_smtp_after_the_header(self):
        c = Connection()
        c.send(v2("2001:db8::7", "2001:db8::25", tlvs=b"\x04\x00\x02ab") + b"EHLO client.example\r\n")
        out = c.read()
        self.assertIn("220 mx.example.net ESMTP", out)
        self.assertIn("250-mx.example.net", out)
        self.assertEqual(c.session.client_ip, "2001:db8::7")

    def test_header_split_into_single_bytes(self):
        c = Connection()
        for i in range(len(v2("203.0.113.7"))):
            c.send(v2("203.0.113.7")[i:i + 1])
        self.assertTrue(c.read().startswith("220 "))
        self.assertEqual(c.session.client_ip, "203.0.113.7")

    def test_allowed_ips_judge_the_proxied_client(self):
        allowed = Connection(allowed_ips=("203.0.113.0/24",))
        allowed.send(v1("203.0.113.7"))
        self.assertTrue(allowed.read().startswith("220 "))
        refused = Connection(allowed_ips=("203.0.113.0/24",))
        refused.send(v1("198.51.100.9"))
        self.assertTrue(refused.read().startswith("554 5.7.1 mx.example.net Access denied"))
        self.assertTrue(refused.transport.disconnecting)

    def test_relay_ips_judge_the_proxied_client(self):
        for client, reply in (("203.0.113.7", "250"), ("198.51.100.9", "554 5.7.1")):
            c = Connection(relay_ips=("203.0.113.0/24",))
            c.send(v1(client))
            c.read()
            c.cmd("EHLO client.example")
            c.cmd("MAIL FROM:<a@sender.example>")
            self.assertTrue(c.cmd("RCPT TO:<x@elsewhere.example>").startswith(reply), client)

    def test_received_header_names_the_proxied_client(self):
        c = Connection()
        c.send(v1("203.0.113.7"))
        c.read()
        for line in ("EHLO client.example", "MAIL FROM:<a@sender.example>", "RCPT TO:<u@example.com>",
                     "DATA"):
            c.cmd(line)
        self.assertTrue(c.cmd("Subject: hi\r\n\r\nhello\r\n.").startswith("250 2.0.0 Ok: queued as"))
        [(envelope, data)] = c.queue.messages.values()
        self.assertEqual(envelope.client_ip, "203.0.113.7")
        self.assertTrue(data.startswith(b"Received: from client.example ([203.0.113.7])"))

    def test_peer_outside_proxy_from_is_refused_before_reading(self):
        c = Connection(peer="198.51.100.50")
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.read(), "")
        c.send(v1("203.0.113.7"))  # whatever it sends: never a session
        self.assertEqual(c.read(), "")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(c.factory.refused, 1)

    def test_refusal_is_logged(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        Connection(peer="198.51.100.50")
        [event] = [e for e in events if e.get("event") == "proxy_refused"]
        self.assertEqual((event["peer"], event["listener"]), ("198.51.100.50:51000", "test"))

    def test_unix_socket_peers_may_send_a_header(self):
        c = Connection(peer=None, proxy_from=())
        c.send(v1("203.0.113.7"))
        self.assertTrue(c.read().startswith("220 "))
        self.assertEqual(c.session.client_ip, "203.0.113.7")

    def test_smtp_instead_of_a_header_is_dropped(self):
        c = Connection()
        c.send(b"EHLO client.example\r\n")
        self.assertEqual(c.read(), "")
        self.assertTrue(c.transport.disconnecting)

    def test_overlong_v1_line_is_dropped(self):
        c = Connection()
        c.send(b"PROXY TCP4 " + b"9" * 200)
        self.assertTrue(c.transport.disconnecting)

    def test_no_header_in_time(self):
        c = Connection()
        c.send(b"PROXY TCP4 203.0")
        c.clock.advance(HEADER_TIMEOUT)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.read(), "")

    def test_local_and_unknown_headers_leave_the_balancer_address(self):
        for header in (v2_local(), b"PROXY UNKNOWN\r\n"):
            c = Connection()
            c.send(header)
            self.assertTrue(c.read().startswith("220 "))
            self.assertEqual(c.session.client_ip, "10.0.0.5")

    def test_lost_before_the_header_never_starts_the_session(self):
        c = Connection()
        c.proto.connectionLost(None)
        self.assertEqual(c.clock.getDelayedCalls(), [])
