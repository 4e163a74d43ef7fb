"""
mailgate.ops.trace and `mailgate trace`: a message's life rebuilt from the logs.

GatewayDayTests read the logs of tests.ops.test_logs.gateway_day (a real listener session, then real
deliveries by the scheduler, one deferred once); the rest use small hand-written logs.
"""

import contextlib
import io
import json
import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailgate import cli

from mailgate.ops import trace
from mailgate.ops.logs import encode, rotated_name
from tests.ops.test_logs import START, gateway_day

CONFIG = """\
[gateway]
hostname = mx.example.com

[listener:mx]
endpoint = tcp:2525
role = relay
tls = none
auth = none
"""


def write_config(testcase, log_dir):
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    path = os.path.join(directory, "mailgate.ini")
    with open(path, "w") as f:
        f.write(CONFIG + ("\n[logging]\ndir = %s\n" % log_dir if log_dir else ""))
    return path


def run(*argv, env=None):
    """cli.main(argv) -> (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("MAILGATE_CONFIG")
    if env is not None:
        os.environ["MAILGATE_CONFIG"] = env
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(list(argv))
    finally:
        if env is not None:
            if old is None:
                del os.environ["MAILGATE_CONFIG"]
            else:
                os.environ["MAILGATE_CONFIG"] = old
    return status, out.getvalue(), err.getvalue()


def tracking_steps(text):
    """(event, first detail) of the tracking lines (flush left) of a text trace."""
    return [tuple(line.split()[1:3]) for line in text.splitlines() if line[:4] == "2026"]


def protocol_lines(text):
    return [line.split(None, 4) for line in text.splitlines() if line.startswith("    2026")]


# --- a gateway's day, traced -------------------------------------------------------------------


class GatewayDayTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.day = yield gateway_day(self)
        self.config = write_config(self, self.day["dir"])
        self.inbound = self.day["session"]
        protocol = []
        with open(os.path.join(self.day["dir"], "protocol.log")) as f:
            protocol = [json.loads(line) for line in f]
        self.outbound = list(dict.fromkeys(r["session"] for r in protocol
                                           if r["direction"] == "out"))
        # In order: Q0002 delivered, Q0001 deferred, Q0001 delivered.
        self.assertEqual(len(self.outbound), 3)

    def test_text(self):
        status, out, err = run("trace", "Q0001", "--config", self.config)
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], "Q0001  message-id <m1.2026@example.com>"
                                   "  from <alice@example.com>  to <bob@example.org>")
        self.assertEqual(tracking_steps(out), [
            ("RECEIVE", "from=<alice@example.com>"), ("DEFER", "from=<alice@example.com>"),
            ("DELIVER", "from=<alice@example.com>")])
        receive, defer_, deliver = [line for line in lines if line[:4] == "2026"]
        self.assertIn(" to=<bob@example.org> ", receive)
        self.assertIn(" session=%s " % self.inbound, receive)
        self.assertIn(" user=alice@example.com ", receive)
        self.assertTrue(defer_.endswith("reply: 451 4.2.0 Mailbox busy"), defer_)
        self.assertIn(" route=smarthost ", defer_)
        self.assertTrue(deliver.endswith("reply: 250 2.0.0 Ok: queued"), deliver)

        steps = protocol_lines(out)
        sessions = list(dict.fromkeys(words[2] for words in steps))
        # The inbound session and the two outbound ones of Q0001, not Q0002's.
        self.assertEqual(sessions, [self.inbound, self.outbound[1], self.outbound[2]])
        self.assertEqual({words[1] for words in steps if words[2] == self.inbound}, {"in"})
        self.assertEqual({words[1] for words in steps if words[2] != self.inbound}, {"out"})
        self.assertNotIn("RCPT TO:<carol@example.org>",
                         [w[4] for w in steps if w[1] == "out" and len(w) > 4])
        # Each outbound session comes before the event it led to.
        first_defer = lines.index(defer_)
        self.assertIn("451 4.2.0 Mailbox busy", "\n".join(lines[first_defer - 5:first_defer]))
        self.assertIn("session=%s" % self.outbound[1], defer_)  # the event names its session
        self.assertTrue(all(self.outbound[1] not in line for line in lines[first_defer + 1:]))
        self.assertIn("250 2.0.0 Ok: queued", "\n".join(lines[first_defer:lines.index(deliver)]))
        # Indentation: protocol lines by four spaces, reply continuations under their data.
        ehlo = [i for i, line in enumerate(lines) if line.endswith("250-mx.example.net")][0]
        self.assertEqual(lines[ehlo + 1].strip(), "250-PIPELINING")
        self.assertEqual(lines[ehlo + 1].index("250"), lines[ehlo].index("250-mx"))
        # Secrets stay masked in the trace as in the logs.
        self.assertIn("AUTH PLAIN ****", out)
        self.assertNotIn("s3cret", out)

    def test_json(self):
        status, out, err = run("trace", "Q0001", "--json", "--config", self.config)
        self.assertEqual((status, err), (0, ""))
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual({r["trace"] for r in records}, {"Q0001"})
        self.assertEqual([list(r)[:2] for r in records][0], ["time", "kind"])
        times = [r["time"] for r in records]
        self.assertEqual(times, sorted(times))
        tracking = [r for r in records if r["kind"] == "tracking"]
        self.assertEqual([r["event"] for r in tracking], ["RECEIVE", "DEFER", "DELIVER"])
        self.assertEqual(tracking[0]["message_id"], "<m1.2026@example.com>")
        self.assertEqual(tracking[0]["session"], self.inbound)
        protocol = [r for r in records if r["kind"] == "protocol"]
        self.assertEqual(list(dict.fromkeys(r["session"] for r in protocol)),
                         [self.inbound, self.outbound[1], self.outbound[2]])
        # As logged: the same objects (plus kind and trace).
        with open(os.path.join(self.day["dir"], "protocol.log")) as f:
            logged = [json.loads(line) for line in f]
        stripped = [{k: v for k, v in r.items() if k not in ("kind", "trace")} for r in protocol]
        self.assertEqual(stripped, [r for r in logged if r["session"] in (
            self.inbound, self.outbound[1], self.outbound[2])])

    def test_by_message_id_and_address(self):
        for query in ("<m2.2026@example.com>", "m2.2026@example.com", "CAROL@example.org"):
            status, out, err = run("trace", query, "--config", self.config)
            self.assertEqual(status, 0, err)
            self.assertTrue(out.startswith("Q0002  message-id <m2.2026@example.com>"), out)
            self.assertEqual([s[0] for s in tracking_steps(out)], ["RECEIVE", "DELIVER"])
            self.assertEqual(list(dict.fromkeys(w[2] for w in protocol_lines(out))),
                             [self.inbound, self.outbound[0]])
        # The sender: every message, and the refused login (AUTH_FAIL names the address).
        status, out, err = run("trace", "alice@example.com", "--config", self.config)
        self.assertEqual(status, 0, err)
        headers = [line.split()[0] for line in out.splitlines()
                   if line and not line[0].isspace() and not line.startswith("2026")]
        self.assertEqual(headers, ["session", "Q0001", "Q0002"])
        self.assertEqual([s[0] for s in tracking_steps(out)],
                         ["AUTH_FAIL", "RECEIVE", "DEFER", "DELIVER", "RECEIVE", "DELIVER"])
        # A refused sender: found through the reply that names it.
        status, out, err = run("trace", "mallory@other.test", "--config", self.config)
        self.assertEqual(status, 0, err)
        self.assertEqual(out.splitlines()[0],
                         "session %s: refused mail (no queue id)" % self.inbound)
        self.assertEqual([s[0] for s in tracking_steps(out)], ["REJECT"])
        self.assertIn("MAIL FROM:<mallory@other.test>", out)

    def test_since_and_until(self):
        status, out, err = run("trace", "Q0001", "--until", "2026-11-28T23:46:30Z",
                               "--config", self.config)
        self.assertEqual(status, 0, err)
        self.assertEqual([s[0] for s in tracking_steps(out)], ["RECEIVE"])
        self.assertEqual({w[1] for w in protocol_lines(out)}, {"in"})
        status, out, err = run("trace", "Q0001", "--since", "2026-11-28 23:47",
                               "--config", self.config)
        self.assertEqual(status, 0, err)
        self.assertEqual([s[0] for s in tracking_steps(out)], ["DELIVER"])
        self.assertEqual(list(dict.fromkeys(w[2] for w in protocol_lines(out))),
                         [self.outbound[2]])
        status, out, err = run("trace", "Q0001", "--since", "2026-11-29", "--config", self.config)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mailgate: no message matches Q0001 in %s since"
                              " 2026-11-29T00:00:00.000Z\n" % self.day["dir"])
        status, out, err = run("trace", "Q0001", "--until", "2026-11-28", "--config", self.config)
        self.assertEqual(status, 0, err)  # a date alone: the whole day
        self.assertEqual(len(tracking_steps(out)), 3)


# --- hand-written logs -------------------------------------------------------------------------


def inbound(session, n, event="command", data="", **extra):
    return dict(time=START + n, session=session, listener="relay", direction="in",
                local="10.0.0.1:25", remote="192.0.2.10:40000", event=event, data=data, **extra)


def outbound(session, n, event="command", data="", route="internet", **extra):
    return dict(time=START + n, session=session, route=route, direction="out",
                local="10.0.0.1:41000", remote="192.0.2.77:25", event=event, data=data, **extra)


def attempt(session, start, sender=None, rcpt=None, message_id=None, route="internet",
            reply="250 2.0.0 Ok"):
    """An outbound session: connect, EHLO, and MAIL/RCPT when given, then its last reply."""
    events = [outbound(session, start, "connect", "mx.dest.example tls=opportunistic",
                       route=route, message_id=message_id),
              outbound(session, start + 0.1, "command", "EHLO mx.example.com", route=route)]
    if sender is not None:
        events.append(outbound(session, start + 0.2, "command", "MAIL FROM:<%s>" % sender,
                               route=route))
    if rcpt is not None:
        events.append(outbound(session, start + 0.3, "command", "RCPT TO:<%s>" % rcpt,
                               route=route))
    events.append(outbound(session, start + 0.4, "reply", reply, route=route))
    events.append(outbound(session, start + 0.5, "disconnect", "", route=route))
    return events


def track(event, n, **fields):
    return dict(time=START + n, event=event, **fields)


class HandWrittenTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name, events):
        with open(os.path.join(self.dir, name), "ab") as f:
            for event in events:
                f.write(encode(event))

    def find(self, query, since=None, until=None):
        return trace.find(self.dir, query, since, until)

    def sessions(self, message):
        return list(message.protocol)

    def test_outbound_sessions_matched_per_attempt(self):
        msg = dict(queue_id="Q1", sender="a@example.com", message_id="<one@example.com>")
        other = dict(queue_id="Q2", sender="a@example.com", message_id="<two@example.com>")
        self.write("tracking.log", [
            track("RECEIVE", 0, recipients=["x@dest.example", "y@dest.example"], session="in1",
                  **msg),
            track("RECEIVE", 1, recipients=["x@dest.example"], session="in1", **other),
            track("DEFER", 10, recipients=["x@dest.example"], route="internet", **msg),
            track("DELIVER", 10, recipients=["y@dest.example"], route="internet", **msg),
            track("DELIVER", 11, recipients=["x@dest.example"], route="internet", **other),
            track("DELIVER", 80, recipients=["x@dest.example"], route="internet", **msg),
        ])
        self.write("protocol.log", [inbound("in1", 0, "connect"), inbound("in1", 2, "disconnect")]
                   + attempt("tlsfail", 5, message_id="<one@example.com>", reply="454 no TLS")
                   + attempt("a1", 6, "a@example.com", "x@dest.example", "<one@example.com>",
                             reply="451 busy")
                   + attempt("a2", 7, "a@example.com", "y@dest.example", "<one@example.com>")
                   + attempt("b1", 8, "a@example.com", "x@dest.example", "<two@example.com>")
                   + attempt("late", 81, "a@example.com", "x@dest.example",
                             "<one@example.com>")  # ended after the DELIVER (+1 s): not it
                   + attempt("a3", 70, "a@example.com", "x@dest.example", "<one@example.com>")
                   + attempt("other-route", 71, "a@example.com", "x@dest.example",
                             "<one@example.com>", route="internal"))
        [q1] = self.find("Q1")
        self.assertEqual(self.sessions(q1), ["in1", "tlsfail", "a1", "a2", "a3"])
        [q2] = self.find("<two@example.com>")
        self.assertEqual(self.sessions(q2), ["in1", "b1"])

    def test_sessions_named_by_the_event_win(self):
        self.write("tracking.log", [
            track("RECEIVE", 0, queue_id="Q1", sender="a@example.com", recipients=["x@d.example"]),
            track("DELIVER", 10, queue_id="Q1", sender="a@example.com",
                  recipients=["x@d.example"], route="internet", session="named"),
        ])
        self.write("protocol.log", attempt("named", 100, "z@elsewhere.example", "q@d.example")
                   + attempt("guess", 5, "a@example.com", "x@d.example"))
        [q1] = self.find("Q1")
        self.assertEqual(self.sessions(q1), ["named"])

    def test_without_message_id_a_session_before_mail_is_not_claimed(self):
        self.write("tracking.log", [
            track("RECEIVE", 0, queue_id="Q1", sender="a@example.com", recipients=["x@d.example"]),
            track("DEFER", 10, queue_id="Q1", sender="a@example.com", recipients=["x@d.example"],
                  route="internet"),
        ])
        self.write("protocol.log", attempt("early", 5, reply="421 busy")
                   + attempt("mail", 6, "a@example.com", reply="451 later"))
        [q1] = self.find("Q1")
        self.assertEqual(self.sessions(q1), ["mail"])  # MAIL FROM ours, no RCPT yet

    def test_rotated_files_oldest_first(self):
        self.write(rotated_name("tracking", START + 5), [
            track("RECEIVE", 0, queue_id="Q1", sender="a@example.com", recipients=["x@d.example"],
                  session="in1")])
        self.write(rotated_name("tracking", START + 50), [
            track("DEFER", 40, queue_id="Q1", sender="a@example.com", recipients=["x@d.example"],
                  route="internet")])
        self.write("tracking.log", [
            track("DELIVER", 100, queue_id="Q1", sender="a@example.com",
                  recipients=["x@d.example"], route="internet")])
        self.write(rotated_name("protocol", START + 3), [inbound("in1", 0, "connect")])
        self.write("protocol.log", [inbound("in1", 4, "disconnect")]
                   + attempt("o1", 90, "a@example.com", "x@d.example"))
        [q1] = self.find("Q1")
        self.assertEqual([e["event"] for e in q1.tracking], ["RECEIVE", "DEFER", "DELIVER"])
        self.assertEqual(self.sessions(q1), ["in1", "o1"])
        self.assertEqual([e["event"] for e in q1.protocol["in1"]], ["connect", "disconnect"])
        # Files wholly before --since (by their names) are not even opened.
        opened = []

        def spy(path, *args, **kw):
            opened.append(os.path.basename(path))
            return open(path, *args, **kw)

        trace.open = spy  # shadows the builtin in that module only
        self.addCleanup(delattr, trace, "open")
        [q1] = self.find("Q1", since=trace.parse_when("2026-11-28T23:48:00"))
        self.assertEqual([e["event"] for e in q1.tracking], ["DELIVER"])
        self.assertEqual(opened, [rotated_name("tracking", START + 50), "tracking.log",
                                  "protocol.log"])

    def test_dsn_follows(self):
        self.write("tracking.log", [
            track("RECEIVE", 0, queue_id="Q1", sender="a@example.com", recipients=["x@d.example"]),
            track("BOUNCE", 10, queue_id="Q1", sender="a@example.com", recipients=["x@d.example"],
                  route="internet", reply="550 5.1.1 no such user"),
            track("DSN", 10.5, queue_id="Q1", sender="a@example.com", recipients=["x@d.example"],
                  action="failed", dsn_queue_id="D1"),
            track("DELIVER", 12, queue_id="D1", sender="", recipients=["a@example.com"],
                  route="internal"),
        ])
        self.write("protocol.log", attempt("o1", 9, "a@example.com", "x@d.example",
                                           reply="550 5.1.1 no such user")
                   + attempt("o2", 11, "", "a@example.com", route="internal"))
        q1, d1 = self.find("Q1")
        self.assertEqual((q1.key, d1.key, d1.dsn_for), ("Q1", "D1", "Q1"))
        self.assertEqual(self.sessions(q1), ["o1"])
        self.assertEqual(self.sessions(d1), ["o2"])
        text = "\n".join(trace.text_lines([q1, d1]))
        self.assertIn("D1  from <>  to <a@example.com>  (delivery status notification for Q1)",
                      text)
        self.assertIn("DSN        from=<a@example.com> to=<x@d.example> action=failed"
                      " dsn_queue_id=D1", text)

    def test_damaged_lines_are_skipped(self):
        with open(os.path.join(self.dir, "tracking.log"), "wb") as f:
            f.write(b"not json\n")
            f.write(encode(track("RECEIVE", 0, queue_id="Q1", sender="a@example.com")))
            f.write(b'{"time":"2026-11-28T23:46:22.000Z","event":"DEFER","queue_id":"Q1","se')
        [q1] = self.find("Q1")
        self.assertEqual([e["event"] for e in q1.tracking], ["RECEIVE"])

    def test_parse_when(self):
        self.assertEqual(trace.parse_when("2026-11-28"), "2026-11-28T00:00:00.000Z")
        self.assertEqual(trace.parse_when("2026-11-28", end=True), "2026-11-28T23:59:59.999Z")
        self.assertEqual(trace.parse_when("2026-11-28T23:46:21.705Z"), "2026-11-28T23:46:21.705Z")
        self.assertEqual(trace.parse_when("2026-11-28 23:46"), "2026-11-28T23:46:00.000Z")
        self.assertEqual(trace.parse_when("2026-11-29T01:46:21+02:00"),
                         "2026-11-28T23:46:21.000Z")
        for bad in ("yesterday", "2026-13-01", ""):
            self.assertRaises(trace.TraceError, trace.parse_when, bad)


class CommandTests(SynchronousTestCase):
    def test_missing_log_dir(self):
        missing = os.path.abspath(self.mktemp())
        status, out, err = run("trace", "Q1", "--config", write_config(self, missing))
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mailgate: no log directory %s\n" % missing)

    def test_no_logging_dir(self):
        config = write_config(self, None)
        status, out, err = run("trace", "Q1", "--config", config)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mailgate: %s: [logging] dir is not set: there are no logs to"
                              " trace\n" % config)

    def test_no_match_and_config_from_the_environment(self):
        logs = os.path.abspath(self.mktemp())
        os.makedirs(logs)
        status, out, err = run("trace", "nobody@example.com", env=write_config(self, logs))
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err, "mailgate: no message matches nobody@example.com in %s\n" % logs)

    def test_bad_config_and_bad_time(self):
        status, out, err = run("trace", "Q1", "--config", os.path.abspath(self.mktemp()))
        self.assertEqual(status, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("cannot read", err)
        logs = os.path.abspath(self.mktemp())
        os.makedirs(logs)
        status, out, err = run("trace", "Q1", "--since", "soon", "--config",
                               write_config(self, logs))
        self.assertEqual(status, 1)
        self.assertTrue(err.startswith("mailgate: --since: expected an ISO date"), err)
