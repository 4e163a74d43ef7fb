"""
Recipient validation at RCPT (mailgate.smtp.recipients), driven in memory with a validator the
test answers: the order of the checks, the replies, and that nothing unknown is ever queued.
"""

from twisted.internet import defer
from twisted.trial import unittest

from mailgate.envelope import Reply
from mailgate.smtp.recipients import check
from tests.smtphelp import Session, listener

UNKNOWN = Reply(550, "5.1.1", "<x>: Recipient address rejected: User unknown")


class Validator:
    """known: addresses answered None; pending: when set, answers wait for the test."""

    def __init__(self, known=("alice@example.com",), fail=False, wait=False):
        self.known, self.fail, self.wait = set(known), fail, wait
        self.asked, self.waiting = [], []

    def check(self, address):
        self.asked.append(str(address))
        if self.fail:
            return defer.fail(RuntimeError("directory down"))
        answer = None if str(address).lower() in self.known else Reply(
            550, "5.1.1", "<%s>: Recipient address rejected: User unknown" % (address,))
        if self.wait:
            d = defer.Deferred()
            self.waiting.append((d, answer))
            return d
        return defer.succeed(answer)


class Hooks:
    def __init__(self):
        self.rcpts = []

    def on_rcpt(self, session, recipient):
        self.rcpts.append(str(recipient))
        return None


def session(validator, recipients="ldap", **kw):
    return Session(listener(recipients=recipients, **kw), recipients=validator)


def start(s):
    s.cmd("EHLO client.example")
    assert s.cmd("MAIL FROM:<a@remote.example>").startswith("250 ")


class RecipientValidationTests(unittest.TestCase):
    def test_known_and_unknown(self):
        v = Validator()
        s = session(v)
        start(s)
        self.assertEqual(s.cmd("RCPT TO:<alice@example.com>"), "250 2.1.5 Ok\r\n")
        self.assertEqual(s.cmd("RCPT TO:<nobody@example.com>"),
                         "550 5.1.1 <nobody@example.com>: Recipient address rejected: "
                         "User unknown\r\n")
        self.assertEqual(s.cmd("DATA"), "354 End data with <CR><LF>.<CR><LF>\r\n")
        s.cmd("Subject: x\r\n\r\nbody\r\n.")
        [(envelope, _)] = s.queue.messages.values()
        self.assertEqual(envelope.recipients, ("alice@example.com",))

    def test_directory_down_is_451_never_5xx_never_250(self):
        s = session(Validator(fail=True))
        start(s)
        self.assertEqual(s.cmd("RCPT TO:<alice@example.com>"),
                         "451 4.4.3 <alice@example.com>: Recipient address rejected: Directory "
                         "temporarily unavailable, try again later\r\n")
        self.assertTrue(s.cmd("DATA").startswith("554 5.5.1"))  # nobody accepted
        self.flushLoggedErrors()

    def test_only_accepted_domains_are_asked_and_relay_refusal_comes_first(self):
        v = Validator()
        s = session(v)
        start(s)
        self.assertTrue(s.cmd("RCPT TO:<x@elsewhere.example>").startswith("554 5.7.1"))
        self.assertTrue(s.cmd("RCPT TO:<Postmaster>").startswith("250 "))
        self.assertTrue(s.cmd("RCPT TO:<postmaster@example.com>").startswith("250 "))
        self.assertEqual(v.asked, [])

    def test_relay_clients_are_validated_for_accepted_domains_only(self):
        v = Validator()
        s = Session(listener(recipients="ldap", relay_ips=("192.0.2.0/24",)), recipients=v)
        start(s)
        self.assertTrue(s.cmd("RCPT TO:<x@elsewhere.example>").startswith("250 "))
        self.assertTrue(s.cmd("RCPT TO:<nobody@example.org>").startswith("550 5.1.1"))
        self.assertEqual(v.asked, ["nobody@example.org"])

    def test_recipients_any_asks_nobody(self):
        v = Validator()
        s = session(v, recipients="any")
        start(s)
        self.assertTrue(s.cmd("RCPT TO:<nobody@example.com>").startswith("250 "))
        self.assertEqual(v.asked, [])

    def test_validation_comes_before_the_filters(self):
        hooks = Hooks()
        s = Session(listener(recipients="ldap"), recipients=Validator(), hooks=hooks)
        start(s)
        s.cmd("RCPT TO:<nobody@example.com>")
        s.cmd("RCPT TO:<alice@example.com>")
        self.assertEqual(hooks.rcpts, ["alice@example.com"])

    def test_pipelined_commands_wait_for_the_answer_in_order(self):
        v = Validator(wait=True)
        s = session(v)
        start(s)
        s.send("RCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        self.assertEqual(s.read(), "")
        d, answer = v.waiting.pop(0)
        d.callback(answer)
        self.assertEqual(s.read(), "250 2.1.5 Ok\r\n")
        d, answer = v.waiting.pop(0)
        d.callback(answer)
        self.assertEqual(s.read(), "550 5.1.1 <bob@example.com>: Recipient address rejected: "
                                   "User unknown\r\n354 End data with <CR><LF>.<CR><LF>\r\n")

    def test_check_without_a_validator(self):
        s = session(None)
        out = []
        from mailgate.envelope import Address

        check(s.factory, Address("x", "example.com")).addCallback(out.append)
        self.assertEqual(out, [None])
