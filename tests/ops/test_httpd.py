"""
mailgate.ops.httpd and mailgate.ops.health: /metrics and /healthz served over real HTTP on
127.0.0.1 by a real gateway (trial with the running reactor), and the MetricsService's life.
"""

import os
import shutil
import urllib.error
import urllib.request

import attr
import prometheus_client

from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailgate.config import (AuthConfig, Config, DNSConfig, GatewayConfig, Limits, MetricsConfig,
                             QueueConfig, TLSConfig)
from mailgate.errors import ConfigError
from mailgate.ops.httpd import MetricsService
from mailgate.ops.metrics import InstrumentedResolver, Metrics
from mailgate.service import build_service as _build_service

from tests.ops.test_metrics import FakeResolver, parse, value
from tests.smtphelp import listener


def sync_runner(f, *args):
    return defer.maybeDeferred(f, *args)


def build_service(config, reactor, **kwargs):
    """build_service without the admin channel (when there is one: it is not what is tested here)."""
    import inspect

    if "admin" in inspect.signature(_build_service).parameters:
        kwargs.setdefault("admin", False)
    return _build_service(config, reactor, **kwargs)


def gateway_config(case, endpoint="tcp:0:interface=127.0.0.1"):
    root = os.path.abspath(case.mktemp())
    os.makedirs(root)
    return Config(
        path=root + "/mailgate.ini",
        gateway=GatewayConfig(hostname="mx.example.net", accepted_domains=("example.com",)),
        limits=Limits(), queue=QueueConfig(path=root + "/spool"), tls=TLSConfig(), auth=AuthConfig(),
        dns=DNSConfig(nameservers=(("127.0.0.1", 1),)),  # never asked
        listeners=(listener(name="relay", endpoint="tcp:0:interface=127.0.0.1", tls="none", auth="none"),
                   listener(name="submission", endpoint="tcp:0:interface=127.0.0.1", tls="none",
                            auth="none", role="submission")),
        metrics=MetricsConfig(endpoint=endpoint))


class HTTPTests(unittest.TestCase):
    """A real gateway on 127.0.0.1:0 with its MetricsService, asked over HTTP."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.config = gateway_config(self)
        self.gateway = build_service(self.config, reactor, run_in_thread=sync_runner, deliver=False)
        # As build_service may wire it: a child of the gateway, started and stopped with it.
        self.gateway.metrics.disownServiceParent()  # this test builds its own
        self.service = MetricsService(self.config, reactor, self.gateway)
        self.service.setServiceParent(self.gateway)
        self.gateway.startService()
        self.addCleanup(self.gateway.stopService)
        self.assertIsNotNone(self.service.port)

    def get(self, path):
        """(status, Content-Type, body) of GET path, asked by urllib in a thread."""
        from twisted.internet import threads

        url = "http://127.0.0.1:%d%s" % (self.service.port.getHost().port, path.decode("ascii"))

        def fetch():
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    return response.status, response.headers["Content-Type"], response.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers["Content-Type"], e.read()

        return threads.deferToThread(fetch)

    def smtp_port(self, name):
        for child in self.gateway:
            if getattr(child, "listener", None) is not None and child.listener.name == name:
                return child.port.getHost().port

    @defer.inlineCallbacks
    def smtp_quit(self, port):
        """A real client on the loopback: banner, EHLO, QUIT (in a thread, with a deadline)."""
        from twisted.internet import threads
        import smtplib

        def talk():
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as c:
                c.ehlo()

        yield threads.deferToThread(talk)

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=10.0):
        deadline = self.reactor.seconds() + timeout
        while not predicate():
            if self.reactor.seconds() > deadline:
                self.fail("condition not met within %gs" % timeout)
            yield task.deferLater(self.reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def test_metrics_scraped_over_http(self):
        yield self.smtp_quit(self.smtp_port("relay"))
        yield self.wait_for(lambda: self.service.metrics.registry.get_sample_value(
            "mailgate_connections_open", {"listener": "relay"}) == 0)
        self.gateway.events.track("RECEIVE", listener="relay", latency=0.05)
        yield self.service.metrics.refresh_queue()
        status, content_type, body = yield self.get(b"/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(content_type, prometheus_client.CONTENT_TYPE_LATEST)
        s = parse(body.decode("utf-8"))
        self.assertEqual(value(s, "mailgate_connections_total", listener="relay"), 1)
        self.assertEqual(value(s, "mailgate_connections_open", listener="relay"), 0)
        self.assertEqual(value(s, "mailgate_connections_total", listener="submission"), 0)
        self.assertEqual(value(s, "mailgate_messages_received_total", listener="relay"), 1)
        self.assertEqual(value(s, "mailgate_accept_seconds_count"), 1)
        self.assertEqual(value(s, "mailgate_queue_messages", state="active"), 0)
        self.assertIn(("mailgate_build_info", (("version", "0.1.0"),)), s)

    @defer.inlineCallbacks
    def test_healthz(self):
        status, content_type, body = yield self.get(b"/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))
        self.assertEqual(content_type, "text/plain; charset=utf-8")

        # The spool cannot take messages: tmp/ is a file now (fails for root too).
        tmp = os.path.join(self.config.queue.path, "tmp")
        shutil.rmtree(tmp)
        with open(tmp, "w"):
            pass
        status, _, body = yield self.get(b"/healthz")
        self.assertEqual((status, body), (503, b"queue not writable: spool %s not writable: Not a "
                                          b"directory (ENOTDIR)\n" % self.config.queue.path.encode()))
        self.flushLoggedErrors()

        os.remove(tmp)
        os.mkdir(tmp)
        status, _, body = yield self.get(b"/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))

        # A listener that is not bound.
        relay = [c for c in self.gateway if getattr(c, "name", None) == "listener:relay"][0]
        yield relay.stopService()
        status, _, body = yield self.get(b"/healthz")
        self.assertEqual((status, body), (503, b"listener relay not bound\n"))
        relay.startService()

    @defer.inlineCallbacks
    def test_healthz_with_a_queue_that_never_answers(self):
        class Stuck:
            def check_writable(self):
                return defer.Deferred()

        from mailgate.ops.health import health_problems

        self.gateway.queue = Stuck()
        clock = Clock()
        d = health_problems(self.gateway, clock, timeout=5)
        clock.advance(5)
        self.assertEqual((yield d), ["queue not writable: no answer within 5s"])

    @defer.inlineCallbacks
    def test_unknown_path_is_404(self):
        status, _, _ = yield self.get(b"/nothing")
        self.assertEqual(status, 404)


class ServiceTests(unittest.TestCase):
    def test_no_endpoint_no_port(self):
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        config = gateway_config(self, endpoint=None)
        gateway = build_service(config, reactor, run_in_thread=sync_runner, deliver=False)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway)
        service.startService()
        self.assertIsNone(service.port)
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(reactor.getDelayedCalls(), [])  # no queue refresh, no alerts
        service.stopService()

    def test_listens_on_the_injected_reactor(self):
        from twisted.internet.testing import MemoryReactorClock

        from tests.test_service import HeldRunner

        reactor = MemoryReactorClock()
        runner = HeldRunner()
        config = gateway_config(self, endpoint="tcp:9100:interface=127.0.0.1")
        gateway = build_service(config, reactor, run_in_thread=runner, deliver=False)
        gateway.startService()
        self.addCleanup(gateway.stopService)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway, queue_interval=15)
        service.startService()
        self.assertEqual(reactor.tcpServers[-1][0], 9100)
        self.assertEqual(reactor.tcpServers[-1][3], "127.0.0.1")
        # The queue gauges wait for the spool's recovery (the only job so far), then refresh.
        self.assertEqual([f.__name__ for _, f, _ in runner.jobs], ["_recover"])
        runner.run_all()
        self.assertEqual(len(reactor.getDelayedCalls()), 1)  # the next queue refresh
        self.assertEqual(service.metrics.registry.get_sample_value(
            "mailgate_queue_messages", {"state": "deferred"}), 0)
        service.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_alerts_run_without_an_endpoint(self):
        from twisted.internet.testing import MemoryReactorClock

        from mailgate.config import AlertsConfig

        reactor = MemoryReactorClock()
        config = attr.evolve(gateway_config(self, endpoint=None),
                             alerts=AlertsConfig(interval=10.0, queue_size=1000))
        gateway = build_service(config, reactor, run_in_thread=sync_runner, deliver=False)
        gateway.startService()
        self.addCleanup(gateway.stopService)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway)
        service.startService()
        self.assertEqual([call.getTime() for call in reactor.getDelayedCalls()], [10.0])
        reactor.advance(10)
        self.assertEqual(service.metrics.registry.get_sample_value(
            "mailgate_alert_active", {"alert": "queue_size"}), 0)
        self.assertEqual(service.metrics.registry.get_sample_value(
            "mailgate_queue_messages", {"state": "active"}), 0)
        service.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_metrics_made_before_the_gateway(self):
        """How build_service can wire it: one Metrics for the resolver and the service."""
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        config = gateway_config(self, endpoint=None)
        upstream = FakeResolver()
        gateway = build_service(config, reactor, run_in_thread=sync_runner, deliver=False,
                                resolver=upstream)
        metrics = Metrics(gateway.events, reactor)
        resolver = InstrumentedResolver(upstream, metrics, reactor)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway, metrics=metrics)
        self.assertIs(service.metrics, metrics)
        self.assertIs(metrics.queue, gateway.queue)
        resolver.lookupAddress("a.example")
        gateway.events.track("RECEIVE", listener="relay", latency=0.1)
        self.assertEqual(metrics.registry.get_sample_value("mailgate_messages_received_total",
                                                           {"listener": "relay"}), 1)
        self.assertEqual(metrics.registry.get_sample_value("mailgate_connections_open",
                                                           {"listener": "submission"}), 0)

    def test_port_in_use_is_a_config_error(self):
        import errno
        import socket

        from twisted.internet.error import CannotListenError
        from twisted.internet.testing import MemoryReactorClock

        class BusyReactor(MemoryReactorClock):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise CannotListenError(interface, port, socket.error(errno.EADDRINUSE, "in use"))

        reactor = BusyReactor()
        config = gateway_config(self, endpoint="tcp:9100")
        gateway = build_service(config, MemoryReactorClock(), run_in_thread=sync_runner, deliver=False)
        gateway.metrics.disownServiceParent()  # this test builds its own
        service = MetricsService(config, reactor, gateway)
        error = self.assertRaises(ConfigError, service.startService)
        self.assertIn("[metrics] endpoint: cannot listen on tcp:9100", str(error))
        self.assertFalse(service.running)
        self.assertEqual(reactor.getDelayedCalls(), [])
