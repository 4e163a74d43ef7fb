"""
The gate sessions wait at before their banner: closed while the queue recovers from a crash.

Listeners bind at start-up (so a busy port is reported at once) but no client is greeted, and
so nothing is accepted, until the queue has cleaned up what a crash left behind.
"""

from twisted.internet import defer


class Gate:
    """Holds sessions back (before their banner) until the gateway is ready, or fails them all."""

    def __init__(self, is_open=True):
        self._open = is_open
        self._failure = None
        self._waiting = []

    def wait(self):
        if self._open:
            return defer.succeed(None)
        if self._failure is not None:
            return defer.fail(self._failure)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def open(self):
        self._open = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def fail(self, failure):
        self._failure = failure
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)
