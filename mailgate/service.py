"""
Assembles a gateway from a Config: the one place that knows how the parts fit together.

build_service() is pure: the reactor, the thread pool and the hooks come in, nothing global is
touched, so the twistd plugin, embedders and tests all build the same tree.
"""

import errno
import os
from functools import partial

from twisted.application import service
from twisted.internet import defer, endpoints, threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailgate import tls as mailtls
from mailgate.errors import ConfigError
from mailgate.events import EventBus
from mailgate.queue import Spool, new_queue_id
from mailgate.smtpd import Gate, SMTPFactory

log = Logger()


class ListenerService(service.Service):
    """One [listener:NAME]: binds its endpoint when started, stops listening when stopped."""

    def __init__(self, config, listener, endpoint, factory, local_addresses):
        self.config = config
        self.local_addresses = local_addresses
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
        self._error = ConfigError(self.config.path, "listener:" + self.listener.name, "endpoint",
                                  "cannot listen on %s: %s" % (self.listener.endpoint, why))
        log.critical("{error}", error=str(self._error))

    def stopService(self):
        service.Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            address = port.getHost()
            self.local_addresses.discard((getattr(address, "host", None), getattr(address, "port", None)))
            return port.stopListening()


class GatewayService(service.MultiService):
    """
    The whole gateway: queue recovery first, then listeners accept mail and delivery starts.
    delivery is started by hand rather than as a child, so that it never scans a dirty queue.
    """

    def __init__(self, config, queue, factories, delivery=None):
        service.MultiService.__init__(self)
        self.config = config
        self.queue = queue
        self.factories = factories
        self.delivery = delivery
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
        if self.delivery is not None and self.running:
            self.delivery.startService()

    def stopService(self):
        if self.delivery is not None and self.delivery.running:
            self.delivery.stopService()
        return service.MultiService.stopService(self)

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


def _delivery(config, reactor, queue, run, local_addresses, resolver, deliverer, events):
    from mailgate.delivery import Deliverer
    from mailgate.dkimsign import DKIMSigner
    from mailgate.routing import Router
    from mailgate.scheduler import DeliveryService

    router = Router(config.routes, resolver, config.gateway.hostname, local_addresses,
                    config.delivery.mx_port)
    if deliverer is None:
        deliverer = Deliverer(reactor, config.gateway.hostname, config.delivery, config.tls)
    signer = DKIMSigner(config.dkim, run, config.path) if config.dkim.sign_domains else None
    return DeliveryService(queue, router, deliverer, config, reactor, new_queue_id, signer=signer,
                           events=events)


def build_service(config, reactor, threadpool=None, run_in_thread=None, hooks=None, auth=None,
                  resolver=None, deliverer=None, deliver=True):
    """
    The gateway for config as an IService.  threadpool (default: the reactor's) runs every disk
    write, fsync, password hash and DKIM signature; run_in_thread replaces it in tests.  auth
    replaces the users file backend (any IAuthBackend), resolver the DNS resolver built from
    [dns], deliverer the SMTP client; deliver=False builds a receive-only gateway.  hooks, when
    given, replaces every listener's filter chain (built from its filters key otherwise).
    Raises ConfigError for anything wrong that can be seen before starting.
    """
    from mailgate.filters import FilterContext, build_chain
    from mailgate.resolver import make_resolver

    if threadpool is None and run_in_thread is None:
        threadpool = reactor.getThreadPool()
    run = run_in_thread or partial(threads.deferToThreadPool, reactor, threadpool)
    if resolver is None:
        resolver = make_resolver(config.dns, reactor)  # the one resolver: filters and delivery
    context = FilterContext(config, reactor, resolver, run)
    events = EventBus(reactor)
    _prepare_spool_dir(config)
    queue = Spool(config.queue.path, reactor, threadpool, run_in_thread)
    tls_options = _tls_options(config)
    if auth is None and config.auth.users_file:
        from mailgate.auth import UsersFile

        auth = UsersFile(config.auth.users_file, reactor, threadpool, run_in_thread)
    factories = []
    listeners = []
    local_addresses = set()
    for listener in config.listeners:
        chain = hooks if hooks is not None else build_chain(listener, context)
        factory = SMTPFactory(listener, config.gateway, reactor, queue, new_queue_id,
                              auth=auth, tls=tls_options, hooks=chain, events=events)
        factories.append(factory)
        wrapped = factory
        if listener.tls == "implicit":
            wrapped = TLSMemoryBIOFactory(tls_options, False, factory)
            wrapped.noisy = False
        endpoint = endpoints.serverFromString(reactor, listener.endpoint)
        listeners.append(ListenerService(config, listener, endpoint, wrapped, local_addresses))
    delivery = None
    if deliver:
        delivery = _delivery(config, reactor, queue, run, local_addresses, resolver, deliverer, events)
    gateway = GatewayService(config, queue, factories, delivery)
    gateway.events = events  # subscribe here for protocol and tracking events
    for listener_service in listeners:
        listener_service.setServiceParent(gateway)
    return gateway
