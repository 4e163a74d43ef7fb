"""
Queue management: the DeliveryService's queue operations on a real spool (synchronous disk runner,
fake router and deliverer, injected clock), the admin channel over a real unix socket with the
real reactor, and the `mailgate queue` / `mailgate reload` commands and their output.
"""

import io
import json
import os
import socket
import stat
import sys

import attr
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailgate import cli

from mailgate.ops import admin
from mailgate.config import AdminConfig, DeliveryConfig, QueueConfig
from mailgate.envelope import Envelope
from mailgate.errors import ConfigError
from mailgate.events import EventBus
from mailgate.queue import Spool
from mailgate.delivery.scheduler import DeliveryService, MessageState, QueueCommandError

from tests.delivery.test_scheduler import BODY, FakeConfig, FakeDeliverer, FakeRouter, FakeSigner, sync

DEFERRED = (451, "4.3.0")


class QueueOperationTests(unittest.TestCase):
    """flush, hold, release, delete, bounce: on their own and against a round in progress."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.spool = Spool(self.mktemp(), self.clock, run_in_thread=sync)
        self.successResultOf(self.spool.recover())
        self.router = FakeRouter()
        self.deliverer = FakeDeliverer()
        self.ids = iter("DSN%04d" % i for i in range(1000))
        self.events = []
        bus = EventBus(self.clock)
        bus.subscribe(lambda kind, fields: self.events.append(dict(fields)))
        delivery = DeliveryConfig(retry=(60.0, 300.0), max_lifetime=3600.0, delay_warning=0.0)
        self.service = DeliveryService(self.spool, self.router, self.deliverer, FakeConfig(delivery),
                                       self.clock, lambda: next(self.ids), signer=FakeSigner(),
                                       events=bus)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def queue(self, qid="Q1", sender="a@sender.example", rcpts=("u@remote.example",), state="active"):
        envelope = Envelope(queue_id=qid, sender=sender, recipients=rcpts, client_ip="192.0.2.1",
                            received_at=self.clock.seconds())
        self.successResultOf(self.spool.enqueue(envelope, BODY, state=state))

    def deferred_message(self, qid="Q1", **kw):
        for rcpt in kw.get("rcpts", ("u@remote.example",)):
            self.deliverer.replies.setdefault(rcpt, DEFERRED)
        self.queue(qid, **kw)
        self.assertEqual(self.entries()[qid], "deferred")
        self.deliverer.calls.clear()

    def entries(self):
        return {e.queue_id: s for s, e in self.successResultOf(self.spool.list())}

    def state(self, qid):
        return MessageState.from_bytes(self.successResultOf(self.spool.load_state(qid)), None)

    def tracked(self, event):
        return [e for e in self.events if e["event"] == event]

    def attempts(self):
        return [c for c in self.deliverer.calls if c[1] != ""]

    def dsns(self):
        return [c for c in self.deliverer.calls if c[1] == ""]

    # -- flush

    def test_flush_one_retries_before_its_retry_time(self):
        self.deferred_message()
        del self.deliverer.replies["u@remote.example"]
        result = self.successResultOf(self.service.flush("Q1"))
        self.assertEqual(result, {"flushed": ["Q1"]})
        self.assertEqual(len(self.attempts()), 1)
        self.assertEqual(self.entries(), {})
        self.clock.advance(3600)
        self.assertEqual(len(self.attempts()), 1)  # its old timer went with it

    def test_flush_all_retries_every_deferred_message_once(self):
        self.deferred_message("Q1")
        self.deferred_message("Q2", rcpts=("v@remote.example",))
        self.queue("H1", state="hold")
        result = self.successResultOf(self.service.flush())
        self.assertEqual(sorted(result["flushed"]), ["Q1", "Q2"])
        self.assertEqual(sorted(c[2] for c in self.attempts()),
                         [("u@remote.example",), ("v@remote.example",)])
        self.assertEqual(self.entries(), {"Q1": "deferred", "Q2": "deferred", "H1": "hold"})
        self.assertEqual(self.state("Q1").attempts, 2)

    def test_flush_of_a_held_message_is_refused(self):
        self.queue("H1", state="hold")
        failure = self.failureResultOf(self.service.flush("H1"), QueueCommandError)
        self.assertEqual(str(failure.value), "H1 is in hold: release it first")
        self.assertEqual(self.deliverer.calls, [])

    def test_unknown_and_malformed_ids(self):
        self.failureResultOf(self.service.flush("NOSUCH"), KeyError)
        self.failureResultOf(self.service.hold("NOSUCH"), KeyError)
        self.failureResultOf(self.service.delete("../etc"), ValueError)
        self.failureResultOf(self.service.bounce("NOSUCH"), KeyError)

    # -- hold and release

    def test_hold_cancels_the_timer_and_release_delivers_at_once(self):
        self.deferred_message()
        result = self.successResultOf(self.service.hold("Q1"))
        self.assertEqual(result, {"queue_id": "Q1", "state": "hold", "from": "deferred"})
        self.assertEqual(self.entries(), {"Q1": "hold"})
        self.clock.advance(3000)
        self.assertEqual(self.attempts(), [])
        self.successResultOf(self.service.sweep())
        self.assertEqual(self.attempts(), [])
        del self.deliverer.replies["u@remote.example"]
        result = self.successResultOf(self.service.release("Q1"))
        self.assertEqual(result, {"queue_id": "Q1", "state": "active", "from": "hold"})
        self.assertEqual(len(self.attempts()), 1)
        self.assertEqual(self.entries(), {})
        [release] = self.tracked("RELEASE")
        self.assertEqual((release["queue_id"], release["stage"], release["recipients"]),
                         ("Q1", "hold", ["u@remote.example"]))

    def test_held_message_released_before_its_retry_time_is_still_tried_now(self):
        self.deferred_message()
        self.successResultOf(self.service.hold("Q1"))
        self.successResultOf(self.service.release("Q1"))
        self.assertEqual(len(self.attempts()), 1)  # the retry time (60s away) does not wait

    def test_hold_during_a_round_is_not_undone_by_its_end(self):
        self.deliverer.hold = True
        self.deliverer.replies["u@remote.example"] = DEFERRED
        self.queue()
        self.assertEqual(len(self.deliverer.pending), 1)  # the attempt is in flight
        self.successResultOf(self.service.hold("Q1"))
        self.deliverer.release_one()  # 451: the round ends
        self.assertEqual(self.entries(), {"Q1": "hold"})
        self.assertEqual(self.service._timers, {})
        self.assertEqual(self.state("Q1").recipients["u@remote.example"]["outcome"], "deferred")
        self.clock.advance(3600)
        self.assertEqual(len(self.deliverer.calls), 1)
        self.assertEqual(self.service._withdrawn, {})

    def test_hold_during_a_round_that_delivers_everything_removes_it(self):
        self.deliverer.hold = True
        self.queue()
        self.successResultOf(self.service.hold("Q1"))
        self.deliverer.release_one()  # 250: nothing is left to hold
        self.assertEqual(self.entries(), {})

    def test_hold_while_waiting_for_a_slot_makes_no_attempt(self):
        self.service.reconfigure(FakeConfig(DeliveryConfig(concurrency=1, retry=(60.0,))),
                                 self.router)
        self.deliverer.hold = True
        self.queue("Q1")
        self.queue("Q2", rcpts=("v@other.example",))
        self.assertEqual(len(self.deliverer.pending), 1)
        self.successResultOf(self.service.hold("Q2"))
        self.deliverer.release_one()
        self.assertEqual([c[2] for c in self.deliverer.calls], [("u@remote.example",)])
        self.assertEqual(self.entries(), {"Q2": "hold"})

    def test_hold_of_quarantine_is_refused_and_hold_of_held_is_a_no_op(self):
        self.queue("Q1", state="quarantine")
        self.failureResultOf(self.service.hold("Q1"), QueueCommandError)
        self.queue("H1", state="hold")
        self.assertEqual(self.successResultOf(self.service.hold("H1"))["from"], "hold")

    def test_release_from_quarantine_delivers_and_is_tracked(self):
        self.queue("Q1", state="quarantine")
        self.successResultOf(self.service.release("Q1"))
        self.assertEqual(len(self.attempts()), 1)
        self.assertEqual(self.entries(), {})
        [release] = self.tracked("RELEASE")
        self.assertEqual(release["stage"], "quarantine")

    def test_release_of_a_deferred_message_is_refused(self):
        self.deferred_message()
        failure = self.failureResultOf(self.service.release("Q1"), QueueCommandError)
        self.assertIn("not held or quarantined (it is deferred)", str(failure.value))

    # -- delete

    def test_delete_removes_without_a_notice(self):
        self.deferred_message()
        result = self.successResultOf(self.service.delete("Q1"))
        self.assertEqual(result["from"], "deferred")
        self.assertEqual(self.entries(), {})
        self.assertIsNone(self.successResultOf(self.spool.load_state("Q1")))
        self.clock.advance(3600)
        self.assertEqual(self.deliverer.calls, [])  # no retry, no DSN
        [delete] = self.tracked("DELETE")
        self.assertEqual((delete["queue_id"], delete["recipients"]), ("Q1", ["u@remote.example"]))

    def test_delete_during_a_round_stays_deleted_quietly(self):
        self.deliverer.hold = True
        self.deliverer.replies["u@remote.example"] = DEFERRED
        self.queue()
        self.successResultOf(self.service.delete("Q1"))
        self.deliverer.release_one()
        self.assertEqual(self.entries(), {})
        self.assertEqual(self.service._timers, {})
        self.assertEqual(self.flushLoggedErrors(), [])
        self.clock.advance(3600)
        self.assertEqual(len(self.deliverer.calls), 1)

    # -- bounce

    def test_bounce_sends_one_dsn_with_5_0_0_and_the_last_error(self):
        self.deferred_message(rcpts=("u@remote.example", "v@remote.example"))
        result = self.successResultOf(self.service.bounce("Q1"))
        self.assertEqual(result["bounced"], ["u@remote.example", "v@remote.example"])
        self.assertEqual(result["dsn"], "DSN0000")
        self.assertNotIn("Q1", self.entries())
        [dsn] = self.dsns()
        text = dsn[3].decode()
        self.assertEqual(dsn[2], ("a@sender.example",))
        self.assertEqual(text.count("Status: 5.0.0"), 2)
        self.assertIn("Action: failed", text)
        self.assertIn("Delivery cancelled by the administrator; last error: reply 451", text)
        bounces = self.tracked("BOUNCE")
        self.assertEqual([b["recipients"] for b in bounces], [["u@remote.example"], ["v@remote.example"]])
        self.assertTrue(all(b["reason"] == "administrator" for b in bounces))
        self.assertEqual(bounces[0]["reply"][:9], "550 5.0.0")
        [tracked_dsn] = self.tracked("DSN")
        self.assertEqual(tracked_dsn["dsn_queue_id"], "DSN0000")
        self.clock.advance(3600)
        self.assertEqual(len(self.attempts()), 0)

    def test_bounce_of_a_null_sender_message_removes_it_without_a_dsn(self):
        self.deferred_message(sender="")
        result = self.successResultOf(self.service.bounce("Q1"))
        self.assertIsNone(result["dsn"])
        self.assertEqual(self.entries(), {})
        self.assertEqual(self.dsns(), [])

    def test_bounce_waits_for_the_round_in_progress_and_reports_what_it_learnt(self):
        self.deliverer.hold = True
        self.deliverer.replies["b@remote.example"] = DEFERRED
        self.deliverer.replies["c@remote.example"] = (550, "5.1.1")
        self.queue(rcpts=("a@remote.example", "b@remote.example", "c@remote.example"))
        d = self.service.bounce("Q1")
        self.assertNoResult(d)
        self.deliverer.hold = False
        self.deliverer.release_one()  # a delivered, b deferred, c bounced by the remote
        result = self.successResultOf(d)
        self.assertEqual(result["bounced"], ["b@remote.example"])
        [dsn] = self.dsns()  # one notice for both failures
        text = dsn[3].decode()
        self.assertIn("Final-Recipient: rfc822; b@remote.example", text)
        self.assertIn("Final-Recipient: rfc822; c@remote.example", text)
        self.assertNotIn("Final-Recipient: rfc822; a@remote.example", text)
        self.assertIn("Status: 5.0.0", text)
        self.assertIn("Status: 5.1.1", text)
        self.assertEqual(self.entries(), {})
        self.assertEqual(self.service._timers, {})

    def test_bounce_of_a_held_message(self):
        self.queue("H1", state="hold")
        result = self.successResultOf(self.service.bounce("H1"))
        self.assertEqual((result["from"], result["bounced"]), ("hold", ["u@remote.example"]))
        self.assertEqual(len(self.dsns()), 1)

    # -- reconfigure

    def test_reconfigure_swaps_router_and_grows_concurrency(self):
        self.service.reconfigure(FakeConfig(DeliveryConfig(concurrency=1)), self.router)
        self.deliverer.hold = True
        for i in range(3):
            self.queue("Q%d" % i, rcpts=("u@d%d.example" % i,))
        self.assertEqual(len(self.deliverer.pending), 1)

        class OtherRouter(FakeRouter):
            def route_for(self, domain):
                return attr.evolve(FakeRouter.route_for(self, domain), name="other")

        self.service.reconfigure(FakeConfig(DeliveryConfig(concurrency=4)), OtherRouter())
        self.assertEqual(len(self.deliverer.pending), 3)  # the waiting ones start at once
        self.assertEqual([c[0] for c in self.deliverer.calls], ["internet"] * 3)  # routed before
        self.queue("Q9", rcpts=("u@d9.example",))
        self.assertEqual(self.deliverer.calls[-1][0], "other")
        self.service.reconfigure(FakeConfig(DeliveryConfig(concurrency=1)), OtherRouter())
        self.queue("Q10", rcpts=("u@d10.example",))
        for _ in range(3):
            self.deliverer.release_one()
        self.assertEqual(len(self.deliverer.calls), 4)  # 4 were in use: still over the new limit
        self.deliverer.release_one()
        self.assertEqual(len(self.deliverer.calls), 5)


# --- the admin channel over a real unix socket -------------------------------------------------


@attr.s
class _Config:
    path = attr.ib()
    queue = attr.ib()
    admin = attr.ib(factory=AdminConfig)


class FakeGateway:
    def __init__(self, queue, delivery):
        self.queue = queue
        self.delivery = delivery
        self.reloads = []
        self.reload_error = None

    def reload(self):
        self.reloads.append(True)
        if self.reload_error is not None:
            return defer.fail(self.reload_error)
        return defer.succeed({"path": "/etc/mailgate.ini", "listeners": {"added": ["new"],
                                                                         "removed": [], "kept": []}})


def short_dir(case):
    """A directory with a short absolute path (unix socket paths are limited to 107 bytes)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="mga")
    if case is not None:
        case.addCleanup(_remove_tree, path)
    return path


def _remove_tree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class AdminChannelTests(unittest.TestCase):
    """The real reactor serves the socket; the blocking client runs in a thread."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.dir = short_dir(self)
        self.clock = Clock()
        self.clock.advance(2_000_000)
        self.spool = Spool(os.path.join(self.dir, "spool"), self.clock, run_in_thread=sync)
        self.successResultOf(self.spool.recover())
        self.deliverer = FakeDeliverer()
        delivery = DeliveryConfig(retry=(60.0,), max_lifetime=3600.0, delay_warning=0.0)
        self.delivery = DeliveryService(self.spool, FakeRouter(), self.deliverer, FakeConfig(delivery),
                                        self.clock, iter("DSN%04d" % i for i in range(99)).__next__)
        self.delivery.startService()
        self.addCleanup(self.delivery.stopService)
        self.gateway = FakeGateway(self.spool, self.delivery)
        self.config = _Config(path=os.path.join(self.dir, "mailgate.ini"),
                              queue=QueueConfig(path=os.path.join(self.dir, "spool")))
        with open(self.config.path, "w") as f:
            f.write("[queue]\npath = spool\n")
        self.admin = admin.AdminService(self.config, reactor, self.gateway, self.clock)
        self.admin.startService()
        self.addCleanup(self.stop_admin)
        self.path = os.path.join(self.dir, "spool", "admin.sock")

    def stop_admin(self):
        if self.admin.running:
            return self.admin.stopService()

    def ask(self, message):
        return threads.deferToThread(admin.request, self.path, message, 10)

    def queue(self, qid, rcpts=("u@remote.example",), replies=None, state="active"):
        for rcpt, reply in (replies or {}).items():
            self.deliverer.replies[rcpt] = reply
        envelope = Envelope(queue_id=qid, sender="a@sender.example", recipients=rcpts,
                            client_ip="192.0.2.1", helo="client.example", listener="relay",
                            received_at=self.clock.seconds() - 300, size=len(BODY) + 2000)
        self.successResultOf(self.spool.enqueue(envelope, BODY, state=state))

    def test_socket_is_owner_only_and_removed_on_stop(self):
        mode = os.stat(self.path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)
        d = defer.maybeDeferred(self.admin.stopService)

        def stopped(_):
            self.assertFalse(os.path.lexists(self.path))

        return d.addCallback(stopped)

    @defer.inlineCallbacks
    def test_list_and_show(self):
        self.queue("Q1", replies={"u@remote.example": DEFERRED})
        self.queue("H1", state="hold")
        response = yield self.ask({"command": "list", "state": None})
        self.assertTrue(response["ok"])
        self.assertEqual(response["now"], self.clock.seconds())
        by_id = {m["id"]: m for m in response["messages"]}
        self.assertEqual({i: m["state"] for i, m in by_id.items()}, {"Q1": "deferred", "H1": "hold"})
        [rcpt] = by_id["Q1"]["recipients"]
        self.assertEqual((rcpt["address"], rcpt["outcome"], rcpt["code"], rcpt["status"], rcpt["text"]),
                         ("u@remote.example", "deferred", 451, "4.3.0", "reply 451"))
        self.assertEqual(by_id["Q1"]["attempts"], 1)
        self.assertEqual(by_id["H1"]["recipients"][0]["outcome"], "pending")
        held = yield self.ask({"command": "list", "state": "held"})
        self.assertEqual([m["id"] for m in held["messages"]], ["H1"])
        shown = yield self.ask({"command": "show", "id": "Q1"})
        self.assertTrue(shown["ok"])
        self.assertEqual(shown["message"]["headers"], "From: a@sender.example\nSubject: test")
        self.assertEqual(shown["message"]["helo"], "client.example")

    @defer.inlineCallbacks
    def test_operations(self):
        self.queue("Q1", replies={"u@remote.example": DEFERRED})
        self.queue("Q2", rcpts=("v@remote.example",), replies={"v@remote.example": DEFERRED})
        response = yield self.ask({"command": "hold", "id": "Q1"})
        self.assertEqual(response, {"ok": True, "queue_id": "Q1", "state": "hold", "from": "deferred"})
        response = yield self.ask({"command": "flush", "id": None})
        self.assertEqual(response, {"ok": True, "flushed": ["Q2"]})
        response = yield self.ask({"command": "release", "id": "Q1"})
        self.assertEqual(response["from"], "hold")
        response = yield self.ask({"command": "bounce", "id": "Q1"})
        self.assertEqual((response["bounced"], response["dsn"]), (["u@remote.example"], "DSN0000"))
        response = yield self.ask({"command": "delete", "id": "Q2"})
        self.assertEqual(response["from"], "deferred")
        listed = yield self.ask({"command": "list"})
        self.assertEqual([m["id"] for m in listed["messages"]], [])  # the DSN was delivered

    @defer.inlineCallbacks
    def test_errors_are_one_line_answers(self):
        answers = []
        for message in ({"command": "show", "id": "NOSUCH"}, {"command": "hold"},
                        {"command": "delete", "id": "../../etc/passwd"},
                        {"command": "list", "state": "frozen"}, {"command": "selfdestruct"}):
            answers.append((yield self.ask(message)))
        self.assertTrue(all(a["ok"] is False for a in answers))
        self.assertEqual([a["error"] for a in answers], [
            "no message NOSUCH in the queue",
            "a queue id is required",
            "not a queue id: '../../etc/passwd'",
            "unknown state 'frozen' (one of active, deferred, held, quarantine)",
            "unknown command 'selfdestruct'",
        ])

    @defer.inlineCallbacks
    def test_several_requests_on_one_connection_answered_in_order(self):
        self.queue("Q1", replies={"u@remote.example": DEFERRED})

        def talk():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(self.path)
                s.sendall(b'{"command": "show", "id": "Q1"}\nnot json\n{"command": "list"}\n')
                data = b""
                while data.count(b"\n") < 3:
                    data += s.recv(65536)
                return [json.loads(line) for line in data.splitlines()]

        first, second, third = yield threads.deferToThread(talk)
        self.assertEqual(first["message"]["id"], "Q1")
        self.assertFalse(second["ok"])
        self.assertIn("bad request", second["error"])
        self.assertEqual(len(third["messages"]), 1)

    @defer.inlineCallbacks
    def test_reload_refused_is_an_error_answer(self):
        response = yield self.ask({"command": "reload"})
        self.assertEqual(response["reloaded"]["listeners"]["added"], ["new"])
        self.gateway.reload_error = ConfigError("/etc/m.ini", "tls", "certificate", "file not found: x")
        response = yield self.ask({"command": "reload"})
        self.assertEqual(response, {"ok": False,
                                    "error": "/etc/m.ini: [tls] certificate: file not found: x"})

    def test_a_second_gateway_on_the_same_socket_is_refused(self):
        other = admin.AdminService(self.config, self.reactor, self.gateway)
        error = self.assertRaises(ConfigError, other.startService)
        self.assertEqual((error.section, error.key), ("admin", "socket"))
        self.assertIn("another gateway is already running: it answers on %s" % self.path, str(error))
        self.assertTrue(os.path.exists(self.path))  # the running one's socket is left alone

    @defer.inlineCallbacks
    def test_a_stale_socket_is_replaced(self):
        yield self.admin.stopService()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.path)  # bound, never listening: what a crash leaves behind
        stale.close()
        self.admin = admin.AdminService(self.config, self.reactor, self.gateway, self.clock)
        self.admin.startService()
        response = yield self.ask({"command": "list"})
        self.assertTrue(response["ok"])

    @defer.inlineCallbacks
    def test_a_file_that_is_not_a_socket_is_not_removed(self):
        yield self.admin.stopService()
        with open(self.path, "w") as f:
            f.write("precious")
        other = admin.AdminService(self.config, self.reactor, self.gateway)
        error = self.assertRaises(ConfigError, other.startService)
        self.assertIn("exists and is not a socket", str(error))
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")

    @defer.inlineCallbacks
    def test_cli_against_the_running_channel(self):
        self.queue("Q1", replies={"u@remote.example": DEFERRED})
        out = io.StringIO()
        err = io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = yield threads.deferToThread(cli.main, ["queue", "list", "--config", self.config.path])
        self.assertEqual(code, 0, err.getvalue())
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0].split(), ["Queue", "ID", "Size", "Age", "State", "Sender/Recipients"])
        self.assertEqual(lines[1].split(), ["Q1", "2.0K", "5m", "deferred", "a@sender.example"])
        self.assertEqual(lines[2].strip(), "u@remote.example")
        self.assertEqual(lines[3].strip(), "(451 4.3.0 reply 451 [mx.remote.example])")
        self.assertEqual(lines[-1], "-- 2.0 K in 1 request.")
        out.truncate(0)
        out.seek(0)
        code = yield threads.deferToThread(cli.main, ["queue", "hold", "Q1", "--config", self.config.path])
        self.assertEqual((code, out.getvalue()), (0, "Q1: held (was deferred)\n"))
        out.truncate(0)
        out.seek(0)
        code = yield threads.deferToThread(cli.main, ["queue", "list", "--state", "held", "--json",
                                                      "--config", self.config.path])
        self.assertEqual(code, 0)
        self.assertEqual([m["id"] for m in json.loads(out.getvalue())], ["Q1"])
        code = yield threads.deferToThread(cli.main, ["queue", "release", "Q1", "--config",
                                                      self.config.path])
        self.assertEqual(code, 0)
        code = yield threads.deferToThread(cli.main, ["queue", "hold", "NOSUCH", "--config",
                                                      self.config.path])
        self.assertEqual((code, err.getvalue()), (1, "mailgate: no message NOSUCH in the queue\n"))
        code = yield threads.deferToThread(cli.main, ["reload", "--config", self.config.path])
        self.assertEqual(code, 0)
        self.assertEqual(self.gateway.reloads, [True])


# --- the commands without a gateway, and the formatting ----------------------------------------


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_no_gateway_running(tmp_path, capsys):
    config = tmp_path / "mailgate.ini"
    config.write_text("[queue]\npath = spool\n")
    for argv in (["queue", "list"], ["queue", "flush"], ["queue", "hold", "X1"], ["reload"]):
        code, out, err = run(capsys, *argv, "--config", str(config))
        assert (code, out) == (1, "")
        assert err == "mailgate: no gateway is running (no admin socket at %s)\n" % (
            tmp_path / "spool" / "admin.sock")


def test_no_gateway_running_stale_socket(tmp_path, capsys):
    # A socket file nobody listens on (left by a crash) is "not running" too.
    path = short_dir(None)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(path, "a.sock"))
    stale.close()
    config = tmp_path / "m.ini"
    config.write_text("[queue]\npath = spool\n[admin]\nsocket = %s\n" % os.path.join(path, "a.sock"))
    code, out, err = run(capsys, "queue", "list", "--config", str(config))
    assert code == 1
    assert err == "mailgate: no gateway is running (no admin socket at %s)\n" % os.path.join(path, "a.sock")
    _remove_tree(path)


def test_config_from_the_environment(tmp_path, capsys, monkeypatch):
    config = tmp_path / "env.ini"
    config.write_text("[queue]\npath = /nonexistent/q\n")
    monkeypatch.setenv("MAILGATE_CONFIG", str(config))
    code, out, err = run(capsys, "queue", "list")
    assert code == 1
    assert err == "mailgate: no gateway is running (no admin socket at /nonexistent/q/admin.sock)\n"


def test_a_config_being_fixed_still_finds_the_socket(tmp_path, capsys):
    # reload must reach the gateway to hear why the new file is refused.
    config = tmp_path / "broken.ini"
    config.write_text("[queue]\npath = spool\n[admin]\nsocket = run/a.sock\n[gateway]\nbogus = 1\n")
    code, out, err = run(capsys, "reload", "--config", str(config))
    assert code == 1
    assert err == "mailgate: no gateway is running (no admin socket at %s)\n" % (tmp_path / "run" / "a.sock")


def test_unreadable_config(tmp_path, capsys):
    code, out, err = run(capsys, "queue", "list", "--config", str(tmp_path / "missing.ini"))
    assert code == 1
    assert err.startswith("mailgate: %s: cannot read" % (tmp_path / "missing.ini"))


def test_usage_errors(capsys):
    code, out, err = run(capsys, "queue", "hold")
    assert code == 2
    code, out, err = run(capsys, "queue", "list", "--state", "frozen")
    assert code == 2
    assert "invalid choice" in err


def test_human_size_and_age():
    assert [admin.human_size(n) for n in (0, 1023, 1024, 1234, 10188, 35000, 1048575,
                                          int(3.4 * 1048576), 5 * 1073741824)] == \
        ["0", "1023", "1.0K", "1.2K", "9.9K", "34K", "1.0M", "3.4M", "5.0G"]
    assert [admin.human_age(s) for s in (-5, 0, 59, 60, 299, 3599, 7200, 86399, 3 * 86400 + 5)] == \
        ["0s", "0s", "59s", "1m", "4m", "59m", "2h", "23h", "3d"]


def message(qid, state="deferred", size=1234, age=300, sender="a@sender.example", recipients=()):
    now = 10_000_000.0
    return {
        "id": qid, "state": state, "size": size, "received_at": now - age, "sender": sender,
        "client_ip": "192.0.2.1", "helo": "client.example", "listener": "relay", "user": None,
        "protocol": "ESMTPS", "tls_version": "TLSv1.3", "verdicts": [["spf", "pass"]],
        "attempts": 2, "next_attempt": now + 240,
        "recipients": [dict(dict(address=a, outcome="pending", code=None, status=None, text=None,
                                 remote=None, at=None), **r) for a, r in recipients],
    }


NOW = 10_000_000.0


def test_format_list_like_postqueue():
    messages = [
        message("0ABCDEFGHJKMNPQRS", recipients=[
            ("u@remote.example", dict(outcome="deferred", code=451, status="4.3.0",
                                      text="Greylisted, try later", remote="mx.remote.example")),
            ("done@remote.example", dict(outcome="delivered", code=250)),
            ("new@remote.example", {})]),
        message("0ABCDEFGHJKMNPQRT", state="hold", size=3 * 1048576 + 500000, age=2 * 86400,
                sender="", recipients=[("x@y.example", {})]),
    ]
    text = admin.format_list(messages, NOW)
    assert text.split("\n") == [
        "Queue ID            Size   Age State      Sender/Recipients",
        "0ABCDEFGHJKMNPQRS   1.2K    5m deferred   a@sender.example",
        "                                          u@remote.example",
        "                                            (451 4.3.0 Greylisted, try later [mx.remote.example])",
        "                                          new@remote.example",
        "",
        "0ABCDEFGHJKMNPQRT   3.5M    2d held       <>",
        "                                          x@y.example",
        "",
        "-- 3.5 M in 2 requests.",
    ]
    assert admin.format_list([], NOW) == "Mail queue is empty"
    assert admin.format_list([], NOW, "held") == "No held messages"


def test_format_show():
    text = admin.format_show(dict(message("Q1", recipients=[
        ("u@remote.example", dict(outcome="deferred", code=451, status="4.3.0", text="try later",
                                  remote="mx.remote.example", at=NOW - 60)),
        ("w@remote.example", dict(outcome="delivered", code=250, status="2.0.0", text="Ok",
                                  at=NOW - 120))]), headers="From: a@sender.example\nSubject: hi"), NOW)
    lines = text.split("\n")
    assert lines[0] == "Queue ID:    Q1"
    assert lines[1] == "State:       deferred"
    assert lines[2] == "Size:        1.2K (1234 bytes)"
    assert lines[3].startswith("Arrived:     1970-04-26 ") and lines[3].endswith(" UTC (5m ago)")
    assert lines[4] == "Sender:      <a@sender.example>"
    assert lines[5] == "Client:      192.0.2.1 (helo client.example) on listener relay, ESMTPS, TLSv1.3"
    assert lines[6] == "Verdicts:    spf=pass"
    assert lines[7].startswith("Attempts:    2; next ") and lines[7].endswith("(in 4m)")
    assert lines[8:] == [
        "Recipients:",
        "  u@remote.example",
        "      deferred: 451 4.3.0 try later [mx.remote.example] (1m ago)",
        "  w@remote.example",
        "      delivered: 250 2.0.0 Ok (2m ago)",
        "Headers:",
        "  From: a@sender.example",
        "  Subject: hi",
    ]


class LongPathTests(unittest.TestCase):
    def test_a_socket_path_too_long_disables_the_channel_and_says_why(self):
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import globalLogPublisher

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        config = _Config(path="/etc/mailgate/mailgate.ini", queue=QueueConfig(path="/var/spool/mailgate"),
                         admin=AdminConfig(socket="/run/" + "x" * 120 + "/admin.sock"))
        reactor = MemoryReactorClock()
        service = admin.AdminService(config, reactor, gateway=None)
        self.assertIsNone(service.startService())
        self.assertEqual(reactor.unixServers, [])
        [error] = [e for e in logged if e.get("log_level") is not None and e["log_level"].name == "error"]
        self.assertIn("admin channel disabled", error["log_format"])
        service.stopService()
