"""
The running gateway: queue recovery before the first banner, then listeners and delivery; and
reload, which builds a whole new configuration before swapping anything in.

GatewayService.reload() re-reads the configuration while mail flows.  Everything the new config
needs (filter chains, TLS options, the users file backend, the DKIM signer, the SMTP client) is
built first (by the builder of mailgate.service), and any ConfigError refuses the whole reload:
the old settings keep running.  Only then is it swapped in.  A listener keeps its SMTPFactory
(and its port) when its endpoint stays; the factory's attributes change, and since every session
works on a copy of its factory taken when it connects, an open session finishes under the
settings it started with.  Listeners that appear are bound before anything else changes;
listeners that go away stop listening, and their open sessions live on.

A certificate renewed on disk needs no reload: mailgate.tls.CertificateWatch notices it and the
gateway hands the new context to every listener (new sessions use it).
"""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailgate import tls as mailtls
from mailgate.config.types import proxied_endpoint
from mailgate.errors import ConfigError
from mailgate.queue import new_queue_id
from mailgate.smtp.gate import Gate
from mailgate.smtp.listener import (
    AdoptedEndpoint, ListenerFactory, ListenerService, listening_endpoint, listening_socket,
    tls_factory,
)
from mailgate.smtp.proxy import ProxyHeaderFactory

log = Logger()


class GatewayService(service.MultiService):
    """
    The whole gateway: queue recovery first, then listeners accept mail and delivery starts.
    delivery is started by hand rather than as a child, so that it never scans a dirty queue.

    events is the EventBus (subscribe for protocol and tracking events); admin the AdminService
    (or None).  reload() applies a new configuration while running.

    With receiver processes (mailgate.processes) the same class plays two parts.  The main
    process binds every listener without accepting (accepting = False), recovers the queue,
    then starts receivers (the ReceiverPool), delivers, and serves the admin socket and the
    metrics.  A receiver process accepts on the sockets it inherited (adopted: listener name ->
    (descriptor, family)) and never recovers the queue (recover = False): the main process did,
    before the receivers started.
    """

    accepting = True
    adopted = None
    receivers = None

    def __init__(self, config, queue, factories, delivery=None, recover=True):
        service.MultiService.__init__(self)
        self.config = config
        self.queue = queue
        self.factories = factories
        self.delivery = delivery
        self.recover = recover
        self.events = None
        self.admin = None
        self.ready = None
        self._builder = None  # set by build_service: makes the parts of a config (for reload)
        self._parts = None
        self._gate = None
        self._reloading = defer.DeferredLock()
        self._reload_observers = []
        self.certificate_watch = None

    def privilegedStartService(self):
        service.MultiService.privilegedStartService(self)  # the listeners bind
        if self.receivers is not None:
            self.receivers.prestart()  # while we may still be root: see ReceiverPool.prestart

    def startService(self):
        # Listeners bind now (so a busy port is reported at once) but sessions wait for the
        # queue's crash recovery before the banner: nothing is accepted into a dirty spool.
        gate = self._gate = Gate(is_open=False)
        for factory in self.factories:
            factory.gate = gate
        self._queue_ready = False
        if self.recover:
            self.ready = defer.maybeDeferred(self.queue.recover)
        else:
            # A receiver process: the main process recovered the queue; connect to it (a
            # database's connections), as recover would have.
            opener = getattr(self.queue, "open", None)
            self.ready = defer.maybeDeferred(opener) if opener is not None else defer.succeed(0)
            self.ready.addCallback(lambda _: 0)
        self.ready.addCallbacks(self._recovered, self._recovery_failed, callbackArgs=(gate,),
                                errbackArgs=(gate,))
        service.MultiService.startService(self)
        self._start_delivery()  # when recovery was over before the listeners were bound
        self._start_receivers()
        self._watch_certificate()

    def _watch_certificate(self):
        """Follow the [tls] files while any listener uses TLS (after a reload too)."""
        uses_tls = self._parts is not None and self._parts.tls is not None
        if not uses_tls or not self.running:
            if self.certificate_watch is not None:
                self.certificate_watch.stop()
                self.certificate_watch = None
            return
        if self.certificate_watch is None:
            self.certificate_watch = mailtls.CertificateWatch(
                self._builder.reactor, self.config.tls, self._certificate_renewed, self.config.path)
            self.certificate_watch.start()
        else:
            self.certificate_watch.config_path = self.config.path
            self.certificate_watch.watch(self.config.tls)

    def _certificate_renewed(self, options):
        old, self._parts.tls = self._parts.tls, options
        self._builder.current_tls.options = options  # implicit-TLS listeners
        for factory in self.factories:  # STARTTLS
            # A listener asking for client certificates has options of its own (relay_client_
            # certs): those take a renewed certificate on the next reload.
            if factory.tls is old:
                factory.tls = options

    _queue_ready = False

    def _recovered(self, removed, gate):
        if self.recover and self.receivers is None:
            log.info("queue ready")
        elif self.recover:
            log.info("queue recovered; starting the receiver processes")
        self._queue_ready = True
        gate.open()
        self._start_delivery()
        self._start_receivers()

    def _start_receivers(self):
        """The receiver processes start once the queue is clean (they never recover it)."""
        pool = self.receivers
        if pool is None or pool.running or not self._queue_ready or not self.running:
            return
        pool.startService()

    def _start_delivery(self):
        if self.delivery is None or self.delivery.running or not self._queue_ready or not self.running:
            return
        if self._builder is not None:
            # The listeners are bound by now: the router learns their addresses (loop detection).
            self.delivery.router = self._builder.router(self._parts)
        self.delivery.startService()

    def stopService(self):
        receivers = None
        if self.receivers is not None and self.receivers.running:
            receivers = self.receivers.stopService()  # they stop accepting at once
        if self.certificate_watch is not None:
            self.certificate_watch.stop()
            self.certificate_watch = None
        if self.delivery is not None and self.delivery.running:
            self.delivery.stopService()
        stopped = defer.maybeDeferred(service.MultiService.stopService, self)
        close = getattr(self.queue, "close", None)  # a database queue's connections
        if close is not None:
            stopped.addBoth(lambda result: (close(), result)[1])
        if receivers is None:
            return stopped
        return defer.gatherResults([receivers, stopped], consumeErrors=True)

    def process_problems(self):
        """Why the receiver processes cannot take mail now ([] without receivers): /healthz."""
        return self.receivers.problems() if self.receivers is not None else []

    def _recovery_failed(self, failure, gate):
        log.failure("queue recovery failed: refusing mail", failure)
        gate.fail(failure)

    @property
    def anvil(self):
        """The counters across sessions (mailgate.smtp.anvil) the listeners share."""
        return self._builder.anvil

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
            if self.receivers is not None and self.receivers.running:
                try:
                    # The new receivers accept before anything changes here.
                    yield self.receivers.prepare(new_config, _planned_sockets(plan))
                except ConfigError:
                    yield defer.ensureDeferred(self._undo(plan))
                    raise
        except ConfigError as e:
            log.error("reload refused: {error}; the running configuration stays", error=str(e))
            raise
        except Exception as e:
            log.failure("reload failed unexpectedly; the running configuration stays")
            raise ConfigError(path, None, None, "reload failed: %s: %s" % (type(e).__name__, e))
        old_config = self.config
        summary = self._apply(new_config, parts, plan)
        if self.receivers is not None and self.receivers.running:
            yield self.receivers.commit()  # the old receivers have stopped accepting
        self._announce(new_config, old_config, summary)
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
            await self._undo(plan)
            raise failed[0][1]
        return plan

    async def _undo(self, plan):
        """A refused reload: the new listeners unbound, the old ones back as they were."""
        await _all([s.stop_listening() for s in plan.new_services if s.port is not None])
        if plan.stopped_early:
            for old in plan.removed:
                try:
                    await old.listen()
                except ConfigError as e:
                    log.critical("{error}", error=str(e))

    def _listener_service(self, config, listener, parts):
        factory = ListenerFactory(listener, config.gateway, self._builder.reactor, self.queue,
                                  new_queue_id, auth=parts.auth, tls=parts.tls_for(listener),
                                  hooks=parts.chains[listener.name], events=self.events,
                                  anvil=self._builder.anvil,
                                  recipients=parts.recipients_for(listener),
                                  client_certs=parts.client_certs_for(listener))
        if self._gate is not None:
            factory.gate = self._gate
        wrapped = factory
        if listener.tls == "implicit":
            wrapped = tls_factory(self._builder.current_tls.of(listener.name), factory,
                                  self._builder.reactor)
        proxied, description = proxied_endpoint(listener.endpoint)
        if proxied:  # the PROXY header comes first, before TLS and SMTP
            wrapped = ProxyHeaderFactory(wrapped, factory, self._builder.reactor)
        if self.adopted is not None:
            fd, family = self.adopted[listener.name]
            endpoint = AdoptedEndpoint(self._builder.reactor, fd, family)
        else:
            endpoint = listening_endpoint(self._builder.reactor, listener, description)
        listening = ListenerService(config, listener, endpoint, wrapped,
                                    self._builder.local_addresses, smtp_factory=factory)
        listening.accepting = self.accepting
        listening.announce = self.adopted is None
        return listening

    def _apply(self, config, parts, plan):
        """The swap: nothing here can fail on a config, and nothing waits."""
        self._builder.commit(parts, self._parts)
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
            factory.tls = parts.tls_for(listener)
            factory.client_certs = parts.client_certs_for(listener)
            factory.auth = parts.auth
            factory.recipients = parts.recipients_for(listener)
            listener_service.config = config
            listener_service.listener = listener
            listener_service.name = "listener:" + listener.name  # renamed, maybe
        self.namedServices = {child.name: child for child in self if child.name}
        for new in plan.new_services:
            new.setServiceParent(self)
        by_name = {s.listener.name: s for s in self.listeners()}
        self.services.sort(key=lambda s: _order(s, config.listeners))
        self.factories = [by_name[listener.name].smtp_factory for listener in config.listeners]
        self.config, self._parts = config, parts
        if self.delivery is not None:
            self.delivery.reconfigure(config, self._builder.router(parts), parts.deliverer,
                                      parts.signer)
        if self.admin is not None:
            self.admin.reconfigure(config)
        self._watch_certificate()
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
        plan.stopped = _all([d for d in stopping if d is not None])
        return summary

    def _announce(self, config, old_config, summary):
        """The reload is done: say so, and tell the observers."""
        listeners = summary["listeners"]
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


def _planned_sockets(plan):
    """{new listener name: (fd, family)} of what a reload's plan will listen on."""
    sockets = {}
    for listening, listener in plan.kept:
        if listening.port is not None:
            sockets[listener.name] = listening_socket(listening.port)
    for listening in plan.new_services:
        if listening.port is not None:
            sockets[listening.listener.name] = listening_socket(listening.port)
    return sockets


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
