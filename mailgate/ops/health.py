"""
The health check behind /healthz: can this gateway take mail right now?

It asks the gateway (listeners bound, queue recovery over) and the queue itself
(IQueue.check_writable, with a time limit: True, or False or a str saying why not), so a full
disk or an unreachable database shows as 503 with the reason while it lasts.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

log = Logger()

HEALTH_TIMEOUT = 10.0  # seconds the queue probe may take before /healthz says 503


def health_problems(gateway, clock, timeout=HEALTH_TIMEOUT):
    """
    Deferred[list of str]: why gateway (a GatewayService) cannot take mail; [] when it can.
    Every listener (gateway.listeners()) must have a bound port, queue recovery must be over,
    and gateway.queue.check_writable() must fire True within timeout seconds (False, or a str
    saying why, is a problem).
    """
    problems = []
    for child in gateway.listeners():
        if child.port is None:
            problems.append("listener %s not bound" % (child.listener.name,))
    ready = getattr(gateway, "ready", None)
    if isinstance(ready, defer.Deferred) and not ready.called:
        problems.append("queue recovery in progress")
    d = defer.maybeDeferred(gateway.queue.check_writable)
    if timeout:
        d.addTimeout(timeout, clock)

    def checked(writable):
        if isinstance(writable, str):  # the queue says why (a database unreachable, say)
            problems.append("queue not writable: %s" % (writable,))
        elif writable is not True:
            problems.append("queue not writable")
        return problems

    def failed(failure):
        if failure.check(defer.TimeoutError):
            problems.append("queue not writable: no answer within %gs" % (timeout,))
        else:
            log.failure("queue writability check failed", failure)
            problems.append("queue not writable")
        return problems

    def processes(problems):
        # Asked after the probe's thread hop: a receiver's report of a failed write, sent before
        # its 451, has been read by then.
        if hasattr(gateway, "process_problems"):
            problems.extend(gateway.process_problems())
        return problems

    return d.addCallbacks(checked, failed).addCallback(processes)



class HealthResource(resource.Resource):
    """GET /healthz: 200 "ok", or 503 with one reason a line.  check() -> Deferred[list of str]."""

    isLeaf = True

    def __init__(self, check):
        resource.Resource.__init__(self)
        self.check = check

    def render_GET(self, request):
        finished = []
        request.notifyFinish().addBoth(finished.append)
        d = defer.maybeDeferred(self.check)

        def answer(problems):
            if problems:
                request.setResponseCode(503)
                body = "\n".join(problems) + "\n"
            else:
                body = "ok\n"
            return body

        def broken(failure):
            log.failure("health check failed", failure)
            request.setResponseCode(503)
            return "health check failed\n"

        def write(body):
            if finished:  # the client went away
                return
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Cache-Control", b"no-store")
            request.write(body.encode("utf-8"))
            request.finish()

        d.addCallbacks(answer, broken).addCallback(write)
        d.addErrback(lambda f: log.failure("could not answer a health check", f))
        return server.NOT_DONE_YET
