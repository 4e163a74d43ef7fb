"""
GatewayService.reload() on a MemoryReactorClock: routes, listeners, limits and the TLS certificate
change for what comes next, while open sessions finish under the settings they started with, and
a configuration with errors is refused with the old one still running.
"""

import os
import shutil

from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial import unittest

from mailgate import Gateway
from mailgate.config import load_config
from mailgate.envelope import Envelope
from mailgate.errors import ConfigError

from tests.delivery.test_scheduler import FakeDeliverer, sync
from tests.tlsutil import make_ca

HOSTNAME = "mx.example.net"


class _Port:
    def __init__(self, reactor, port, interface):
        self.reactor = reactor
        self.address = IPv4Address("TCP", interface or "0.0.0.0", port)

    def getHost(self):
        return self.address

    def stopListening(self):
        self.reactor.listening.pop(self.address.port, None)
        self.reactor.stopped.append(self.address.port)


class Reactor(MemoryReactorClock):
    """A port is busy while something listens on it (or when the test says so)."""

    def __init__(self):
        MemoryReactorClock.__init__(self)
        self.listening = {}
        self.stopped = []
        self.busy = set()

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.busy or port in self.listening:
            import errno
            import socket

            from twisted.internet.error import CannotListenError

            raise CannotListenError(interface, port, socket.error(errno.EADDRINUSE, "in use"))
        MemoryReactorClock.listenTCP(self, port, factory, backlog, interface)
        self.listening[port] = _Port(self, port, interface)
        return self.listening[port]

    def factory_on(self, port):
        """The factory most recently listening on port."""
        return [f for p, f, _, _ in self.tcpServers if p == port][-1]


class NoDNS:
    """The resolver: every name in these tests is an IP literal, so nothing may ask."""

    def __getattr__(self, name):
        raise AssertionError("DNS was used: %s" % (name,))


LISTENER = """
[listener:{name}]
endpoint = tcp:{port}:interface=127.0.0.1
role = relay
tls = {tls}
auth = none
filters =
max_recipients = {max_recipients}
"""

BASE = """
[gateway]
hostname = mx.example.net
accepted_domains = example.com

[queue]
path = spool

[tls]
certificate = server.pem
private_key = server.key

[dns]
nameservers = 127.0.0.1:1

[delivery]
retry = 1m
delay_warning = 0

[route:{route}]
domains = *
smarthost = 127.0.0.1:{smarthost}
tls = none
"""


def config_text(route="first", smarthost=2601, listeners=(("relay", 2525, "optional", 5),)):
    text = BASE.format(route=route, smarthost=smarthost)
    for name, port, tls, max_recipients in listeners:
        text += LISTENER.format(name=name, port=port, tls=tls, max_recipients=max_recipients)
    return text


def session(factory, peer="192.0.2.1"):
    proto = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    proto.makeConnection(transport)
    return proto, transport


def say(proto, transport, line):
    transport.clear()
    proto.dataReceived(line.encode("ascii") + b"\r\n")
    return transport.value().decode("ascii")


class ReloadTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.ca = make_ca(os.path.join(self.root, "ca"))
        self.issue()
        self.path = os.path.join(self.root, "mailgate.ini")
        self.write(config_text())
        self.reactor = Reactor()
        self.deliverer = FakeDeliverer()
        self.gateway = Gateway.from_config(self.path, reactor=self.reactor, run_in_thread=sync,
                                           resolver=NoDNS(), deliverer=self.deliverer)
        self.gateway.startService()
        self.addCleanup(self.gateway.stopService)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def issue(self):
        """A new certificate and key for HOSTNAME, at the paths the config names."""
        cert, key = self.ca.issue(HOSTNAME, os.path.join(self.root, "new"))
        shutil.move(cert, os.path.join(self.root, "server.pem"))
        shutil.move(key, os.path.join(self.root, "server.key"))
        with open(os.path.join(self.root, "server.pem"), "rb") as f:
            return Certificate.loadPEM(f.read()).serialNumber()

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def reload(self, text=None):
        if text is not None:
            self.write(text)
        return self.gateway.reload()

    def enqueue(self, qid, rcpt="u@remote.example"):
        envelope = Envelope(queue_id=qid, sender="a@sender.example", recipients=(rcpt,),
                            client_ip="192.0.2.1", received_at=self.reactor.seconds())
        self.successResultOf(self.gateway.queue.enqueue(envelope, b"Subject: x\r\n\r\nhi\r\n"))

    def messages(self, level_name):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged if e.get("log_level").name == level_name]

    # -- routes

    def test_a_changed_route_is_used_by_the_next_delivery(self):
        self.enqueue("Q1")
        self.assertEqual(self.deliverer.calls[-1][0], "first")
        summary = self.successResultOf(self.reload(config_text(route="second", smarthost=2602)))
        self.assertEqual(summary["routes"], ["second"])
        self.enqueue("Q2")
        self.assertEqual([c[0] for c in self.deliverer.calls], ["first", "second"])
        self.assertEqual(self.gateway.delivery.router.route_for("remote.example").smarthosts,
                         (("127.0.0.1", 2602),))
        self.assertTrue(any("configuration reloaded from %s" % self.path in m
                            for m in self.messages("info")))

    def test_the_router_knows_the_listeners_addresses_for_loop_detection(self):
        self.assertTrue(self.gateway.delivery.router.is_local("127.0.0.1", 2525))
        self.successResultOf(self.reload(config_text(listeners=(("relay", 2526, "optional", 5),))))
        self.assertTrue(self.gateway.delivery.router.is_local("127.0.0.1", 2526))
        self.assertFalse(self.gateway.delivery.router.is_local("127.0.0.1", 2525))

    # -- listeners

    def test_an_added_listener_binds_and_a_removed_one_stops_listening(self):
        open_session, open_transport = session(self.reactor.factory_on(2525))
        summary = self.successResultOf(self.reload(config_text(listeners=(
            ("relay", 2525, "optional", 5), ("second", 2526, "none", 5)))))
        self.assertEqual(summary["listeners"], {"added": ["second"], "removed": [], "changed": [],
                                                "kept": ["relay"]})
        self.assertEqual([p for p, _, _, _ in self.reactor.tcpServers], [2525, 2526])
        self.assertEqual([s.name for s in self.gateway.listeners()], ["listener:relay", "listener:second"])
        self.assertEqual(self.gateway.getServiceNamed("listener:second").port.getHost().port, 2526)
        proto, transport = session(self.reactor.factory_on(2526))
        self.assertTrue(transport.value().startswith(b"220 mx.example.net ESMTP"))  # the gate is open

        summary = self.successResultOf(self.reload(config_text(listeners=(("second", 2526, "none", 5),))))
        self.assertEqual(summary["listeners"], {"added": [], "removed": ["relay"], "changed": [],
                                                "kept": ["second"]})
        self.assertEqual(self.reactor.stopped, [2525])
        self.assertEqual([s.name for s in self.gateway.listeners()], ["listener:second"])
        self.assertEqual(self.gateway.factories, [self.reactor.factory_on(2526)])
        # A session on the removed listener, opened before, goes on as if nothing happened.
        self.assertTrue(say(open_session, open_transport, "EHLO client.example").startswith("250"))
        self.assertTrue(say(open_session, open_transport, "MAIL FROM:<a@b.example>").startswith("250"))
        self.assertFalse(open_transport.disconnecting)

    def test_a_renamed_listener_on_the_same_endpoint_keeps_its_port(self):
        factory = self.reactor.factory_on(2525)
        renamed = config_text(listeners=(("inbound", 2525, "optional", 5),))
        summary = self.successResultOf(self.reload(renamed))
        self.assertEqual(summary["listeners"], {"added": [], "removed": [], "changed": [],
                                                "kept": ["inbound"]})
        self.assertEqual(self.reactor.stopped, [])
        self.assertIs(self.gateway.getServiceNamed("listener:inbound").smtp_factory, factory)
        self.assertRaises(KeyError, self.gateway.getServiceNamed, "listener:relay")
        self.assertEqual(factory.listener.name, "inbound")

    def test_two_listeners_swapping_names_keep_their_ports(self):
        two = (("a", 2525, "optional", 5), ("b", 2526, "none", 5))
        self.successResultOf(self.reload(config_text(listeners=two)))
        swapped = (("b", 2525, "optional", 5), ("a", 2526, "none", 5))
        summary = self.successResultOf(self.reload(config_text(listeners=swapped)))
        self.assertEqual(summary["listeners"]["kept"], ["b", "a"])
        self.assertEqual(self.reactor.stopped, [])
        self.assertEqual(self.gateway.getServiceNamed("listener:b").port.getHost().port, 2525)
        self.assertEqual(self.gateway.getServiceNamed("listener:a").port.getHost().port, 2526)
        self.assertEqual([f.listener.name for f in self.gateway.factories], ["b", "a"])

    def test_a_changed_endpoint_stops_the_old_port_and_binds_the_new(self):
        self.successResultOf(self.reload(config_text(listeners=(("relay", 2527, "optional", 5),))))
        self.assertEqual(self.reactor.stopped, [2525])
        self.assertEqual([p for p, _, _, _ in self.reactor.tcpServers], [2525, 2527])

    def test_same_endpoint_switched_to_implicit_tls_is_rebound_after_the_old_stops(self):
        self.successResultOf(self.reload(config_text(listeners=(("relay", 2525, "optional", 5),
                                                                ("smtps", 2526, "none", 5)))))
        summary = self.successResultOf(self.reload(config_text(listeners=(
            ("relay", 2525, "optional", 5), ("smtps", 2526, "implicit", 5)))))
        self.assertEqual(summary["listeners"], {"added": [], "removed": [], "changed": ["smtps"],
                                                "kept": ["relay"]})
        self.assertEqual(self.reactor.stopped, [2526])
        self.assertIsInstance(self.reactor.factory_on(2526), TLSMemoryBIOFactory)
        self.assertEqual(sorted(self.reactor.listening), [2525, 2526])

    def test_a_failed_rebind_puts_the_old_listener_back(self):
        self.successResultOf(self.reload(config_text(listeners=(("relay", 2525, "optional", 5),
                                                                ("smtps", 2526, "none", 5)))))
        plain = self.reactor.factory_on(2526)
        original = self.reactor.listenTCP

        def refuse_tls(port, factory, backlog=50, interface=""):
            if isinstance(factory, TLSMemoryBIOFactory):
                self.reactor.busy.add(port)
                try:
                    return original(port, factory, backlog, interface)
                finally:
                    self.reactor.busy.discard(port)
            return original(port, factory, backlog, interface)

        self.reactor.listenTCP = refuse_tls
        self.failureResultOf(self.reload(config_text(listeners=(
            ("relay", 2525, "optional", 5), ("smtps", 2526, "implicit", 5)))), ConfigError)
        self.assertIs(self.reactor.factory_on(2526), plain)  # listening again, as it was
        self.assertEqual(sorted(self.reactor.listening), [2525, 2526])
        self.assertEqual(self.gateway.getServiceNamed("listener:smtps").listener.tls, "none")

    def test_a_listener_that_cannot_bind_refuses_the_reload(self):
        self.reactor.busy.add(2530)
        failure = self.failureResultOf(self.reload(config_text(route="second", listeners=(
            ("relay", 2525, "optional", 5), ("busy", 2530, "none", 5)))), ConfigError)
        self.assertIn("[listener:busy] endpoint: cannot listen on tcp:2530:interface=127.0.0.1: "
                      "address already in use", str(failure.value))
        self.assertEqual(self.gateway.config.routes[0].name, "first")
        self.assertEqual([s.name for s in self.gateway.listeners()], ["listener:relay"])

    # -- sessions

    def test_an_open_session_keeps_its_settings_and_a_new_one_gets_the_new(self):
        factory = self.reactor.factory_on(2525)
        old, old_transport = session(factory)
        say(old, old_transport, "EHLO client.example")
        say(old, old_transport, "MAIL FROM:<a@sender.example>")
        self.successResultOf(self.reload(config_text(listeners=(("relay", 2525, "optional", 1),))))
        self.assertIs(self.reactor.factory_on(2525), factory)  # the same port, the same factory
        self.assertEqual(factory.listener.max_recipients, 1)
        new, new_transport = session(factory)
        say(new, new_transport, "EHLO client.example")
        say(new, new_transport, "MAIL FROM:<a@sender.example>")
        self.assertTrue(say(new, new_transport, "RCPT TO:<a@example.com>").startswith("250"))
        self.assertTrue(say(new, new_transport, "RCPT TO:<b@example.com>").startswith("452 4.5.3"))
        for rcpt in ("a", "b", "c"):  # max_recipients was 5 when it connected
            self.assertTrue(say(old, old_transport, "RCPT TO:<%s@example.com>" % rcpt).startswith("250"))
        self.assertFalse(old_transport.disconnecting)

    def test_a_renewed_certificate_is_used_by_new_tls_sessions(self):
        first = self.issue()  # the one on disk now is not the one loaded at start...
        self.successResultOf(self.reload(config_text(listeners=(("relay", 2525, "optional", 5),
                                                                ("smtps", 2465, "implicit", 5)))))
        self.assertEqual(self.handshake(2465), first)
        plain = self.reactor.factory_on(2525)
        old, _ = session(plain)
        old_options = old.factory.tls
        renewed = self.issue()  # ...and is renewed again
        self.assertNotEqual(renewed, first)
        self.successResultOf(self.reload())
        self.assertEqual(self.handshake(2465), renewed)
        self.assertIs(old.factory.tls, old_options)  # a STARTTLS session keeps its options
        new, _ = session(plain)
        self.assertIsNot(new.factory.tls, old_options)

    def test_a_certificate_renewed_on_disk_is_used_within_a_minute_without_sighup(self):
        self.successResultOf(self.reload(config_text(listeners=(("relay", 2525, "optional", 5),
                                                                ("smtps", 2465, "implicit", 5)))))
        loaded = self.handshake(2465)
        plain = self.reactor.factory_on(2525)
        before = session(plain)[0].factory.tls
        renewed = self.issue()  # certbot's renewal: new files at the same paths
        self.reactor.advance(20)  # seen changing: not loaded yet (the pair may be half written)
        self.assertEqual(self.handshake(2465), loaded)
        self.reactor.advance(20)
        self.assertEqual(self.handshake(2465), renewed)
        self.assertIsNot(session(plain)[0].factory.tls, before)  # STARTTLS gets it too
        self.assertEqual(self.messages("error"), [])
        self.assertIn("certificate %s renewed on disk: new sessions use it"
                      % os.path.join(self.root, "server.pem"), self.messages("info"))

    def test_a_broken_renewed_file_is_logged_once_and_the_old_certificate_stays(self):
        self.successResultOf(self.reload(config_text(listeners=(("smtps", 2465, "implicit", 5),))))
        loaded = self.handshake(2465)
        key = os.path.join(self.root, "server.key")
        with open(key, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        for _ in range(6):
            self.reactor.advance(20)
        [error] = self.messages("error")
        self.assertTrue(error.startswith("renewed certificate not used: %s: [tls] private_key: "
                                         "cannot load the private key in %s" % (self.path, key)), error)
        self.assertTrue(error.endswith("; the old certificate stays in use"), error)
        self.assertNotIn("\n", error)
        self.assertEqual(self.handshake(2465), loaded)
        renewed = self.issue()  # fixed
        self.reactor.advance(20)
        self.reactor.advance(20)
        self.assertEqual(self.handshake(2465), renewed)

    def test_the_watch_stops_with_the_gateway(self):
        watch = self.gateway.certificate_watch
        self.assertIsNotNone(watch)
        self.gateway.stopService()
        self.assertIsNone(self.gateway.certificate_watch)
        self.assertFalse(self.reactor.getDelayedCalls() and any(
            getattr(c.func, "__self__", None) is watch._loop for c in self.reactor.getDelayedCalls()))

    def handshake(self, port):
        """The serial number of the certificate a new TLS client gets on port."""
        server = self.reactor.factory_on(port).buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
        with open(self.ca.ca_path, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        client_factory = TLSMemoryBIOFactory(optionsForClientTLS(HOSTNAME, trust), True,
                                             protocol.ClientFactory.forProtocol(protocol.Protocol),
                                             clock=self.reactor)
        client = client_factory.buildProtocol(None)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                             iosim.makeFakeClient(client), greet=False)
        for _ in range(20):
            self.reactor.advance(0)
            pump.pump()
        peer = client.getPeerCertificate()
        self.assertIsNotNone(peer, "no TLS handshake")
        return peer.get_serial_number()

    # -- refused

    def test_a_broken_config_is_refused_and_the_old_keeps_working(self):
        good = self.gateway.config
        self.write(config_text() + "\n[route:other]\ndomains = *\nsmarthost = 127.0.0.1:1\n")
        failure = self.failureResultOf(self.gateway.reload(), ConfigError)
        self.assertEqual(str(failure.value), "%s: [route:other] domains: * is already in "
                         "[route:first]" % self.path)
        self.assertIs(self.gateway.config, good)
        [error] = self.messages("error")
        self.assertEqual(error, "reload refused: %s: [route:other] domains: * is already in "
                         "[route:first]; the running configuration stays" % self.path)
        self.enqueue("Q1")
        self.assertEqual(self.deliverer.calls[-1][0], "first")
        proto, transport = session(self.reactor.factory_on(2525))
        self.assertTrue(transport.value().startswith(b"220 "))

    def test_a_missing_certificate_is_refused(self):
        os.rename(os.path.join(self.root, "server.pem"), os.path.join(self.root, "gone.pem"))
        self.write(config_text(route="second"))
        failure = self.failureResultOf(self.gateway.reload(), ConfigError)
        self.assertEqual((failure.value.section, failure.value.key), ("tls", "certificate"))
        self.assertEqual(self.gateway.config.routes[0].name, "first")

    def test_a_filter_that_cannot_load_is_refused(self):
        text = config_text().replace("filters =\n", "filters = no.such.Filter\n")
        failure = self.failureResultOf(self.reload(text), ConfigError)
        self.assertIn("[listener:relay] filters: cannot load no.such.Filter", str(failure.value))

    def test_the_queue_cannot_move_on_a_reload(self):
        failure = self.failureResultOf(self.reload(config_text().replace("path = spool", "path = q2")),
                                       ConfigError)
        self.assertIn("[queue] path: the queue cannot change on a reload", str(failure.value))

    def test_a_new_users_file_must_be_good(self):
        text = config_text().replace("auth = none", "auth = optional") + "\n[auth]\nusers_file = users\n"
        with open(os.path.join(self.root, "users"), "w") as f:
            f.write("not a users line\n")
        failure = self.failureResultOf(self.reload(text), ConfigError)
        self.assertEqual((failure.value.section, failure.value.key), ("auth", "users_file"))
        from mailgate.smtp.auth import hash_password

        with open(os.path.join(self.root, "users"), "w") as f:
            f.write("alice:%s\n" % hash_password("secret"))
        self.successResultOf(self.reload(text))
        factory = self.reactor.factory_on(2525)
        self.assertEqual(factory.auth.path, os.path.join(self.root, "users"))

    def test_reloads_run_one_at_a_time(self):
        first = self.reload(config_text(route="second"))
        second = self.gateway.reload(load_config(self.path))
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(self.gateway.config.routes[0].name, "second")


def test_reload_without_start_replaces_the_listeners(tmp_path):
    """Before start (an embedder configuring), reload binds nothing and swaps the children."""
    ca = make_ca(str(tmp_path / "ca"))
    cert, key = ca.issue(HOSTNAME, str(tmp_path))
    path = tmp_path / "mailgate.ini"
    path.write_text(config_text())
    reactor = Reactor()
    gateway = Gateway.from_config(str(path), reactor=reactor, run_in_thread=sync, resolver=NoDNS(),
                                  deliverer=FakeDeliverer())
    path.write_text(config_text(listeners=(("other", 2600, "none", 5),)))
    d = gateway.reload()
    results = []
    d.addBoth(results.append)
    assert isinstance(results[0], dict), results
    assert [s.name for s in gateway.listeners()] == ["listener:other"]
    assert reactor.tcpServers == []
    gateway.startService()
    assert [p for p, _, _, _ in reactor.tcpServers] == [2600]
    defer.maybeDeferred(gateway.stopService)


class HangupTests(unittest.TestCase):
    """mailgate.tap: SIGHUP schedules gateway.reload() on the reactor thread, nothing more."""

    def test_sighup_calls_reload_from_the_reactor(self):
        import signal

        from mailgate.tap import _ReloadOnHangup

        class FakeReactor:
            def __init__(self):
                self.calls = []

            def callFromThread(self, f, *args):
                self.calls.append((f, args))

        class FakeGateway:
            config = type("C", (), {"path": "/etc/mailgate/mailgate.ini"})()
            reloads = 0

            def reload(self):
                FakeGateway.reloads += 1
                return defer.fail(ConfigError("/etc/mailgate/mailgate.ini", None, None, "refused"))

        reactor = FakeReactor()
        before = signal.getsignal(signal.SIGHUP)
        hangup = _ReloadOnHangup(FakeGateway(), reactor)
        hangup.startService()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            self.assertEqual(len(reactor.calls), 1)
            self.assertEqual(FakeGateway.reloads, 0)  # not in the handler itself
            f, args = reactor.calls[0]
            f(*args)  # on the reactor: a refused reload is already logged, no unhandled error
            self.assertEqual(FakeGateway.reloads, 1)
        finally:
            hangup.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)
