"""A synchronous stand-in for the thread pool, and reading a Deferred that has already fired."""

from twisted.internet import defer
from twisted.python.failure import Failure


class Runner:
    """A synchronous run_in_thread that records what it ran."""

    def __init__(self):
        self.calls = 0

    def __call__(self, f, *args):
        self.calls += 1
        return defer.maybeDeferred(f, *args)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]
