"""
The twistd plugin's options and service maker: the only module that uses the global reactor.

Every start-up problem (bad config, unreadable key, busy port) is printed as one line naming the
file, section and key, and twistd exits 1: no traceback.
"""

import sys

from twisted.application import service
from twisted.python import usage

from mailgate import Gateway
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
    """Turns a ConfigError raised while starting (a busy port) into one line and exit 1."""

    def privilegedStartService(self):
        try:
            service.MultiService.privilegedStartService(self)
        except ConfigError as e:
            _fail(e)

    def startService(self):
        try:
            service.MultiService.startService(self)
        except ConfigError as e:
            _fail(e)


def makeService(options):
    from twisted.internet import reactor

    try:
        gateway = Gateway.from_config(options["config"], reactor=reactor)
    except ConfigError as e:
        _fail(e)
    top = _Guarded()
    gateway.setServiceParent(top)
    return top
