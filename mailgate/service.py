"""
Assembles a gateway from a Config: the one place that knows how the parts fit together.

build_service() is pure: the reactor, the thread pool and the hooks come in, nothing global is
touched, so the twistd plugin, embedders and tests all build the same tree.
"""

import errno
import os

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgate import tls as mailtls
from mailgate.errors import ConfigError
from mailgate.queue import Spool, new_queue_id
from mailgate.smtpd import Gate, SMTPFactory

log = Logger()


class ListenerService(service.Service):
    """One [listener:NAME]: binds its endpoint when started, stops listening when stopped."""

    def __init__(self, config, listener, endpoint, factory):
        self.config = config
        self.listener = listener
        self.endpoint = endpoint
        self.factory = factory
        self.name = "listener:" + listener.name
        self.port = None

    def startService(self):
        service.Service.startService(self)
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, self._failed)
        if self.port is None and self._error is not None:
            # TCP and UNIX endpoints bind synchronously: report a busy port before the reactor runs.
            error, self._error = self._error, None
            raise error
        return d

    _error = None

    def _listening(self, port):
        self.port = port
        address = port.getHost()
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
        self._error = ConfigError(self.config.path, "listener:" + self.listener.name, "endpoint",
                                  "cannot listen on %s: %s" % (self.listener.endpoint, why))
        log.critical("{error}", error=str(self._error))

    def stopService(self):
        service.Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()


class GatewayService(service.MultiService):
    """The whole gateway: queue recovery first, then listeners accept mail."""

    def __init__(self, config, queue, factories):
        service.MultiService.__init__(self)
        self.config = config
        self.queue = queue
        self.factories = factories
        self.ready = None

    def startService(self):
        # Listeners bind now (so a busy port is reported at once) but sessions wait for the
        # queue's crash recovery before the banner: nothing is accepted into a dirty spool.
        gate = Gate(is_open=False)
        for factory in self.factories:
            factory.gate = gate
        self.ready = defer.maybeDeferred(self.queue.recover)
        self.ready.addCallbacks(self._recovered, self._recovery_failed, callbackArgs=(gate,),
                                errbackArgs=(gate,))
        service.MultiService.startService(self)

    def _recovered(self, removed, gate):
        log.info("queue ready")
        gate.open()

    def _recovery_failed(self, failure, gate):
        log.failure("queue recovery failed: refusing mail", failure)
        gate.fail(failure)


def _describe(address):
    host = getattr(address, "host", None)
    if host is None:
        return getattr(address, "name", str(address))
    return "%s:%s" % (host, address.port)


def _prepare_spool_dir(config):
    path = config.queue.path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(config.path, "queue", "path", "cannot create %s: %s" % (path, e.strerror))
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(config.path, "queue", "path", "not writable: %s" % (path,))


def _tls_options(config):
    if not any(listener.tls != "none" for listener in config.listeners):
        return None
    if mailtls.ensure_certificate(config.tls, config.gateway.hostname):
        log.warn("generated a self-signed certificate for {hostname}", hostname=config.gateway.hostname)
    return mailtls.server_context_factory(config.tls, config.path)


def build_service(config, reactor, threadpool=None, run_in_thread=None, hooks=None, auth=None):
    """
    The gateway for config as an IService.  threadpool (default: the reactor's) runs every disk
    write, fsync and password hash; run_in_thread replaces it in tests.  auth replaces the users
    file backend (any IAuthBackend).  Raises ConfigError for anything wrong that can be seen
    before starting.
    """
    if threadpool is None and run_in_thread is None:
        threadpool = reactor.getThreadPool()
    _prepare_spool_dir(config)
    queue = Spool(config.queue.path, reactor, threadpool, run_in_thread)
    tls_options = _tls_options(config)
    if auth is None and config.auth.users_file:
        from mailgate.auth import UsersFile

        auth = UsersFile(config.auth.users_file, reactor, threadpool, run_in_thread)
    factories = []
    listeners = []
    for listener in config.listeners:
        factory = SMTPFactory(listener, config.gateway, reactor, queue, new_queue_id,
                              auth=auth, tls=tls_options, hooks=hooks)
        factories.append(factory)
        wrapped = factory
        if listener.tls == "implicit":
            wrapped = TLSMemoryBIOFactory(tls_options, False, factory)
            wrapped.noisy = False
        endpoint = endpoints.serverFromString(reactor, listener.endpoint)
        listeners.append(ListenerService(config, listener, endpoint, wrapped))
    gateway = GatewayService(config, queue, factories)
    for listener_service in listeners:
        listener_service.setServiceParent(gateway)
    return gateway
