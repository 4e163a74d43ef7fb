"""
The twistd plugin's options and service maker: the only module that uses the global reactor.

Every start-up problem (bad config, unreadable key, busy port) is printed as one line naming the
file, section and key, and twistd exits 1: no traceback.

SIGHUP reloads the configuration (GatewayService.reload): the handler, installed here and never in
a library module, only hands the work to the reactor thread.
"""

import signal
import sys

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from mailgate import Gateway, privileges
from mailgate.errors import ConfigError


class Options(usage.Options):
    synopsis = "--config FILE"
    optParameters = [["config", "c", None, "the mailgate ini file"]]

    def postOptions(self):
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


def _fail(error):
    # twistd has replaced sys.stderr with its log by the time services start: write to the real one.
    stream = sys.__stderr__ or sys.stderr
    stream.write("mailgate: %s\n" % (error,))
    stream.flush()
    raise SystemExit(1)


class _Guarded(service.MultiService):
    """
    Turns a ConfigError raised while starting (a busy port, a user that does not exist) into one
    line and exit 1.  The listeners bind in privilegedStartService; then root is dropped for
    [gateway] user and group (mailgate.privileges), before any session or file is made.
    """

    config = None

    def privilegedStartService(self):
        try:
            service.MultiService.privilegedStartService(self)
            if self.config is not None:
                privileges.drop(self.config)
        except ConfigError as e:
            _fail(e)

    def startService(self):
        try:
            service.MultiService.startService(self)
        except ConfigError as e:
            _fail(e)


log = Logger()


class _ReloadOnHangup(service.Service):
    """While running, SIGHUP makes the gateway reload its configuration."""

    def __init__(self, gateway, reactor):
        self.gateway = gateway
        self.reactor = reactor
        self._previous = None

    def startService(self):
        service.Service.startService(self)
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self):
        service.Service.stopService(self)
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, signum, frame):
        # A signal handler may run between any two bytecodes: only schedule the work.
        self.reactor.callFromThread(self._reload)

    def _reload(self):
        log.info("SIGHUP: reloading {path}", path=self.gateway.config.path)
        d = self.gateway.reload()
        d.addErrback(lambda failure: None)  # refused: reload() has logged why


def _check_database(config):
    """
    backend = postgresql: refuse to start on a schema behind or ahead of this mailgate, with the
    command to run.  Blocking, but the reactor is not running yet.  An unreachable database is
    not a reason to refuse: the gateway answers 451 until it is back.
    """
    if config.queue.backend != "postgresql":
        return
    from mailgate.queue import migrations
    from mailgate.queue.claims import QueueUnavailable

    try:
        problem = migrations.check_database(config.queue, config.path)
    except QueueUnavailable as e:
        log.warn("queue: {error}; starting anyway (mail is refused with 451 until it is back)",
                 error=str(e))
        return
    if problem:
        raise ConfigError(config.path, "queue", "dsn", problem)


def makeService(options):
    from twisted.internet import reactor

    from mailgate.config import load_config
    from mailgate.processes.pool import receiver_count

    try:
        config = load_config(options["config"])
        _check_database(config)
        # [gateway] workers: receiver processes on both cores (an embedder's gateway is one).
        gateway = Gateway.from_config(config, reactor=reactor, receivers=receiver_count(config))
    except ConfigError as e:
        _fail(e)
    top = _Guarded()
    top.config = gateway.config
    gateway.setServiceParent(top)
    _ReloadOnHangup(gateway, reactor).setServiceParent(top)
    return top
