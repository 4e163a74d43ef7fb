"""mailgate.tcp: a write on an idle connection is sent at once, everything else as Twisted does."""

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from mailgate import tcp


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data
        if self.data.endswith(b"END"):
            self.done.callback(self.data)


class SendNowTests(TestCase):
    def connect(self, server, client):
        """Listen with server (a protocol class), connect a client -> Deferred[client protocol]."""
        port = tcp.listen_tcp(reactor, 0, protocol.Factory.forProtocol(server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        connected = defer.Deferred()

        class Client(client):
            def connectionMade(self):
                connected.callback(self)

        connector = tcp.connect_tcp(reactor, "127.0.0.1", port.getHost().port,
                                    protocol.ClientFactory.forProtocol(Client))
        self.addCleanup(connector.disconnect)
        return connected

    @defer.inlineCallbacks
    def test_round_trip_and_order(self):
        client = yield self.connect(Echo, Collect)
        self.assertIsInstance(client.transport, tcp.Client)
        big = b"x" * (8 * 1024 * 1024)  # more than the kernel takes at once: the rest queued
        for chunk in (b"a", b"b" * 100, big, b"c", b"END"):
            client.transport.write(chunk)
        echoed = yield client.done
        self.assertEqual(echoed, b"a" + b"b" * 100 + big + b"cEND")

    @defer.inlineCallbacks
    def test_both_ends_turn_nagle_off(self):
        """
        TCP_NODELAY on accepted and on outgoing sockets: with Nagle on, a command written while
        the previous segment waits for the peer's delayed ACK sits for 40 ms.
        """
        accepted = defer.Deferred()

        class Server(protocol.Protocol):
            def connectionMade(self):
                accepted.callback(self)

        client = yield self.connect(Server, protocol.Protocol)
        server = yield accepted
        self.addCleanup(server.transport.loseConnection)
        for transport in (client.transport, server.transport):
            self.assertTrue(transport.getTcpNoDelay(), transport)

    def test_idle_write_is_sent_without_the_reactor(self):
        """Nothing queued: the bytes are in the kernel when write returns."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)

        class Fake(tcp._SendNow):
            dataBuffer = b""
            _tempDataBuffer = []
            producer = None
            connected = True
            _writeDisconnected = False
            socket = a
            queued = []

            def __init__(self):
                pass

        class Base:
            def write(self, data):
                Fake.queued.append(data)

        Fake.__bases__ = (tcp._SendNow, Base)
        Fake().write(b"250 ok\r\n")
        self.assertEqual(b.recv(100), b"250 ok\r\n")
        self.assertEqual(Fake.queued, [])

    def test_other_reactors_get_their_own_ports(self):
        memory = MemoryReactorClock()
        tcp.listen_tcp(memory, 25, protocol.Factory(), 100, "127.0.0.1")
        tcp.connect_tcp(memory, "127.0.0.1", 25, protocol.ClientFactory(), timeout=3)
        self.assertEqual(memory.tcpServers[0][0], 25)
        self.assertEqual(memory.tcpClients[0][:2], ("127.0.0.1", 25))
