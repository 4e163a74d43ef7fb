"""
The composition root: build_service(config, reactor, ...) wires the stages into one gateway.

It is the only module that knows how the parts fit together (listeners, filter chains, the
queue, delivery, and the ops side that subscribes to their events), and it is pure: the
reactor, the thread pool and the hooks come in, nothing global is touched, so the twistd plugin,
embedders and tests all build the same tree.  The builder here also makes the parts of each new
configuration for a reload (mailgate.gateway).
"""

import os
from functools import partial

from twisted.internet import threads
from twisted.logger import Logger

from mailgate import tls as mailtls
from mailgate.errors import ConfigError
from mailgate.events import EventBus
from mailgate.gateway import GatewayService
from mailgate.queue import Spool, new_queue_id
from mailgate.smtp.anvil import Anvil
from mailgate.smtp.listener import CurrentTLS

log = Logger()


class _Parts:
    """What one configuration is made of, built before a reload swaps anything."""

    def __init__(self, config, resolver, tls, auth, chains, signer, deliverer, users_path,
                 directory=None, users=None):
        self.config = config
        self.directory = directory  # a mailgate.directory.Directory when [ldap] is used
        self.resolver = resolver
        self.tls = tls  # CertificateOptions, or None when no listener uses TLS
        self.auth = auth
        self.chains = chains  # listener name -> filter chain (or the injected hooks)
        self.signer = signer
        self.deliverer = deliverer  # None: keep the one given to build_service
        self.users_path = users_path
        self.users = users  # the users file backend (also when inside a Chain), or None
        self.listener_tls = {}  # listener name -> options asking for client certificates
        self.client_certs = {}  # listener name -> mailgate.smtp.clientcert.ClientCertificates

    def tls_for(self, listener):
        """The TLS options of a listener: its own when it asks for client certificates."""
        return self.listener_tls.get(listener.name, self.tls)

    def client_certs_for(self, listener):
        return self.client_certs.get(listener.name)

    def recipients_for(self, listener):
        """The IRecipientValidator of a listener with recipients = ldap, else None."""
        if listener.recipients == "ldap" and self.directory is not None:
            return self.directory.recipients
        return None


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
        self.current_tls = CurrentTLS()
        # The counters across sessions, shared by every listener and kept across reloads.
        self.anvil = Anvil(reactor)

    def prepare(self, config, previous=None):
        from mailgate.filters import FilterContext, build_chain

        if previous is not None:
            _check_unchanged(config, previous.config)
        resolver = self._resolver(config, previous)
        context = FilterContext(config, self.reactor, resolver, self.run, events=self.events)
        tls = _tls_options(config)
        directory = self._directory(config, resolver, previous)
        auth, users, users_path = self._auth(config, previous, directory)
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
        parts = _Parts(config, resolver, tls, auth, chains, signer, deliverer, users_path,
                       directory, users)
        parts.listener_tls, parts.client_certs = _client_certificates(config)
        return parts

    def commit(self, parts, previous=None):
        if parts.tls is not None:
            self.current_tls.options = parts.tls
        self.current_tls.by_listener = dict(parts.listener_tls)
        if previous is not None and previous.directory not in (None, parts.directory):
            previous.directory.close()  # its sessions reconnect to it if they still ask

    def _directory(self, config, resolver, previous):
        """The Directory when a listener or AUTH uses [ldap] (kept on a reload that leaves it)."""
        uses = "ldap" in config.auth.backend or any(
            listener.recipients == "ldap" for listener in config.listeners)
        if not uses or not config.ldap.servers:
            return None
        from mailgate.directory import Directory, read_bind_password

        if (previous is not None and previous.directory is not None
                and previous.config.ldap == config.ldap
                and read_bind_password(config) == previous.directory.client.bind_password):
            return previous.directory
        return Directory(config, self.reactor, resolver)

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
        from mailgate.resolver import TimedResolver, make_resolver

        resolver = make_resolver(config.dns, self.reactor)  # the one resolver: filters and delivery
        if self.events is not None:
            resolver = TimedResolver(resolver, self.events, self.reactor)  # "dns" events: metrics
        return resolver

    def _auth(self, config, previous, directory=None):
        """
        (IAuthBackend or None, the users file backend or None, its path or None): [auth]
        backend, in its order.
        """
        if self.auth is not None:
            return self.auth, None, None
        users, path = None, None
        if "file" in config.auth.backend:
            users, path = self._users_file(config, previous)
        backends = []
        for name in config.auth.backend:
            if name == "file" and users is not None:
                backends.append(users)
            elif name == "ldap" and directory is not None:
                backends.append(directory.auth)
        if len(backends) <= 1:
            return (backends[0] if backends else None), users, path
        from mailgate.directory import Chain

        return Chain(backends, grants=users), users, path

    def _users_file(self, config, previous):
        """(the UsersFile backend or None, its path or None)."""
        path = config.auth.users_file
        if path is None:
            return None, None
        if previous is not None and previous.users_path == path and previous.users is not None:
            # The same file: the backend re-reads it whenever it changes, and keeps the last good
            # copy when a change breaks it.
            return previous.users, path
        from mailgate.smtp.auth import UsersFile

        if previous is not None:
            _check_users_file(config)  # a new file must be good before sessions depend on it
        return UsersFile(path, self.reactor, self.threadpool, self.run_in_thread), path


def _check_unchanged(config, old):
    """What a reload cannot change."""
    if config.queue != old.queue:
        key = next(k for k in ("backend", "path", "dsn", "password_file", "node_id", "lease",
                               "pool_size") if getattr(config.queue, k) != getattr(old.queue, k))
        raise ConfigError(config.path, "queue", key,
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


def _prepare_spool_dir(config):
    path = config.queue.path
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(config.path, "queue", "path", "cannot create %s: %s" % (path, e.strerror))
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(config.path, "queue", "path", "not writable: %s" % (path,))


def _client_certificates(config):
    """({listener: TLS options asking for certificates}, {listener: ClientCertificates})."""
    options, certificates = {}, {}
    for listener in config.listeners:
        if not listener.relay_client_certs or listener.tls == "none":
            continue
        from mailgate.smtp.clientcert import ClientCertificates

        try:
            certs = ClientCertificates(listener.relay_client_certs, config.tls.client_ca_file)
        except (OSError, ValueError) as e:
            raise ConfigError(config.path, "tls", "client_ca_file",
                              "cannot load the CA certificates in %s: %s"
                              % (config.tls.client_ca_file, getattr(e, "strerror", None) or e))
        own = mailtls.server_context_factory(config.tls, config.path)  # not shared: changed here
        options[listener.name] = certs.server_options(own, b"mailgate-" + listener.name.encode())
        certificates[listener.name] = certs
    return options, certificates


def make_queue(config, reactor, threadpool=None, run_in_thread=None):
    """The IQueue (and IWorkSource) of [queue] backend: the spool, or the shared PostgreSQL queue."""
    if config.queue.backend == "postgresql":
        from mailgate.queue.postgresql import PostgresQueue

        return PostgresQueue(config.queue, reactor, config.path)
    return Spool(config.queue.path, reactor, threadpool, run_in_thread)


def _tls_options(config):
    if not any(listener.tls != "none" for listener in config.listeners):
        return None
    if mailtls.ensure_certificate(config.tls, config.gateway.hostname):
        log.warn("generated a self-signed certificate for {hostname}", hostname=config.gateway.hostname)
    return mailtls.server_context_factory(config.tls, config.path)


def build_service(config, reactor, threadpool=None, run_in_thread=None, hooks=None, auth=None,
                  resolver=None, deliverer=None, deliver=True, admin=True, receivers=0,
                  adopted=None):
    """
    The gateway for config as an IService.  threadpool (default: the reactor's) runs every disk
    write, fsync, password hash and DKIM signature; run_in_thread replaces it in tests.  auth
    replaces the users file backend (any IAuthBackend), resolver the DNS resolver built from
    [dns], deliverer the SMTP client; deliver=False builds a receive-only gateway.  hooks, when
    given, replaces every listener's filter chain (built from its filters key otherwise).
    admin=False leaves out the admin channel ([admin] socket).

    receivers=N (2 or more) makes the main process of a gateway with N receiver processes
    (mailgate.processes): its listeners bind but do not accept.  adopted ({listener name:
    (descriptor, family)}) makes a receiver process: listeners on those inherited sockets, no
    queue recovery, no delivery, admin channel, logs or /metrics (the main process has them).
    Raises ConfigError for anything wrong that can be seen before starting.
    """
    from mailgate.ops.httpd import MetricsService
    from mailgate.ops.metrics import Metrics
    from mailgate.delivery.scheduler import DeliveryService

    if threadpool is None and run_in_thread is None:
        threadpool = reactor.getThreadPool()
    _prepare_spool_dir(config)
    receiving = adopted is not None  # a receiver process
    if receiving:
        deliver = admin = False
    events = EventBus(reactor)
    metrics = None if receiving else Metrics(events, reactor)
    builder = _Builder(reactor, threadpool, run_in_thread, hooks, auth, resolver, deliverer,
                       events=events, metrics=metrics)
    parts = builder.prepare(config)
    builder.commit(parts)
    queue = make_queue(config, reactor, threadpool, run_in_thread)
    delivery = None
    if deliver:
        delivery = DeliveryService(queue, builder.router(parts), parts.deliverer or deliverer, config,
                                   reactor, new_queue_id, signer=parts.signer, events=events)
    gateway = GatewayService(config, queue, [], delivery, recover=not receiving)
    gateway.events = events  # subscribe here for protocol and tracking events
    gateway._builder, gateway._parts = builder, parts
    gateway.adopted = adopted
    if receivers > 1:
        from mailgate.processes.pool import ReceiverPool

        gateway.accepting = False
        gateway.receivers = ReceiverPool(gateway, reactor, receivers)
    if config.logging.dir and not receiving:
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
    if not receiving:
        # /metrics and /healthz when [metrics] endpoint is set; the [alerts] checks in any case.
        gateway.metrics = MetricsService(config, reactor, gateway, metrics=metrics)
        gateway.metrics.setServiceParent(gateway)
    return gateway
