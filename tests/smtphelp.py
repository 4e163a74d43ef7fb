"""
Test doubles for driving mailgate.smtp.server.SMTPServer in memory: a queue that can be told to fail
or to wait, an auth backend, a transport that records startTLS, and a session wrapper.
"""

import ipaddress

import attr
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailgate.config import GatewayConfig, Limits, ListenerConfig
from mailgate.interfaces import IAuthBackend, IQueue
from mailgate.smtp.server import SMTPFactory


@implementer(IQueue)
class MemoryQueue:
    """
    Keeps messages in a dict.  fail=True makes enqueue errback; hold=True keeps it pending.
    Delivery state and subscribers work like the Spool's: save_state needs the message,
    subscribers hear of an enqueue or a real move once it is done, their errors are logged.
    """

    def __init__(self):
        self.messages = {}
        self.calls = 0
        self.fail = False
        self.hold = False
        self.pending = []
        self.where = {}  # queue_id -> "active", "deferred", ...
        self.saved_states = {}  # queue_id -> bytes given to save_state
        self.subscribers = []
        self._pending_states = {}

    def recover(self):
        return defer.succeed(0)

    def enqueue(self, envelope, data, state="active"):
        self.calls += 1
        if self.fail:
            return defer.fail(OSError(28, "No space left on device"))
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, envelope, data))
            self._pending_states[envelope.queue_id] = state
            return d
        self._store(envelope, data, state)
        return defer.succeed(envelope.queue_id)

    def _store(self, envelope, data, state):
        self.messages[envelope.queue_id] = (envelope, data)
        self.where[envelope.queue_id] = state
        self._notify(envelope.queue_id, state)

    def release(self):
        for d, envelope, data in self.pending:
            self._store(envelope, data, self._pending_states.pop(envelope.queue_id, "active"))
            d.callback(envelope.queue_id)
        self.pending = []

    def load(self, queue_id):
        envelope, data = self.messages[queue_id]
        return defer.succeed((self.where.get(queue_id, "active"), envelope, data))

    def list(self, state=None):
        entries = [(self.where.get(e.queue_id, "active"), e) for e, _ in self.messages.values()]
        return defer.succeed([(s, e) for s, e in entries if state is None or s == state])

    def move(self, queue_id, state, claim=None):
        if queue_id in self.messages and self.where.get(queue_id) != state:
            self.where[queue_id] = state
            self._notify(queue_id, state)
        return defer.succeed(None)

    def remove(self, queue_id, claim=None):
        self.messages.pop(queue_id, None)
        self.where.pop(queue_id, None)
        self.saved_states.pop(queue_id, None)
        return defer.succeed(None)

    def save_state(self, queue_id, data, claim=None):
        if queue_id not in self.messages:
            return defer.fail(KeyError(queue_id))
        self.saved_states[queue_id] = bytes(data)
        return defer.succeed(None)

    def load_state(self, queue_id):
        return defer.succeed(self.saved_states.get(queue_id))

    def load_with_state(self, queue_id):
        envelope, data = self.messages[queue_id]
        return defer.succeed((self.where.get(queue_id, "active"), envelope, data,
                              self.saved_states.get(queue_id)))

    def check_writable(self):
        return defer.succeed(not self.fail)

    def subscribe(self, callback):
        self.subscribers.append(callback)

        def unsubscribe():
            if callback in self.subscribers:
                self.subscribers.remove(callback)

        return unsubscribe

    def _notify(self, queue_id, state):
        for callback in list(self.subscribers):
            try:
                callback(queue_id, state)
            except Exception:
                from twisted.logger import Logger  # here: only this class of the module is ours

                Logger().failure("Queue subscriber failed for {queue_id}", queue_id=queue_id)


@attr.s(frozen=True)
class User:
    name = attr.ib()
    senders = attr.ib(default=())

    def may_send_as(self, address):
        return address.lower() in self.senders or (
            "@" in address and "@" + address.rsplit("@", 1)[1].lower() in self.senders)


@implementer(IAuthBackend)
class MemoryAuth:
    """alice@example.com / secret may send as herself and @example.com; delayed=True waits."""

    def __init__(self):
        self.users = {"alice@example.com": ("secret", User("alice@example.com", ("alice@example.com",)))}
        self.delayed = False
        self.pending = []
        self.broken = False

    def authenticate(self, username, password):
        if self.broken:
            return defer.fail(RuntimeError("backend down"))
        entry = self.users.get(username)
        result = entry[1] if entry is not None and entry[0] == password else None
        if self.delayed:
            d = defer.Deferred()
            self.pending.append((d, result))
            return d
        return defer.succeed(result)


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS (no real handshake: that is tested end to end)."""

    tls_started = None

    def startTLS(self, context):
        self.tls_started = context


def listener(**kw):
    values = dict(name="test", endpoint="tcp:0", role="relay", tls="optional", auth="optional",
                  max_message_size=10000, max_recipients=5, limits=Limits())
    for key in ("allowed_ips", "relay_ips"):
        if key in kw:
            kw[key] = tuple(ipaddress.ip_network(n) for n in kw[key])
    values.update(kw)
    return ListenerConfig(**values)


GATEWAY = GatewayConfig(hostname="mx.example.net", accepted_domains=("example.com", "example.org"))


class Session:
    """One SMTPServer on a TLSStringTransport, with helpers to send lines and read replies."""

    def __init__(self, listener_config=None, peer="192.0.2.10", hooks=None, queue=None, auth=None,
                 tls=object(), clock=None, events=None, recipients=None):
        self.clock = clock or Clock()
        self.queue = queue if queue is not None else MemoryQueue()
        self.auth = auth if auth is not None else MemoryAuth()
        ids = iter("Q%04d" % i for i in range(1, 10000))
        self.factory = SMTPFactory(listener_config or listener(), GATEWAY, self.clock, self.queue,
                                   lambda: next(ids), auth=self.auth, tls=tls, hooks=hooks,
                                   events=events, recipients=recipients)
        self.transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.proto.dataReceived(data)

    def read(self):
        """Every reply line written since the last read, as str."""
        out = self.transport.value().decode("latin-1")
        self.transport.clear()
        return out

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.read()

    @property
    def closed(self):
        return self.transport.disconnecting

    def start_tls(self):
        """STARTTLS, as if the handshake succeeded, then EHLO again."""
        assert self.cmd("STARTTLS").startswith("220 2.0.0")
        assert self.transport.tls_started is not None
        return self.cmd("EHLO client.example")

    def login(self, user="alice@example.com", password="secret"):
        import base64

        token = base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()
        return self.cmd_waiting("AUTH PLAIN " + token)

    def cmd_waiting(self, line):
        """cmd(), and when the answer is held back (a failed AUTH's delay), wait for it."""
        out = self.cmd(line)
        if not out and not self.closed:
            self.clock.advance(self.proto.limits.auth_failure_delay)
            out = self.read()
        return out
