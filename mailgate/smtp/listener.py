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
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.errors import ConfigError
from mailgate.smtp.server import SMTPFactory

log = Logger()


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


class ListenerService(service.Service):
    """
    One [listener:NAME]: binds its endpoint when started, stops listening when stopped (open
    sessions are not touched).  factory is what listens (the SMTPFactory, or TLS around it);
    smtp_factory the SMTPFactory itself.
    """

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

    def startService(self):
        service.Service.startService(self)
        if self.port is not None:
            return None  # bound already: a reload binds a new listener before adding it
        failed = []
        d = self.listen()
        d.addErrback(self._start_failed, failed)
        if failed:
            # TCP and UNIX endpoints bind synchronously: report a busy port before the reactor
            # runs, by raising (twistd prints it once, an embedder gets the exception).
            raise failed[0]
        failed.append(None)  # from now on a failure can only be logged
        return d

    def _start_failed(self, failure, failed):
        failure.trap(ConfigError)
        if failed:
            log.critical("{error}", error=str(failure.value))
        else:
            failed.append(failure.value)

    def _listening(self, port):
        self.port = port
        address = port.getHost()
        if getattr(address, "port", None) is not None:
            # Delivery's loop detection: never send mail to one of our own listeners.
            self.local_addresses.add((address.host, address.port))
        log.info("listener {listener} ({role}) listening on {address}", listener=self.listener.name,
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
