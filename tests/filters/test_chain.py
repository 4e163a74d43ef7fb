"""
The filter chain (mailgate.filters.chain) and the filter loader (mailgate.filters), driven with a
Clock and a synchronous thread runner; the last tests run the chain inside a real listener session.
"""

import email
import email.policy
import re
import sys
import types
from pathlib import Path
from unittest import mock

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailgate import filters as filters_pkg
from mailgate.config import (AuthConfig, Config, FiltersConfig, FilterSection, GatewayConfig, Limits,
                             QueueConfig, TLSConfig)
from mailgate.envelope import Address, Envelope, Reply
from mailgate.errors import ConfigError
from mailgate.filters import FilterContext, build_chain, load_filters
from mailgate.filters.chain import FilterChain, FilterError, parse
from mailgate.interfaces import IFilter
from mailgate.verdict import AuthResult, DataResult, Verdict

from tests import REPO, thirdparty_filter
from tests.smtphelp import Session as SMTPSession, listener

HOSTNAME = "mx.example.net"
TEMP_FAIL = Reply(451, "4.3.0", "Temporary failure, please try again later")
RAW = (b"Authentication-Results: mx.example.net; dkim=pass header.d=bank.example\r\n"
       b"From: a@remote.example\r\nSubject: hello\r\n\r\nbody\r\n")
SENDER = Address("a", "remote.example")
RCPT = Address("u", "example.com")


def make_config(timeout=30.0, sections=()):
    return Config(path="/etc/mailgate/mailgate.ini", gateway=GatewayConfig(hostname=HOSTNAME),
                  limits=Limits(), queue=QueueConfig(), tls=TLSConfig(), auth=AuthConfig(),
                  listeners=(), filters=FiltersConfig(timeout=timeout), filter_sections=sections)


class FakeSession:
    """What filters see of a session (mailgate.session.Session has the same attributes)."""

    def __init__(self, relay_allowed=False):
        self.id = "s1"
        self.client_ip = "192.0.2.10"
        self.helo = "client.example"
        self.relay_allowed = relay_allowed
        self.transaction = {}

    def end_transaction(self):
        self.transaction.clear()  # what the listener does after each message and on RSET


class Runner:
    """run_in_thread that runs at once (sync=True) or waits until fire() is called."""

    def __init__(self, sync=True):
        self.sync = sync
        self.calls = []
        self.pending = []

    def __call__(self, f, *args):
        self.calls.append(f)
        if self.sync:
            return defer.maybeDeferred(f, *args)
        d = defer.Deferred()
        self.pending.append((d, f, args))
        return d

    def fire(self):
        pending, self.pending = self.pending, []
        for d, f, args in pending:
            d.callback(f(*args))


class Filter:
    """A filter answering per stage with a fixed verdict (or whatever answer(...) returns)."""

    def __init__(self, name, calls, **answers):
        self.name = name
        self.seen = []
        for stage, answer in answers.items():
            setattr(self, "on_" + stage, self._hook(stage, answer, calls))

    def _hook(self, stage, answer, calls):
        def hook(session, *args):
            calls.append((self.name, stage))
            self.seen.append((stage, args))
            return answer(session, *args) if callable(answer) else answer

        return hook


def envelope(queue_id="Q1"):
    return Envelope(queue_id=queue_id, sender="a@remote.example", recipients=("u@example.com",),
                    client_ip="192.0.2.10")


class ChainCase(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.runner = Runner()
        self.calls = []
        self.session = FakeSession()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def chain(self, *filters, timeout=30.0):
        context = FilterContext(config=make_config(timeout), reactor=self.clock, resolver=None,
                                run_in_thread=self.runner)
        return FilterChain(filters, context, HOSTNAME)

    def filter(self, name, **answers):
        return Filter(name, self.calls, **answers)

    def result(self, value):
        """The result of a hook's answer (None, a Reply, or a Deferred that has fired)."""
        if isinstance(value, defer.Deferred):
            return self.successResultOf(value)
        return value

    def transaction(self, chain, raw=RAW):
        """MAIL, one RCPT and end of data: (mail answer, rcpt answer, data answer)."""
        mail = self.result(chain.on_mail(self.session, SENDER))
        rcpt = self.result(chain.on_rcpt(self.session, RCPT))
        data = self.result(chain.on_data(self.session, envelope(), raw))
        return mail, rcpt, data


class OrderTests(ChainCase):
    def test_filters_run_in_order_one_stage_at_a_time(self):
        a = self.filter("a", connect=Verdict.next(), mail=Verdict.next(), data=Verdict.next())
        b = self.filter("b", helo=Verdict.next(), mail=Verdict.next(), rcpt=Verdict.next())
        c = self.filter("c", mail=Verdict.next(), data=Verdict.next())
        chain = self.chain(a, b, c)
        self.assertIsNone(self.result(chain.on_connect(self.session)))
        self.assertIsNone(self.result(chain.on_helo(self.session)))
        mail, rcpt, data = self.transaction(chain)
        self.assertEqual((mail, rcpt), (None, None))
        self.assertEqual(self.calls, [("a", "connect"), ("b", "helo"), ("a", "mail"), ("b", "mail"),
                                      ("c", "mail"), ("b", "rcpt"), ("a", "data"), ("c", "data")])
        self.assertEqual(data.verdicts, (("a", "next"), ("b", "next"), ("a", "next"), ("b", "next"),
                                         ("c", "next"), ("b", "next"), ("a", "next"), ("c", "next")))
        self.assertEqual(data.state, "active")
        self.assertIsNone(data.reason)

    def test_a_filter_waits_for_the_one_before(self):
        pending = defer.Deferred()
        a = self.filter("a", mail=pending)
        b = self.filter("b", mail=Verdict.next())
        d = self.chain(a, b).on_mail(self.session, SENDER)
        self.assertNoResult(d)
        self.assertEqual(self.calls, [("a", "mail")])
        pending.callback(Verdict.next())
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.calls, [("a", "mail"), ("b", "mail")])

    def test_hooks_get_the_session_and_their_arguments(self):
        a = self.filter("a", mail=Verdict.next(), rcpt=Verdict.next(), data=Verdict.next())
        self.transaction(self.chain(a))
        self.assertEqual(a.seen[0], ("mail", (SENDER,)))
        self.assertEqual(a.seen[1], ("rcpt", (RCPT,)))
        stage, (message,) = a.seen[2]
        self.assertEqual(message.raw, RAW)
        self.assertEqual(message.envelope, envelope())
        self.assertEqual(message.queue_id, "Q1")
        self.assertEqual(message.parsed["Subject"], "hello")

    def test_no_filters(self):
        chain = self.chain()
        self.assertIsNone(self.result(chain.on_connect(self.session)))
        self.assertIsNone(chain.on_mail(self.session, SENDER))
        data = self.result(chain.on_data(self.session, envelope(), RAW))
        self.assertEqual(data, DataResult(RAW.split(b"\r\n", 1)[1], "active", (), None))
        self.assertEqual(self.runner.calls, [])  # nothing to parse for


class VerdictTests(ChainCase):
    def test_first_reject_wins_and_later_filters_are_not_called(self):
        a = self.filter("a", rcpt=Verdict.next())
        b = self.filter("b", rcpt=Verdict.reject(550, "5.7.1", "No thanks"))
        c = self.filter("c", rcpt=Verdict.reject(554, "5.7.1", "Nor me"))
        reply = self.result(self.chain(a, b, c).on_rcpt(self.session, RCPT))
        self.assertEqual(reply, Reply(550, "5.7.1", "No thanks"))
        self.assertEqual(self.calls, [("a", "rcpt"), ("b", "rcpt")])

    def test_tempfail(self):
        a = self.filter("a", mail=Verdict.tempfail(450, "4.7.1", "Greylisted, try again"))
        b = self.filter("b", mail=Verdict.next())
        reply = self.result(self.chain(a, b).on_mail(self.session, SENDER))
        self.assertEqual(reply, Reply(450, "4.7.1", "Greylisted, try again"))
        self.assertEqual(self.calls, [("a", "mail")])

    def test_reject_at_end_of_data(self):
        a = self.filter("a", data=Verdict.quarantine("odd").with_headers([("X-A", "1")]))
        b = self.filter("b", data=Verdict.reject(554, "5.7.1", "Virus found"))
        mail, rcpt, data = self.transaction(self.chain(a, b))
        self.assertEqual(data, Reply(554, "5.7.1", "Virus found"))

    def test_reject_at_connect_and_helo(self):
        chain = self.chain(self.filter("a", connect=Verdict.reject(554, "5.7.1", "Blocked"),
                                       helo=Verdict.tempfail(421, "4.7.0", "Later")))
        self.assertEqual(self.result(chain.on_connect(self.session)), Reply(554, "5.7.1", "Blocked"))
        self.assertEqual(self.result(chain.on_helo(self.session)), Reply(421, "4.7.0", "Later"))

    def test_accept_skips_the_rest_of_this_stage_only(self):
        a = self.filter("a", mail=Verdict.accept(), rcpt=Verdict.next())
        b = self.filter("b", mail=Verdict.reject(550, "5.7.1", "no"), rcpt=Verdict.next(),
                        data=Verdict.next())
        mail, rcpt, data = self.transaction(self.chain(a, b))
        self.assertEqual((mail, rcpt), (None, None))
        self.assertEqual(self.calls, [("a", "mail"), ("a", "rcpt"), ("b", "rcpt"), ("b", "data")])
        self.assertEqual(data.verdicts, (("a", "accept"), ("a", "next"), ("b", "next"), ("b", "next")))

    def test_quarantine_at_rcpt_quarantines_the_message(self):
        a = self.filter("a", rcpt=Verdict.quarantine("suspicious recipient pattern"))
        b = self.filter("b", rcpt=Verdict.next(), data=Verdict.next())
        mail, rcpt, data = self.transaction(self.chain(a, b))
        self.assertIsNone(rcpt)  # the listener goes on: the message is accepted, then held
        self.assertEqual(data.state, "quarantine")
        self.assertEqual(data.reason, "suspicious recipient pattern")
        self.assertEqual(self.calls, [("a", "rcpt"), ("b", "rcpt"), ("b", "data")])

    def test_quarantine_reasons_are_joined(self):
        a = self.filter("a", data=Verdict.quarantine("spoofed"))
        b = self.filter("b", data=Verdict.quarantine("macro"))
        mail, rcpt, data = self.transaction(self.chain(a, b))
        self.assertEqual((data.state, data.reason), ("quarantine", "spoofed; macro"))

    def test_quarantine_is_per_transaction(self):
        a = self.filter("a", mail=lambda session, sender: (
            Verdict.quarantine("first") if not self.calls[1:] else Verdict.next()))
        chain = self.chain(a)
        self.assertEqual(self.transaction(chain)[2].state, "quarantine")
        self.session.end_transaction()
        self.assertEqual(self.transaction(chain)[2].state, "active")

    def test_quarantine_at_connect_holds_every_message_of_the_session(self):
        chain = self.chain(self.filter("a", connect=Verdict.quarantine("listed client")),
                           self.filter("b", helo=Verdict.next().with_headers([("X-Helo", "checked")])))
        self.result(chain.on_connect(self.session))
        self.result(chain.on_helo(self.session))
        for _ in range(2):
            data = self.transaction(chain)[2]
            self.assertEqual((data.state, data.reason), ("quarantine", "listed client"))
            self.assertEqual(data.verdicts, (("a", "quarantine"), ("b", "next")))
            self.assertTrue(data.data.startswith(b"X-Helo: checked\r\nFrom:"))
            self.session.end_transaction()

    def test_a_second_helo_replaces_the_first(self):
        chain = self.chain(self.filter("a", helo=Verdict.next().with_headers([("X-Helo", "ok")])))
        self.result(chain.on_connect(self.session))
        self.result(chain.on_helo(self.session))
        self.result(chain.on_helo(self.session))  # EHLO again after STARTTLS
        data = self.transaction(chain)[2]
        self.assertEqual(data.data.count(b"X-Helo: ok\r\n"), 1)

    def test_a_refused_command_leaves_the_transaction_as_it_was(self):
        def spf(session, sender):
            session.transaction.setdefault("auth_results", []).append(
                AuthResult("spf", "fail", properties=[("smtp.mailfrom", str(sender))]))
            return Verdict.quarantine("spf fail").with_headers([("X-Spf", "fail")])

        chain = self.chain(self.filter("spf", mail=spf),
                           self.filter("policy", mail=Verdict.reject(550, "5.7.1", "No")))
        self.assertEqual(self.result(chain.on_mail(self.session, SENDER)).code, 550)
        self.assertEqual(self.session.transaction, {})
        # ... and per recipient: a refused RCPT's quarantine or headers do not stick.
        session_before = {"auth_results": [AuthResult("spf", "pass")]}
        self.session.transaction.update(session_before)
        chain = self.chain(self.filter("x", rcpt=Verdict.quarantine("x")),
                           self.filter("y", rcpt=lambda s, r: Verdict.reject(550, "5.1.1", "Unknown")
                                       if r.local == "bad" else Verdict.next()))
        self.result(chain.on_rcpt(self.session, RCPT))
        self.assertEqual(self.result(chain.on_rcpt(self.session, Address("bad", "example.com"))).code, 550)
        data = self.result(chain.on_data(self.session, envelope(), RAW))
        self.assertEqual(data.verdicts, (("x", "quarantine"), ("y", "next")))
        self.assertEqual(self.session.transaction["auth_results"], [AuthResult("spf", "pass")])

    def test_headers_are_added_at_the_top_in_order(self):
        a = self.filter("a", mail=Verdict.next().with_headers([("X-Mail-Check", "done")]))
        b = self.filter("b", data=Verdict.next().with_headers([("X-Scanned", "yes"), ("X-Score", "1.5")]))
        data = self.transaction(self.chain(a, b))[2]
        self.assertEqual(data.data, b"X-Mail-Check: done\r\nX-Scanned: yes\r\nX-Score: 1.5\r\n"
                                    b"From: a@remote.example\r\nSubject: hello\r\n\r\nbody\r\n")

    def test_header_values_cannot_inject_lines(self):
        long_value = "word " * 30
        a = self.filter("a", data=Verdict.next().with_headers([
            ("X-Evil", "ok\r\nBcc: victim@example.com\r\n\r\nbody"), ("X-Long", long_value),
            ("X-Utf8", "caf\u00e9 \u2028 ok")]))
        data = self.transaction(self.chain(a))[2].data
        top = data.split(b"\r\nFrom:", 1)[0].split(b"\r\n")
        self.assertEqual(top[0], b"X-Evil: okBcc: victim@example.combody")
        self.assertTrue(all(line[:1] in (b" ", b"\t") for line in top[1:] if not line.startswith(b"X-")))
        self.assertTrue(all(len(line) <= 78 for line in top))
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(parsed["X-Long"], long_value.strip())
        self.assertEqual(parsed["X-Utf8"], "caf\u00e9 ok")
        self.assertNotIn("Bcc", parsed)

    def test_a_header_with_an_invalid_name_is_a_filter_error(self):
        a = self.filter("a", data=Verdict.next().with_headers([("X-Evil\r\nBcc", "x")]))
        self.assertEqual(self.transaction(self.chain(a))[2], TEMP_FAIL)
        self.assertEqual(len(self.flushLoggedErrors(FilterError)), 1)

    def test_with_message_replaces_the_message(self):
        def tag(session, message):
            new = email.message_from_bytes(message.raw, policy=email.policy.default)
            new.replace_header("Subject", "[EXT] hello")
            return Verdict.next().with_message(new)

        a = self.filter("a", data=tag)
        b = self.filter("b", data=Verdict.next())
        data = self.transaction(self.chain(a, b))[2]
        (_, (seen,)) = b.seen[0]
        self.assertEqual(seen.parsed["Subject"], "[EXT] hello")
        self.assertIn(b"Subject: [EXT] hello\r\n", seen.raw)
        self.assertEqual(seen.envelope, envelope())
        self.assertEqual(data.data, b"From: a@remote.example\r\nSubject: [EXT] hello\r\n\r\nbody\r\n")
        self.assertEqual(self.runner.calls[0], parse)
        self.assertEqual(len(self.runner.calls), 2)  # parse, then serialize the replacement

    def test_a_message_given_before_end_of_data_is_ignored(self):
        new = email.message_from_bytes(b"Subject: other\r\n\r\nx\r\n", policy=email.policy.default)
        a = self.filter("a", mail=Verdict.next().with_message(new))
        data = self.transaction(self.chain(a))[2]
        self.assertIn(b"Subject: hello", data.data)

    def test_every_verdict_is_logged(self):
        a = self.filter("a", mail=Verdict.next(), data=Verdict.quarantine("looks odd"))
        self.transaction(self.chain(a))
        verdicts = [e for e in self.events if "action" in e]
        self.assertEqual([(e["filter"], e["stage"], e["action"], e["reason"], e["session"], e["queue_id"])
                          for e in verdicts],
                         [("a", "mail", "next", None, "s1", None),
                          ("a", "data", "quarantine", "looks odd", "s1", "Q1")])


class FailureTests(ChainCase):
    def assertLoggedFailure(self, kind, filter_name, stage):
        errors = self.flushLoggedErrors(kind)
        self.assertEqual(len(errors), 1)
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual((failures[0]["filter"], failures[0]["stage"], failures[0]["session"]),
                         (filter_name, stage, "s1"))

    def test_a_filter_that_raises_gives_451(self):
        def boom(session, sender):
            1 / 0

        b = self.filter("b", mail=Verdict.next())
        reply = self.result(self.chain(self.filter("a", mail=boom), b).on_mail(self.session, SENDER))
        self.assertEqual(reply, TEMP_FAIL)
        self.assertEqual(self.calls, [("a", "mail")])
        self.assertLoggedFailure(ZeroDivisionError, "a", "mail")

    def test_a_failed_deferred_gives_451_at_end_of_data(self):
        a = self.filter("a", data=lambda s, m: defer.fail(OSError("scanner down")))
        self.assertEqual(self.transaction(self.chain(a))[2], TEMP_FAIL)
        self.assertLoggedFailure(OSError, "a", "data")

    def test_a_filter_that_does_not_answer_in_time_gives_451(self):
        cancelled = []
        pending = defer.Deferred(lambda d: cancelled.append(d))
        chain = self.chain(self.filter("slow", rcpt=pending), self.filter("b", rcpt=Verdict.next()),
                           timeout=30.0)
        d = chain.on_rcpt(self.session, RCPT)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), TEMP_FAIL)
        self.assertEqual(cancelled, [pending])
        self.assertEqual(self.calls, [("slow", "rcpt")])
        self.assertLoggedFailure(defer.TimeoutError, "slow", "rcpt")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_deferred_without_canceller_times_out_too(self):
        pending = defer.Deferred()
        d = self.chain(self.filter("slow", data=pending), timeout=5.0).on_data(self.session, envelope(), RAW)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), TEMP_FAIL)
        pending.callback(Verdict.next())  # a late answer is ignored
        self.assertLoggedFailure(defer.TimeoutError, "slow", "data")

    def test_the_timer_is_cancelled_when_the_filter_answers(self):
        pending = defer.Deferred()
        d = self.chain(self.filter("a", mail=pending)).on_mail(self.session, SENDER)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        pending.callback(Verdict.next())
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_answer_that_is_not_a_verdict_gives_451(self):
        for answer in (None, "reject", Reply(550, "5.7.1", "no"), defer.succeed(True)):
            reply = self.result(self.chain(self.filter("a", mail=answer)).on_mail(self.session, SENDER))
            self.assertEqual(reply, TEMP_FAIL)
            self.assertEqual(len(self.flushLoggedErrors(FilterError)), 1)

    def test_a_replacement_that_is_not_a_message_gives_451(self):
        a = self.filter("a", data=Verdict.next().with_message(b"Subject: x\r\n\r\n"))
        self.assertEqual(self.transaction(self.chain(a))[2], TEMP_FAIL)
        self.assertEqual(len(self.flushLoggedErrors(FilterError)), 1)

    def test_the_chain_keeps_working_after_a_failure(self):
        answers = iter([defer.fail(RuntimeError("once")), Verdict.next()])
        chain = self.chain(self.filter("a", mail=lambda s, sender: next(answers)))
        self.assertEqual(self.result(chain.on_mail(self.session, SENDER)), TEMP_FAIL)
        self.assertIsNone(self.result(chain.on_mail(self.session, SENDER)))
        self.flushLoggedErrors(RuntimeError)


class EndOfDataTests(ChainCase):
    def test_the_message_is_parsed_in_the_thread_pool(self):
        self.runner.sync = False
        a = self.filter("a", data=Verdict.next())
        d = self.chain(a).on_data(self.session, envelope(), RAW)
        self.assertNoResult(d)
        self.assertEqual(self.runner.calls, [parse])
        self.assertEqual(self.runner.pending[0][2], (RAW,))
        self.assertEqual(self.calls, [])  # filters wait for the parse
        self.runner.fire()
        self.assertIsInstance(self.successResultOf(d), DataResult)
        self.assertEqual(self.calls, [("a", "data")])

    def test_a_parse_failure_gives_451(self):
        def broken(f, *args):
            return defer.fail(MemoryError())

        context = FilterContext(make_config(), self.clock, None, broken)
        chain = FilterChain([self.filter("a", data=Verdict.next())], context, HOSTNAME)
        self.assertEqual(self.successResultOf(chain.on_data(self.session, envelope(), RAW)), TEMP_FAIL)
        self.assertEqual(len(self.flushLoggedErrors(MemoryError)), 1)

    def test_authentication_results_added_and_forged_ones_removed(self):
        raw = (b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x.example\r\n"
               b"Authentication-Results: MX.EXAMPLE.NET;\r\n\tdkim=pass header.d=bank.example\r\n"
               b"From: a@remote.example\r\n"
               b"Authentication-Results: (forged) mx.example.net 1; dmarc=pass\r\n"
               b"Subject: hello\r\n\r\nAuthentication-Results: mx.example.net; body text\r\n")

        def spf(session, sender):
            session.transaction.setdefault("auth_results", []).append(
                AuthResult("spf", "pass", properties=[("smtp.mailfrom", sender.domain)]))
            return Verdict.next()

        def dmarc(session, message):
            session.transaction.setdefault("auth_results", []).append(
                AuthResult("dmarc", "pass", properties=[("header.from", "remote.example")]))
            return Verdict.next().with_headers([("X-Dmarc", "checked")])

        chain = self.chain(self.filter("spf", mail=spf), self.filter("dmarc", data=dmarc))
        data = self.transaction(chain, raw)[2]
        self.assertEqual(
            data.data,
            b"Authentication-Results: mx.example.net;\r\n"
            b"\tspf=pass smtp.mailfrom=remote.example;\r\n"
            b"\tdmarc=pass header.from=remote.example\r\n"
            b"X-Dmarc: checked\r\n"
            b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x.example\r\n"
            b"From: a@remote.example\r\n"
            b"Subject: hello\r\n\r\nAuthentication-Results: mx.example.net; body text\r\n")

    def test_no_header_without_results(self):
        data = self.transaction(self.chain(self.filter("a", data=Verdict.next())))[2]
        self.assertNotIn(b"Authentication-Results", data.data)

    def test_injection_in_auth_results_is_neutralised(self):
        def evil(session, message):
            session.transaction.setdefault("auth_results", []).append(AuthResult(
                "dkim", "pass\r\nBcc: victim@example.com", reason="x\r\n\r\nbody",
                properties=[("header.d", "bank.example\r\nX-Spam: no")]))
            return Verdict.next()

        data = self.transaction(self.chain(self.filter("a", data=evil)))[2].data
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(list(parsed.keys()), ["Authentication-Results", "From", "Subject"])
        self.assertEqual(parsed.get_content().strip(), "body")

    def test_things_that_are_not_auth_results_are_ignored(self):
        def odd(session, message):
            session.transaction["auth_results"] = ["spf=pass", AuthResult("spf", "pass")]
            return Verdict.next()

        data = self.transaction(self.chain(self.filter("a", data=odd)))[2].data
        self.assertTrue(data.startswith(b"Authentication-Results: mx.example.net;\r\n\tspf=pass\r\nFrom:"))


# -- loading ------------------------------------------------------------------------------------


class LoadTests(unittest.TestCase):
    def context(self, sections=()):
        return FilterContext(make_config(sections=sections), Clock(), None, Runner())

    def error(self, names, sections=None):
        e = self.assertRaises(ConfigError, load_filters, names, self.context(), sections, "internet")
        self.assertNotIn("\n", str(e))
        return str(e)

    def test_dotted_path_with_its_section(self):
        path = "tests.thirdparty_filter.SubjectTagger"
        sections = (FilterSection(path, (("tag", "[EXT]"), ("header", "X-Tagged"))),
                    FilterSection("other", (("tag", "wrong"),)))
        (tagger,) = load_filters([path], self.context(), sections, "internet")
        self.assertIsInstance(tagger, thirdparty_filter.SubjectTagger)
        self.assertEqual((tagger.tag, tagger.header), ("[EXT]", "X-Tagged"))
        self.assertTrue(IFilter.providedBy(tagger))

    def test_sections_as_a_mapping(self):
        path = "tests.thirdparty_filter.SubjectTagger"
        options = {path: {"tag": "[X]"}}
        (tagger,) = load_filters([path], self.context(), options, "internet")
        self.assertEqual(tagger.tag, "[X]")

    def test_builtin_names_call_make_with_the_context(self):
        made = []
        module = types.ModuleType("fake_spf")
        module.make = lambda context: made.append(context) or Filter("spf", [], mail=Verdict.next())
        context = self.context()
        with mock.patch.dict(sys.modules, {"fake_spf": module}), \
                mock.patch.dict(filters_pkg.BUILTIN, {"spf": "fake_spf"}):
            (spf,) = load_filters(["spf"], context, {}, "internet")
        self.assertEqual(spf.name, "spf")
        self.assertEqual(made, [context])

    def test_the_builtin_table(self):
        self.assertEqual(filters_pkg.BUILTIN, {
            "spf": "mailgate.filters.spf", "dkim": "mailgate.filters.dkim",
            "dmarc": "mailgate.filters.dmarc", "attachments": "mailgate.filters.attachments"})

    def test_no_such_module(self):
        self.assertEqual(self.error(["nosuch.module.Filter"]),
                         "/etc/mailgate/mailgate.ini: [listener:internet] filters: cannot load "
                         "nosuch.module.Filter: ModuleNotFoundError: No module named 'nosuch'")

    def test_no_such_attribute(self):
        self.assertEqual(self.error(["tests.thirdparty_filter.Nope"]),
                         "/etc/mailgate/mailgate.ini: [listener:internet] filters: cannot load "
                         "tests.thirdparty_filter.Nope: AttributeError: module "
                         "'tests.thirdparty_filter' has no attribute 'Nope'")

    def test_constructor_raises(self):
        self.assertEqual(self.error(["tests.thirdparty_filter.SubjectTagger"]),
                         "/etc/mailgate/mailgate.ini: [listener:internet] filters: cannot load "
                         "tests.thirdparty_filter.SubjectTagger: ValueError: option tag is required")

    def test_not_a_filter(self):
        message = self.error(["tests.thirdparty_filter.NoHooks"])
        self.assertRegex(message, r"^/etc/mailgate/mailgate.ini: \[listener:internet\] filters: "
                                  r"cannot load tests.thirdparty_filter.NoHooks: TypeError: .* has "
                                  r"none of the hooks on_connect, on_helo, on_mail, on_rcpt, on_data$")
        self.assertRegex(self.error(["collections.OrderedDict"]), r"TypeError: .* has no name")

    def test_not_builtin_and_not_dotted(self):
        self.assertEqual(self.error(["spamassassin"]),
                         "/etc/mailgate/mailgate.ini: [listener:internet] filters: cannot load "
                         "spamassassin: ValueError: not a built-in filter (attachments, dkim, dmarc, "
                         "spf) nor a dotted path package.module.Class")

    def test_a_builtin_that_cannot_be_imported(self):
        with mock.patch.dict(filters_pkg.BUILTIN, {"spf": "mailgate.filters.no_such_module"}):
            self.assertIn("cannot load spf: ModuleNotFoundError: No module named "
                          "'mailgate.filters.no_such_module'", self.error(["spf"]))

    def test_a_config_error_from_a_filter_passes_through(self):
        module = types.ModuleType("fake_dkim")

        def make(context):
            raise ConfigError(context.config.path, "dkim", "selector", "required")

        module.make = make
        with mock.patch.dict(sys.modules, {"fake_dkim": module}), \
                mock.patch.dict(filters_pkg.BUILTIN, {"dkim": "fake_dkim"}):
            self.assertEqual(self.error(["dkim"]), "/etc/mailgate/mailgate.ini: [dkim] selector: required")

    def test_build_chain_for_a_listener(self):
        path = "tests.thirdparty_filter.SubjectTagger"
        context = self.context(sections=(FilterSection(path, (("tag", "[EXT]"),)),))
        chain = build_chain(listener(name="internet", filters=(path,)), context)
        self.assertIsInstance(chain, FilterChain)
        self.assertEqual([f.name for f in chain.filters], ["subject-tagger"])
        self.assertEqual(chain.hostname, HOSTNAME)
        self.assertEqual(chain.timeout, 30.0)


class ThirdPartyTests(ChainCase):
    def test_subject_tagger_in_a_chain(self):
        tagger = thirdparty_filter.SubjectTagger({"tag": "[EXT]", "header": "X-Tagged"})
        data = self.transaction(self.chain(tagger))[2]
        self.assertEqual(data.data, b"X-Tagged: tagged\r\nFrom: a@remote.example\r\n"
                                    b"Subject: [EXT] hello\r\n\r\nbody\r\n")
        self.session.end_transaction()
        self.session.relay_allowed = True
        data = self.transaction(self.chain(tagger))[2]
        self.assertIn(b"Subject: hello\r\n", data.data)


class ReadmeExampleTests(ChainCase):
    """The README's example filter works as printed, with the configuration printed next to it."""

    def section(self):
        readme = (Path(REPO) / "README.md").read_text(encoding="utf-8")
        return readme.split("\n## Filters\n", 1)[1].split("\n## ", 1)[0]

    def test_example_filter(self):
        section = self.section()
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        ini = re.search(r"```ini\n(.*?)```", section, re.S).group(1)
        module_name = re.search(r"^# (\w+)\.py:", code, re.M).group(1)
        filters_line = re.search(r"^filters = (.*)$", ini, re.M).group(1)
        path = [name.strip() for name in filters_line.split(",")][-1]
        self.assertEqual(path, module_name + ".SenderBlocklist")
        self.assertIn("[filter:%s]" % path, ini)

        blocklist = self.mktemp()
        Path(blocklist).write_text("# spammers\nbad@remote.example\n@spam.example  # all of it\n")
        module = types.ModuleType(module_name)
        exec(compile(code, "README.md", "exec"), module.__dict__)
        with mock.patch.dict(sys.modules, {module_name: module}):
            (f,) = load_filters([path], FilterContext(make_config(), self.clock, None, self.runner),
                                (FilterSection(path, (("file", blocklist),)),), "internet")
        chain = self.chain(f)
        self.assertEqual(self.result(chain.on_mail(self.session, Address("Bad", "remote.example"))),
                         Reply(450, "4.7.1", "Sender temporarily blocked"))
        self.assertEqual(self.result(chain.on_mail(self.session, Address("x", "spam.example"))).code, 450)
        self.assertIsNone(self.result(chain.on_mail(self.session, Address("a", "remote.example"))))
        self.assertIsNone(self.result(chain.on_mail(self.session, Address("", ""))))


# -- inside a real listener session -------------------------------------------------------------


MESSAGE = ("Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=bank.example\r\n"
           "Subject: hi\r\n\r\nhello\r\n.\r\n")


class ListenerTests(ChainCase):
    def smtp(self, chain):
        s = SMTPSession(listener(), hooks=chain)
        self.assertTrue(s.read().startswith("220 "))
        self.assertTrue(s.cmd("EHLO client.example").startswith("250-"))
        return s

    def test_reject_at_rcpt(self):
        def rcpt(session, recipient):
            if recipient.local == "nobody":
                return Verdict.reject(550, "5.1.1", "<nobody@example.com>: Recipient unknown")
            return Verdict.next()

        s = self.smtp(self.chain(self.filter("users", rcpt=rcpt)))
        self.assertEqual(s.cmd("MAIL FROM:<a@remote.example>"), "250 2.1.0 Ok\r\n")
        self.assertEqual(s.cmd("RCPT TO:<nobody@example.com>"),
                         "550 5.1.1 <nobody@example.com>: Recipient unknown\r\n")
        self.assertEqual(s.cmd("DATA"), "554 5.5.1 No valid recipients\r\n")
        self.assertEqual(s.cmd("RCPT TO:<u@example.com>"), "250 2.1.5 Ok\r\n")
        self.assertEqual(s.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>\r\n")
        s.send(MESSAGE)
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n")
        env, data = s.queue.messages["Q0001"]
        self.assertEqual(env.recipients, ("u@example.com",))
        self.assertEqual(env.verdicts, (("users", "next"),))  # the refused RCPT left no trace

    def test_tempfail_when_a_filter_crashes(self):
        s = self.smtp(self.chain(self.filter("broken", mail=lambda s, a: 1 / 0)))
        self.assertEqual(s.cmd("MAIL FROM:<a@remote.example>"),
                         "451 4.3.0 Temporary failure, please try again later\r\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(s.cmd("NOOP"), "250 2.0.0 Ok\r\n")

    def test_quarantine_at_end_of_data(self):
        def spf(session, sender):
            session.transaction.setdefault("auth_results", []).append(
                AuthResult("spf", "softfail", properties=[("smtp.mailfrom", sender.domain)]))
            return Verdict.next()

        chain = self.chain(self.filter("spf", mail=spf),
                           self.filter("attachments", data=Verdict.quarantine("macro in attachment")
                                       .with_headers([("X-Quarantined", "macro")])))
        s = self.smtp(chain)
        self.assertEqual(s.cmd("MAIL FROM:<a@remote.example>"), "250 2.1.0 Ok\r\n")
        self.assertEqual(s.cmd("RCPT TO:<u@example.com>"), "250 2.1.5 Ok\r\n")
        s.cmd("DATA")
        s.send(MESSAGE)
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n")
        self.assertEqual(s.queue.where["Q0001"], "quarantine")
        env, data = s.queue.messages["Q0001"]
        self.assertEqual(env.verdicts, (("spf", "next"), ("attachments", "quarantine")))
        received, rest = data.split(b"\r\nAuthentication-Results:", 1)
        self.assertTrue(received.startswith(b"Received: from client.example ([192.0.2.10])"))
        self.assertEqual(b"Authentication-Results:" + rest,
                         b"Authentication-Results: mx.example.net;\r\n"
                         b"\tspf=softfail smtp.mailfrom=remote.example\r\n"
                         b"X-Quarantined: macro\r\n"
                         b"Subject: hi\r\n\r\nhello\r\n")
        # The transaction was cleared: the next message starts afresh.
        self.assertEqual(s.cmd("MAIL FROM:<b@remote.example>"), "250 2.1.0 Ok\r\n")

    def test_reject_at_end_of_data(self):
        chain = self.chain(self.filter("av", data=Verdict.reject(554, "5.7.1", "Virus found")))
        s = self.smtp(chain)
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(MESSAGE)
        self.assertEqual(s.read(), "554 5.7.1 Virus found\r\n")
        self.assertEqual(s.queue.messages, {})
