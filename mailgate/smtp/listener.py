"""
The listening side of a [listener:NAME]: binding its endpoint, TLS for implicit-TLS ports, and
the factory that gives each session its own copy of the settings.

A reload (mailgate.gateway) changes a kept listener's factory in place and binds new ones
before anything else changes; the copy taken at connect time is what lets open sessions finish
under the settings they started with.
"""

import copy
import errno

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate import tcp
from mailgate.errors import ConfigError
from mailgate.smtp.server import SMTPFactory

log = Logger()


_BACKLOG_TYPES = ("tcp", "tcp6", "unix")


def listening_endpoint(reactor, listener, text=None):
    """
    The server endpoint of listener, with its backlog: Twisted's default of 50 overflows under
    a burst of connections (each dropped SYN costs the client a second or more).  TCP listeners
    get mailgate.tcp's transports, which send replies at once.
    """
    text = listener.endpoint if text is None else text  # text: without a haproxy: prefix
    kind = text.split(":", 1)[0]
    if kind in _BACKLOG_TYPES and "backlog=" not in text:
        text += ":backlog=%d" % listener.backlog
    endpoint = endpoints.serverFromString(reactor, text)
    if isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        return _TCPEndpoint(reactor, endpoint._port, endpoint._interface, endpoint._backlog)
    return endpoint


@implementer(IStreamServerEndpoint)
class _TCPEndpoint:
    """tcp: and tcp6: endpoints, listening with mailgate.tcp.listen_tcp."""

    def __init__(self, reactor, port, interface, backlog):
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, factory):
        return defer.execute(tcp.listen_tcp, self.reactor, self.port, factory, self.backlog,
                             self.interface)


class ListenerFactory(SMTPFactory):
    """
    A listener's SMTPFactory.  Each session is built from a shallow copy of the factory taken at
    connect time, so that a reload, which changes the attributes of this factory (listener,
    gateway, hooks, tls, auth), never changes the settings of a session already open.
    """

    def buildProtocol(self, addr):
        return SMTPFactory.buildProtocol(copy.copy(self), addr)


@implementer(IOpenSSLServerConnectionCreator)
class CurrentTLS:
    """
    The server TLS of the implicit-TLS listeners: each new connection gets the options current
    when it connects, so a reload with a renewed certificate needs no new listening port.
    """

    def __init__(self, options=None):
        self.options = options
        self.by_listener = {}  # listener name -> its own options (relay_client_certs)

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.options.getContext(), None)

    def of(self, name):
        """The creator of one listener: its own options when it has some, else the shared ones."""
        return _ListenerTLS(self, name)


@implementer(IOpenSSLServerConnectionCreator)
class _ListenerTLS:
    def __init__(self, current, name):
        self.current, self.name = current, name

    def serverConnectionForTLS(self, tls_protocol):
        options = self.current.by_listener.get(self.name) or self.current.options
        return SSL.Connection(options.getContext(), None)


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A listening socket inherited from the main process (descriptor fd, address family): a
    receiver process accepts on it (mailgate.processes).  The main process keeps it bound, so
    its port stays the gateway's across receiver restarts and reloads.
    """

    def __init__(self, reactor, fd, family):
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory):
        return defer.maybeDeferred(tcp.adopt_tcp, self.reactor, self.fd, self.family, factory)


def listening_socket(port):
    """(descriptor, address family) of a bound port, for a receiver process to inherit."""
    return port.fileno(), port.addressFamily


class ListenerService(service.Service):
    """
    One [listener:NAME]: binds its endpoint when started, stops listening when stopped (open
    sessions are not touched).  factory is what listens (the SMTPFactory, or TLS around it);
    smtp_factory the SMTPFactory itself.

    accepting=False binds without accepting: the main process of a gateway with receiver
    processes holds the port and the receivers accept on it.  announce=False logs the binding
    at debug level only (a receiver's adopted socket is the main process's port).
    """

    accepting = True
    announce = True

    def __init__(self, config, listener, endpoint, factory, local_addresses, smtp_factory=None):
        self.config = config
        self.local_addresses = local_addresses
        self.listener = listener
        self.endpoint = endpoint
        self.factory = factory
        self.smtp_factory = smtp_factory if smtp_factory is not None else factory
        self.name = "listener:" + listener.name
        self.port = None

    def listen(self):
        """Bind now: a Deferred firing with the port, or failing with a ConfigError."""
        d = self.endpoint.listen(self.factory)
        return d.addCallbacks(self._listening, self._failed)

    def privilegedStartService(self):
        # twistd calls this before it (or [gateway] user) drops root: ports 25, 465, 587 bind here.
        service.Service.privilegedStartService(self)
        return self._bind_at_start()

    def startService(self):
        service.Service.startService(self)
        return self._bind_at_start()

    def _bind_at_start(self):
        if self.port is not None or self._binding is not None:
            return None  # bound already (privileged start, or a reload bound it before adding it)
        failed = []
        d = self.listen()
        d.addErrback(self._start_failed, failed)
        if failed:
            # TCP and UNIX endpoints bind synchronously: report a busy port before the reactor
            # runs, by raising (twistd prints it once, an embedder gets the exception).
            raise failed[0]
        failed.append(None)  # from now on a failure can only be logged
        self._binding = d
        d.addBoth(self._bound)
        return d

    _binding = None

    def _bound(self, result):
        self._binding = None
        return result

    def _start_failed(self, failure, failed):
        failure.trap(ConfigError)
        if failed:
            log.critical("{error}", error=str(failure.value))
        else:
            failed.append(failure.value)

    def _listening(self, port):
        self.port = port
        if not self.accepting:
            port.stopReading()  # bound and listening; the receiver processes accept
        address = port.getHost()
        if getattr(address, "port", None) is not None:
            # Delivery's loop detection: never send mail to one of our own listeners.
            self.local_addresses.add((address.host, address.port))
        emit = log.info if self.announce else log.debug
        emit("listener {listener} ({role}) listening on {address}", listener=self.listener.name,
             role=self.listener.role, address=_describe(address))
        return port

    def _failed(self, failure):
        reason = failure.value
        if isinstance(reason, CannotListenError):
            code = getattr(reason.socketError, "errno", None)
            why = "address already in use" if code == errno.EADDRINUSE else str(reason.socketError)
        else:
            why = str(reason)
        return Failure(ConfigError(self.config.path, "listener:" + self.listener.name, "endpoint",
                                   "cannot listen on %s: %s" % (self.listener.endpoint, why)))

    def stopService(self):
        service.Service.stopService(self)
        return self.stop_listening()

    def stop_listening(self):
        port, self.port = self.port, None
        if port is None:
            return None
        address = port.getHost()
        self.local_addresses.discard((getattr(address, "host", None), getattr(address, "port", None)))
        return port.stopListening()


def tls_factory(creator, factory, reactor):
    try:
        wrapped = TLSMemoryBIOFactory(creator, False, factory, clock=reactor)
    except TypeError:  # a Twisted without the clock argument: its global reactor it is
        wrapped = TLSMemoryBIOFactory(creator, False, factory)
    wrapped.noisy = False
    return wrapped


def _describe(address):
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", str(address))
    return "%s:%s" % (host, address.port)
