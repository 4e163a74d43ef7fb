"""
build_service() assembles the whole gateway without touching the global reactor: checked on a
MemoryReactorClock with a thread runner the test controls.
"""

import errno
import socket

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mailgate import Gateway
from mailgate.config import AuthConfig, Config, DNSConfig, GatewayConfig, Limits, QueueConfig, TLSConfig
from mailgate.errors import ConfigError
from mailgate.smtp.server import SMTPFactory

from tests.smtphelp import listener
from tests.tlsutil import make_ca


class HeldRunner:
    """A run_in_thread that runs jobs only when the test says so."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((d, f, args))
        return d

    def run_all(self):
        while self.jobs:
            d, f, args = self.jobs.pop(0)
            try:
                result = f(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)


def make_config(case, listeners=None):
    root = case.mktemp()
    ca = make_ca(root)
    cert, key = ca.issue("mx.example.net", root)
    return Config(
        path=root + "/mailgate.ini",
        gateway=GatewayConfig(hostname="mx.example.net", accepted_domains=("example.com",)),
        limits=Limits(),
        queue=QueueConfig(path=root + "/spool"),
        tls=TLSConfig(certificate=cert, private_key=key),
        auth=AuthConfig(),
        dns=DNSConfig(nameservers=(("127.0.0.1", 1),)),  # never the system resolver; unused here
        listeners=listeners or (
            listener(name="relay", endpoint="tcp:2525:interface=127.0.0.1"),
            listener(name="smtps", endpoint="tcp:2465:interface=127.0.0.1", role="submission",
                     tls="implicit", auth="optional"),
        ),
    )


class BuildServiceTests(unittest.TestCase):
    def test_listeners_bound_on_the_given_reactor(self):
        reactor = MemoryReactorClock()
        runner = HeldRunner()
        service = Gateway.from_config(make_config(self), reactor=reactor, run_in_thread=runner)
        service.startService()
        self.addCleanup(service.stopService)
        ports = [(port, interface) for port, _, _, interface in reactor.tcpServers]
        self.assertEqual(ports, [(2525, "127.0.0.1"), (2465, "127.0.0.1")])
        relay_factory, smtps_factory = [factory for _, factory, _, _ in reactor.tcpServers]
        self.assertIsInstance(relay_factory, SMTPFactory)
        self.assertIsInstance(smtps_factory, TLSMemoryBIOFactory)
        self.assertEqual(relay_factory.gateway.hostname, "mx.example.net")

    def test_listen_backlog(self):
        """Twisted's default backlog of 50 overflows under bursts: the listener's backlog is used,
        and a backlog written in the endpoint wins."""
        reactor = MemoryReactorClock()
        config = make_config(self, listeners=(
            listener(name="relay", endpoint="tcp:2525:interface=127.0.0.1"),
            listener(name="big", endpoint="tcp:2526:interface=127.0.0.1", backlog=4096),
            listener(name="own", endpoint="tcp:2527:interface=127.0.0.1:backlog=77", backlog=4096),
        ))
        service = Gateway.from_config(config, reactor=reactor, run_in_thread=HeldRunner())
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(port, backlog) for port, _, backlog, _ in reactor.tcpServers],
                         [(2525, 1024), (2526, 4096), (2527, 77)])

    def test_sessions_wait_for_queue_recovery_before_the_banner(self):
        reactor = MemoryReactorClock()
        runner = HeldRunner()
        service = Gateway.from_config(make_config(self), reactor=reactor, run_in_thread=runner)
        service.startService()
        self.addCleanup(service.stopService)
        factory = reactor.tcpServers[0][1]
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        # A client that does not wait for the banner is an early talker (issue 9): refused.
        early = factory.buildProtocol(None)
        early_transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 1234))
        early.makeConnection(early_transport)
        early.dataReceived(b"EHLO early.example\r\n")
        self.assertEqual(early_transport.value(), b"554 5.5.0 Protocol error\r\n")
        runner.run_all()  # recovery runs
        self.assertEqual(transport.value(), b"220 mx.example.net ESMTP\r\n")
        proto.dataReceived(b"EHLO patient.example\r\n")
        self.assertIn(b"250-mx.example.net", transport.value())

    def test_failed_recovery_refuses_sessions_with_421(self):
        reactor = MemoryReactorClock()
        runner = HeldRunner()
        config = make_config(self)
        service = Gateway.from_config(config, reactor=reactor, run_in_thread=runner)
        service.startService()
        self.addCleanup(service.stopService)
        factory = reactor.tcpServers[0][1]
        proto = factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        proto.makeConnection(transport)
        d, f, args = runner.jobs.pop(0)
        d.errback(OSError(errno.EACCES, "Permission denied"))
        self.assertEqual(transport.value(),
                         b"421 4.3.0 mx.example.net Service not available, try again later\r\n")
        self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors(OSError)

    def test_port_in_use_is_a_config_error_naming_the_listener(self):
        class BusyReactor(MemoryReactorClock):
            def listenTCP(self, port, factory, backlog=50, interface=""):
                raise CannotListenError(interface, port, socket.error(errno.EADDRINUSE, "in use"))

        service = Gateway.from_config(make_config(self), reactor=BusyReactor(), run_in_thread=HeldRunner())
        error = self.assertRaises(ConfigError, service.startService)
        self.assertEqual(error.section, "listener:relay")
        self.assertEqual(error.key, "endpoint")
        self.assertIn("cannot listen on tcp:2525:interface=127.0.0.1: address already in use", str(error))

    def test_unwritable_spool_is_a_config_error(self):
        config = make_config(self)
        import attr

        config = attr.evolve(config, queue=QueueConfig(path="/proc/mailgate-spool"))
        error = self.assertRaises(ConfigError, Gateway.from_config, config,
                                  reactor=MemoryReactorClock(), run_in_thread=HeldRunner())
        self.assertEqual((error.section, error.key), ("queue", "path"))


class DirectoryWiringTests(unittest.TestCase):
    """[ldap] reaches the listeners (recipients = ldap) and AUTH ([auth] backend)."""

    def build(self, backend, recipients="ldap", users=True):
        import attr

        from mailgate.config import LDAPConfig, LDAPServer
        from mailgate.service import build_service
        from mailgate.smtp.auth import set_user

        config = make_config(self, listeners=(
            listener(name="relay", endpoint="tcp:2525:interface=127.0.0.1", recipients=recipients),
            listener(name="other", endpoint="tcp:2526:interface=127.0.0.1")))
        users_file = None
        if users:
            users_file = config.path.rsplit("/", 1)[0] + "/users"
            set_user(users_file, "alice", "pw")
        ldap = LDAPConfig(servers=(LDAPServer("ldap", "127.0.0.1", 1),), base_dn="dc=x")
        config = attr.evolve(config, ldap=ldap,
                             auth=AuthConfig(users_file=users_file, backend=backend))
        return build_service(config, MemoryReactorClock(), run_in_thread=HeldRunner(),
                             deliver=False, admin=False)

    def test_recipients_and_chained_auth(self):
        from mailgate.directory import Chain, RecipientValidator
        from mailgate.smtp.auth import UsersFile

        gateway = self.build(("ldap", "file"))
        relay, other = gateway.factories
        self.assertIsInstance(relay.recipients, RecipientValidator)
        self.assertIsNone(other.recipients)
        self.assertIsInstance(relay.auth, Chain)
        self.assertEqual([type(b).__name__ for b in relay.auth.backends], ["LDAPAuth", "UsersFile"])
        self.assertIsInstance(relay.auth.grants, UsersFile)

    def test_ldap_alone_and_file_alone(self):
        from mailgate.directory import LDAPAuth
        from mailgate.smtp.auth import UsersFile

        self.assertIsInstance(self.build(("ldap",), users=False).factories[0].auth, LDAPAuth)
        gateway = self.build(("file",), recipients="any")
        self.assertIsInstance(gateway.factories[0].auth, UsersFile)
        self.assertIsNone(gateway._parts.directory)  # nothing uses [ldap]: no client at all


class ReceiverQueueTests(unittest.TestCase):
    """A receiver process never recovers the queue (the main process did); it opens it."""

    def test_open_instead_of_recover(self):
        from mailgate.gateway import GatewayService

        calls = []

        class Queue:
            def recover(self):
                calls.append("recover")
                return 0

            def open(self):
                calls.append("open")

            def close(self):
                calls.append("close")

        service = GatewayService(make_config(self), Queue(), [], None, recover=False)
        service.startService()
        self.assertEqual(calls, ["open"])
        self.assertTrue(service.ready.called)
        service.stopService()
        self.assertEqual(calls, ["open", "close"])
