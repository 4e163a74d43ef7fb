"""
The gateway's HTTP endpoint ([metrics] endpoint), served by twisted.web with no access log, and
the service that runs the metrics refresh and the alerts with it.

MetricsService(config, reactor, gateway) serves, on config.metrics.endpoint (a Twisted server
endpoint string; nothing when empty), with twisted.web (no access log):

  GET /metrics   the registry in the Prometheus text format (prometheus_client.generate_latest,
                 Content-Type prometheus_client.CONTENT_TYPE_LATEST)
  GET /healthz   200 "ok", or 503 with one reason a line: "listener NAME not bound", "queue recovery
                 in progress", "queue not writable" (queue.check_writable() fired False or failed),
                 "queue not writable: no answer within 10s"

It refreshes the queue gauges (once queue recovery is over) and runs mailgate.ops.alerts.Alerts (also
without an endpoint).  Counters also get prometheus_client's *_created series; mailgate_build_info
{version} is 1.
"""

import prometheus_client
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.web import pages, resource, server

from mailgate.errors import ConfigError
from mailgate.ops.health import HealthResource, health_problems
from mailgate.ops.metrics import QUEUE_INTERVAL, Metrics

log = Logger()


class MetricsResource(resource.Resource):
    """GET /metrics: the registry in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics):
        resource.Resource.__init__(self)
        self.metrics = metrics

    def render_GET(self, request):
        request.setHeader(b"Content-Type", prometheus_client.CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self.metrics.exposition()


class _Root(resource.Resource):
    def getChild(self, path, request):
        return pages.notFound()


class _QuietSite(server.Site):
    """A Site that does not write an access log line per scrape."""

    noisy = False

    def log(self, request):
        pass


def make_site(metrics, health):
    """The twisted.web Site: /metrics from metrics, /healthz from health() -> Deferred[list]."""
    root = _Root()
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"healthz", HealthResource(health))
    return _QuietSite(root)


class MetricsService(service.Service):
    """
    Metrics, /metrics and /healthz, and alerts for a gateway (the GatewayService of
    mailgate.service.build_service: its .events, .queue and ListenerService children).

    The Metrics object (.metrics) subscribes to gateway.events at once; metrics, when given, is
    used instead (one made before the gateway, e.g. for InstrumentedResolver, already subscribed
    to the gateway's bus; its queue defaults to gateway.queue).  When started: if
    config.metrics.endpoint is set, the queue gauges are refreshed every queue_interval seconds and
    the endpoint (a Twisted server endpoint string, on reactor) serves the Site; .port is the
    listening port.  mailgate.ops.alerts.Alerts (.alerts) runs when any alert threshold is set.
    """

    name = "metrics"

    def __init__(self, config, reactor, gateway, metrics=None, queue_interval=QUEUE_INTERVAL, spawn=None):
        from mailgate.ops.alerts import Alerts

        self.config = config
        self.reactor = reactor
        self.gateway = gateway
        if metrics is None:
            metrics = Metrics(getattr(gateway, "events", None), reactor, gateway.queue, queue_interval)
        elif metrics.queue is None:
            metrics.queue = gateway.queue
        self.metrics = metrics
        self.metrics.declare_listeners(listener.name for listener in config.listeners)
        self.alerts = Alerts(config.alerts, reactor, self.metrics, gateway.queue, spawn=spawn)
        self.port = None
        self._listening = None

    def health(self):
        return health_problems(self.gateway, self.reactor)

    def startService(self):
        service.Service.startService(self)
        self.alerts.start()
        endpoint_text = self.config.metrics.endpoint
        if not endpoint_text:
            return None
        try:
            endpoint = endpoints.serverFromString(self.reactor, endpoint_text)
        except (ValueError, TypeError) as e:
            self._stop_checks()
            raise ConfigError(self.config.path, "metrics", "endpoint",
                              "invalid endpoint %r: %s" % (endpoint_text, e))
        errors = []
        d = self._listening = endpoint.listen(make_site(self.metrics, self.health))

        def listening(port):
            self.port = port
            self._start_refresh()
            address = port.getHost()
            log.info("metrics listening on {address}", address="%s:%s" % (
                getattr(address, "host", getattr(address, "name", address)), getattr(address, "port", "")))
            return port

        def failed(failure):
            error = ConfigError(self.config.path, "metrics", "endpoint", "cannot listen on %s: %s"
                                % (endpoint_text, failure.getErrorMessage()))
            errors.append(error)
            log.critical("{error}", error=str(error))

        d.addCallbacks(listening, failed)
        if errors:  # TCP and UNIX endpoints fail synchronously: report it now, like the listeners
            self._stop_checks()
            service.Service.stopService(self)
            raise errors[0]
        return d

    def _start_refresh(self):
        """Refresh the queue gauges from now on, or once queue recovery is over (it makes the spool)."""
        ready = getattr(self.gateway, "ready", None)
        if isinstance(ready, defer.Deferred) and not ready.called:
            def recovered(result):
                if self.running and self.port is not None:
                    self.metrics.start()
                return result

            ready.addBoth(recovered)
        else:
            self.metrics.start()

    def _stop_checks(self):
        self.alerts.stop()
        self.metrics.stop()

    def stopService(self):
        service.Service.stopService(self)
        self._stop_checks()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
