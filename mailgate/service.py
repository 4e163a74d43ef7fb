"""
Assembles a gateway from a Config: the one place that knows how the parts fit together.

build_service() is pure: the reactor, the thread pool and the hooks come in, nothing global is
touched, so the twistd plugin, embedders and tests all build the same tree.

GatewayService.reload() re-reads the configuration while mail flows.  Everything the new config
needs (filter chains, TLS options, the users file backend, the DKIM signer, the SMTP client) is
built first, and any ConfigError refuses the whole reload: the old settings keep running.  Only
then is it swapped in.  A listener keeps its SMTPFactory (and its port) when its endpoint stays;
the factory's attributes change, and since every session works on a copy of its factory taken
when it connects, an open session finishes under the settings it started with.  Listeners that
appear are bound before anything else changes; listeners that go away stop listening, and their
open sessions live on.
"""

import copy
import errno
import os
from functools import partial

from OpenSSL import SSL
from twisted.application import service
from twisted.internet import defer, endpoints, threads
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate import tls as mailtls
from mailgate.errors import ConfigError
from mailgate.events import EventBus
from mailgate.queue import Spool, new_queue_id
from mailgate.smtp.server import Gate, SMTPFactory

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
class _CurrentTLS:
    """
    The server TLS of the implicit-TLS listeners: each new connection gets the options current
    when it connects, so a reload with a renewed certificate needs no new listening port.
    """

    def __init__(self, options=None):
        self.options = options

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.options.getContext(), None)


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
            # TCP and UNIX endpoints bind synchronously: report a busy port before the reactor runs.
            raise failed[0]
        return d

    def _start_failed(self, failure, failed):
        failure.trap(ConfigError)
        failed.append(failure.value)
        log.critical("{error}", error=str(failure.value))

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


class GatewayService(service.MultiService):
    """
    The whole gateway: queue recovery first, then listeners accept mail and delivery starts.
    delivery is started by hand rather than as a child, so that it never scans a dirty queue.

    events is the EventBus (subscribe for protocol and tracking events); admin the AdminService
    (or None).  reload() applies a new configuration while running.
    """

    def __init__(self, config, queue, factories, delivery=None):
        service.MultiService.__init__(self)
        self.config = config
        self.queue = queue
        self.factories = factories
        self.delivery = delivery
        self.events = None
        self.admin = None
        self.ready = None
        self._builder = None  # set by build_service: makes the parts of a config (for reload)
        self._parts = None
        self._gate = None
        self._reloading = defer.DeferredLock()
        self._reload_observers = []

    def startService(self):
        # Listeners bind now (so a busy port is reported at once) but sessions wait for the
        # queue's crash recovery before the banner: nothing is accepted into a dirty spool.
        gate = self._gate = Gate(is_open=False)
        for factory in self.factories:
            factory.gate = gate
        self._queue_ready = False
        self.ready = defer.maybeDeferred(self.queue.recover)
        self.ready.addCallbacks(self._recovered, self._recovery_failed, callbackArgs=(gate,),
                                errbackArgs=(gate,))
        service.MultiService.startService(self)
        self._start_delivery()  # when recovery was over before the listeners were bound

    _queue_ready = False

    def _recovered(self, removed, gate):
        log.info("queue ready")
        self._queue_ready = True
        gate.open()
        self._start_delivery()

    def _start_delivery(self):
        if self.delivery is None or self.delivery.running or not self._queue_ready or not self.running:
            return
        if self._builder is not None:
            # The listeners are bound by now: the router learns their addresses (loop detection).
            self.delivery.router = self._builder.router(self._parts)
        self.delivery.startService()

    def stopService(self):
        if self.delivery is not None and self.delivery.running:
            self.delivery.stopService()
        return service.MultiService.stopService(self)

    def _recovery_failed(self, failure, gate):
        log.failure("queue recovery failed: refusing mail", failure)
        gate.fail(failure)

    def listeners(self):
        """The ListenerServices, in configuration order."""
        return [child for child in self if isinstance(child, ListenerService)]

    # -- reload ------------------------------------------------------------------------------

    def add_reload_observer(self, observer):
        """observer(config) after each reload that was applied; returns a function removing it."""
        self._reload_observers.append(observer)

        def remove():
            if observer in self._reload_observers:
                self._reload_observers.remove(observer)

        return remove

    def reload(self, new_config=None):
        """
        Apply new_config (a mailgate.config.Config; default: the file at config.path read again),
        one reload at a time.  Fires with a summary dict once applied; fails with a ConfigError
        (logged here, one line) when refused, and then the running configuration stays.
        """
        return self._reloading.run(self._reload, new_config)

    @defer.inlineCallbacks
    def _reload(self, new_config):
        path = self.config.path
        try:
            if new_config is None:
                from mailgate.config import load_config

                new_config = load_config(path)
            parts = self._builder.prepare(new_config, self._parts)
            plan = yield self._bind_new_listeners(new_config, parts)
        except ConfigError as e:
            log.error("reload refused: {error}; the running configuration stays", error=str(e))
            raise
        except Exception as e:
            log.failure("reload failed unexpectedly; the running configuration stays")
            raise ConfigError(path, None, None, "reload failed: %s: %s" % (type(e).__name__, e))
        summary = self._apply(new_config, parts, plan)
        yield plan.stopped
        return summary

    def _bind_new_listeners(self, config, parts):
        """
        Plan the listener changes and bind every new endpoint.  A bind that fails while some old
        listener is going away is tried again once the old ones stopped (the same port on another
        address, or a listener switched to or from implicit TLS); a bind that still fails undoes
        everything and refuses the reload.
        """
        plan = _ListenerPlan(self.listeners(), config.listeners)
        plan.new_services = [self._listener_service(config, listener, parts) for listener in plan.added]
        if not self.running:
            return defer.succeed(plan)
        return defer.ensureDeferred(self._bind(plan))

    async def _bind(self, plan):
        failed = []
        for listener_service in plan.new_services:
            try:
                await listener_service.listen()
            except ConfigError as e:
                failed.append((listener_service, e))
        if failed and plan.removed:
            await _all([old.stop_listening() for old in plan.removed])
            plan.stopped_early = True
            retry, failed = failed, []
            for listener_service, _ in retry:
                try:
                    await listener_service.listen()
                except ConfigError as e:
                    failed.append((listener_service, e))
        if failed:
            await _all([s.stop_listening() for s in plan.new_services if s.port is not None])
            if plan.stopped_early:
                for old in plan.removed:  # back as they were
                    try:
                        await old.listen()
                    except ConfigError as e:
                        log.critical("{error}", error=str(e))
            raise failed[0][1]
        return plan

    def _listener_service(self, config, listener, parts):
        factory = ListenerFactory(listener, config.gateway, self._builder.reactor, self.queue,
                                  new_queue_id, auth=parts.auth, tls=parts.tls,
                                  hooks=parts.chains[listener.name], events=self.events)
        if self._gate is not None:
            factory.gate = self._gate
        wrapped = factory
        if listener.tls == "implicit":
            wrapped = _tls_factory(self._builder.current_tls, factory, self._builder.reactor)
        endpoint = endpoints.serverFromString(self._builder.reactor, listener.endpoint)
        return ListenerService(config, listener, endpoint, wrapped, self._builder.local_addresses,
                               smtp_factory=factory)

    def _apply(self, config, parts, plan):
        """The swap: nothing here can fail on a config, and nothing waits."""
        self._builder.commit(parts)
        stopping = []
        for old in plan.removed:
            stopping.append(old.disownServiceParent())
            log.info("listener {listener} removed: no longer listening on {endpoint} (open sessions "
                     "finish)", listener=old.listener.name, endpoint=old.listener.endpoint)
        for listener_service, listener in plan.kept:
            factory = listener_service.smtp_factory
            factory.listener = listener
            factory.gateway = config.gateway
            factory.hooks = parts.chains[listener.name]
            factory.tls = parts.tls
            factory.auth = parts.auth
            listener_service.config = config
            listener_service.listener = listener
            listener_service.name = "listener:" + listener.name  # renamed, maybe
        self.namedServices = {child.name: child for child in self if child.name}
        for new in plan.new_services:
            new.setServiceParent(self)
        by_name = {s.listener.name: s for s in self.listeners()}
        self.services.sort(key=lambda s: _order(s, config.listeners))
        self.factories = [by_name[listener.name].smtp_factory for listener in config.listeners]
        old_config, self.config, self._parts = self.config, config, parts
        if self.delivery is not None:
            self.delivery.reconfigure(config, self._builder.router(parts), parts.deliverer,
                                      parts.signer)
        if self.admin is not None:
            self.admin.reconfigure(config)
        added = [listener.name for listener in plan.added]
        removed = [s.listener.name for s in plan.removed]
        listeners = {
            "added": [name for name in added if name not in removed],
            "removed": [name for name in removed if name not in added],
            "changed": [name for name in added if name in removed],  # a new endpoint
            "kept": [listener.name for _, listener in plan.kept],
        }
        summary = {"path": config.path, "listeners": listeners,
                   "routes": [route.name for route in config.routes]}
        log.info("configuration reloaded from {path}: listeners {listeners}, routes {routes}",
                 path=config.path, old_path=old_config.path,
                 listeners="; ".join("%s %s" % (what, ", ".join(names))
                                     for what, names in listeners.items() if names) or "none",
                 routes=", ".join(summary["routes"]) or "none")
        for observer in list(self._reload_observers):
            try:
                observer(config)
            except Exception:
                log.failure("reload observer {observer!r} failed", observer=observer)
        plan.stopped = _all([d for d in stopping if d is not None])
        return summary


def _tls_factory(creator, factory, reactor):
    try:
        wrapped = TLSMemoryBIOFactory(creator, False, factory, clock=reactor)
    except TypeError:  # a Twisted without the clock argument: its global reactor it is
        wrapped = TLSMemoryBIOFactory(creator, False, factory)
    wrapped.noisy = False
    return wrapped


def _order(child, listeners):
    names = [listener.name for listener in listeners]
    if isinstance(child, ListenerService) and child.listener.name in names:
        return names.index(child.listener.name)
    return len(names)  # the admin channel and anything else after the listeners, in their order


def _all(results):
    """One Deferred for what stopListening and the like returned (Deferreds, or None)."""
    return defer.gatherResults([r if isinstance(r, defer.Deferred) else defer.succeed(r)
                                for r in results], consumeErrors=True)


class _ListenerPlan:
    """Which listeners a reload keeps (same endpoint, same implicit TLS), adds and removes."""

    def __init__(self, current, listeners):
        by_endpoint = {s.listener.endpoint: s for s in current}
        self.kept = []  # (ListenerService, new ListenerConfig)
        self.added = []  # ListenerConfig
        for listener in listeners:
            old = by_endpoint.get(listener.endpoint)
            if old is not None and (old.listener.tls == "implicit") == (listener.tls == "implicit"):
                self.kept.append((old, listener))
                del by_endpoint[listener.endpoint]
            else:
                self.added.append(listener)
        self.removed = [s for s in current if s in by_endpoint.values()]
        self.new_services = []
        self.stopped_early = False
        self.stopped = None


class _Parts:
    """What one configuration is made of, built before a reload swaps anything."""

    def __init__(self, config, resolver, tls, auth, chains, signer, deliverer, users_path):
        self.config = config
        self.resolver = resolver
        self.tls = tls  # CertificateOptions, or None when no listener uses TLS
        self.auth = auth
        self.chains = chains  # listener name -> filter chain (or the injected hooks)
        self.signer = signer
        self.deliverer = deliverer  # None: keep the one given to build_service
        self.users_path = users_path


class _Builder:
    """
    Makes the parts of a configuration.  What build_service was given (hooks, auth, resolver,
    deliverer) stays for every reload.  prepare() changes nothing; commit() adopts what it made.
    """

    def __init__(self, reactor, threadpool, run_in_thread, hooks, auth, resolver, deliverer,
                 events=None, metrics=None):
        self.reactor = reactor
        self.events = events
        self.metrics = metrics
        self.threadpool = threadpool
        self.run_in_thread = run_in_thread
        self.run = run_in_thread or partial(threads.deferToThreadPool, reactor, threadpool)
        self.hooks = hooks
        self.auth = auth
        self.resolver = resolver
        self.deliverer = deliverer
        self.local_addresses = set()
        self.current_tls = _CurrentTLS()

    def prepare(self, config, previous=None):
        from mailgate.filters import FilterContext, build_chain

        if previous is not None:
            _check_unchanged(config, previous.config)
        resolver = self._resolver(config, previous)
        context = FilterContext(config, self.reactor, resolver, self.run, events=self.events)
        tls = _tls_options(config)
        auth, users_path = self._auth(config, previous)
        chains = {listener.name: self.hooks if self.hooks is not None else build_chain(listener, context)
                  for listener in config.listeners}
        signer = None
        if config.dkim.sign_domains:
            from mailgate.delivery.dkimsign import DKIMSigner

            signer = DKIMSigner(config.dkim, self.run, config.path)
        deliverer = None
        if self.deliverer is None:
            from mailgate.delivery.client import Deliverer

            deliverer = Deliverer(self.reactor, config.gateway.hostname, config.delivery, config.tls,
                                  events=self.events)
        return _Parts(config, resolver, tls, auth, chains, signer, deliverer, users_path)

    def commit(self, parts):
        if parts.tls is not None:
            self.current_tls.options = parts.tls

    def router(self, parts):
        from mailgate.delivery.routing import Router

        config = parts.config
        return Router(config.routes, parts.resolver, config.gateway.hostname, self.local_addresses,
                      config.delivery.mx_port)

    def _resolver(self, config, previous):
        if self.resolver is not None:
            return self.resolver
        if previous is not None and previous.config.dns == config.dns:
            return previous.resolver
        from mailgate.resolver import make_resolver

        resolver = make_resolver(config.dns, self.reactor)  # the one resolver: filters and delivery
        if self.metrics is not None:
            from mailgate.ops.metrics import InstrumentedResolver

            resolver = InstrumentedResolver(resolver, self.metrics, self.reactor)
        return resolver

    def _auth(self, config, previous):
        """(IAuthBackend or None, users file path or None)."""
        if self.auth is not None:
            return self.auth, None
        path = config.auth.users_file
        if path is None:
            return None, None
        if previous is not None and previous.users_path == path and previous.auth is not None:
            # The same file: the backend re-reads it whenever it changes, and keeps the last good
            # copy when a change breaks it.
            return previous.auth, path
        from mailgate.smtp.auth import UsersFile

        if previous is not None:
            _check_users_file(config)  # a new file must be good before sessions depend on it
        return UsersFile(path, self.reactor, self.threadpool, self.run_in_thread), path


def _check_unchanged(config, old):
    """What a reload cannot change."""
    if (config.queue.backend, config.queue.path) != (old.queue.backend, old.queue.path):
        raise ConfigError(config.path, "queue", "path",
                          "the queue cannot change on a reload (restart the gateway)")


def _check_users_file(config):
    from mailgate.smtp.auth import parse_users

    path = config.auth.users_file
    try:
        with open(path, encoding="utf-8") as f:
            parse_users(f.read(), source=path)
    except OSError as e:
        raise ConfigError(config.path, "auth", "users_file",
                          "cannot read %s: %s" % (path, e.strerror or e))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(config.path, "auth", "users_file", " ".join(str(e).split()))


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


def build_service(config, reactor, threadpool=None, run_in_thread=None, hooks=None, auth=None,
                  resolver=None, deliverer=None, deliver=True, admin=True):
    """
    The gateway for config as an IService.  threadpool (default: the reactor's) runs every disk
    write, fsync, password hash and DKIM signature; run_in_thread replaces it in tests.  auth
    replaces the users file backend (any IAuthBackend), resolver the DNS resolver built from
    [dns], deliverer the SMTP client; deliver=False builds a receive-only gateway.  hooks, when
    given, replaces every listener's filter chain (built from its filters key otherwise).
    admin=False leaves out the admin channel ([admin] socket).
    Raises ConfigError for anything wrong that can be seen before starting.
    """
    from mailgate.ops.metrics import Metrics, MetricsService
    from mailgate.delivery.scheduler import DeliveryService

    if threadpool is None and run_in_thread is None:
        threadpool = reactor.getThreadPool()
    _prepare_spool_dir(config)
    events = EventBus(reactor)
    metrics = Metrics(events, reactor)
    builder = _Builder(reactor, threadpool, run_in_thread, hooks, auth, resolver, deliverer,
                       events=events, metrics=metrics)
    parts = builder.prepare(config)
    builder.commit(parts)
    queue = Spool(config.queue.path, reactor, threadpool, run_in_thread)
    delivery = None
    if deliver:
        delivery = DeliveryService(queue, builder.router(parts), parts.deliverer or deliverer, config,
                                   reactor, new_queue_id, signer=parts.signer, events=events)
    gateway = GatewayService(config, queue, [], delivery)
    gateway.events = events  # subscribe here for protocol and tracking events
    gateway._builder, gateway._parts = builder, parts
    if config.logging.dir:
        from mailgate.ops.logs import LogService

        # The first child: it starts before any session and stops (draining its queue) last.
        LogService(config.logging, reactor, events).setServiceParent(gateway)
    for listener in config.listeners:
        listener_service = gateway._listener_service(config, listener, parts)
        gateway.factories.append(listener_service.smtp_factory)
        listener_service.setServiceParent(gateway)
    if admin:
        from mailgate.ops.admin import AdminService

        gateway.admin = AdminService(config, reactor, gateway)
        gateway.admin.setServiceParent(gateway)
    # /metrics and /healthz when [metrics] endpoint is set; the [alerts] checks in any case.
    gateway.metrics = MetricsService(config, reactor, gateway, metrics=metrics)
    gateway.metrics.setServiceParent(gateway)
    return gateway
