"""
TCP transports that send at once: Twisted's, but a write on an idle connection goes out now.

Twisted queues every write and sends it on the reactor's next turn, registering the socket for
writability and unregistering it again: two epoll_ctl calls and a loop iteration for each SMTP
reply, which a profile of the gateway showed as the largest single cost after the sends
themselves (an SMTP session is a dozen small writes, each waited for by the peer).  These
transports try send() first when nothing is queued before them; whatever the kernel does not
take, and every write after it, takes Twisted's usual path, so ordering, back-pressure, TLS and
the close sequence are Twisted's.

Both kinds also set TCP_NODELAY.  An SMTP peer waits for each reply before it writes again, so
Nagle's algorithm holds a small write back until the peer's ACK, which the peer delays (40 ms on
Linux) because it has nothing to send: on the outbound side that was most of the time per
message on a reused connection (end to end went from 271 to 476 messages/s with smtp-source and
20 sessions, in back-to-back runs, when only the client had it).  Writes here are whole replies
or whole commands already, so there is nothing for Nagle to coalesce.

listen_tcp, adopt_tcp and connect_tcp use them on the posix reactors (every reactor mailgate
runs on) and fall back to the reactor's own methods on others (the memory reactors of tests).
"""

import socket

from twisted.internet import tcp
from twisted.internet.posixbase import PosixReactorBase


class _SendNow:
    def write(self, data):
        if (getattr(self, "TLS", False) or self.dataBuffer or self._tempDataBuffer
                or self.producer is not None  # a pull producer is asked for more by doWrite
                or not self.connected or self._writeDisconnected or not data):
            return super().write(data)
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return super().write(data)  # the usual path finds the error and closes properly
        if sent < len(data):
            super().write(data[sent:])


class Server(_SendNow, tcp.Server):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setTcpNoDelay(True)


class Port(tcp.Port):
    transport = Server


class Client(_SendNow, tcp.Client):
    def createInternetSocket(self):
        # before connect(): setTcpNoDelay needs the connection Twisted has not made yet
        skt = super().createInternetSocket()
        skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return skt


class Connector(tcp.Connector):
    def _makeTransport(self):
        return Client(self.host, self.port, self.bindAddress, self, self.reactor)


def _posix(reactor):
    return isinstance(reactor, PosixReactorBase)


def listen_tcp(reactor, port, factory, backlog=50, interface=""):
    if not _posix(reactor):
        return reactor.listenTCP(port, factory, backlog, interface)
    listening = Port(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def adopt_tcp(reactor, fd, family, factory):
    """A listening socket inherited as descriptor fd (AF_INET or AF_INET6)."""
    if not _posix(reactor) or family not in (socket.AF_INET, socket.AF_INET6):
        return reactor.adoptStreamPort(fd, family, factory)
    listening = Port._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    return listening


def connect_tcp(reactor, host, port, factory, timeout=30):
    if not _posix(reactor):
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    connector = Connector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector
