"""
The DSN options a client gave (RFC 3461), honoured by our own notices: NOTIFY chooses who gets
a bounce, a delay notice or a "relayed" notice; RET chooses what comes back; ENVID and ORCPT come
back in the report; a DSN-capable next hop takes the notifications over.
"""

import email
import email.policy

from mailgate.delivery.bounce import MAX_RETURN, make_dsn
from mailgate.envelope import Envelope, Hop, RecipientResult
from twisted.trial import unittest

from tests.delivery.test_scheduler import BODY, SchedulerCase

HOP = Hop("mx1.example.org", "192.0.2.25", 25)
ORIGINAL = b"From: a@sender.example\r\nSubject: hi\r\n\r\nthe body\r\n"


def failure(rcpt="bob@example.org"):
    return RecipientResult(rcpt, "bounced", 550, "5.1.1", "user unknown", HOP), 1700000000.0


def parts(dsn):
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    return list(message.iter_parts())


class BounceContentTests(unittest.TestCase):
    def dsn(self, **envelope):
        e = Envelope("Q1", "a@sender.example", ("bob@example.org",), "192.0.2.1",
                     received_at=1700000000.0, **envelope)
        return make_dsn("mx.example.com", e, ORIGINAL, [failure()], 1700000100.0)

    def test_envid_and_orcpt_come_back(self):
        dsn = self.dsn(envid="QQ314159", dsn=(("bob@example.org", None, "rfc822;Bob@Old.example"),))
        status = parts(dsn)[1].as_bytes().decode()
        self.assertIn("Original-Envelope-Id: QQ314159", status)
        self.assertIn("Original-Recipient: rfc822; Bob@Old.example\r\nFinal-Recipient: rfc822; "
                      "bob@example.org", status.replace("\n", "\r\n").replace("\r\r", "\r"))

    def test_ret_hdrs_and_no_ret_return_headers_only(self):
        for ret in ("HDRS", None):
            returned = parts(self.dsn(ret=ret))[2]
            self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
            self.assertNotIn(b"the body", returned.as_bytes())

    def test_ret_full_returns_the_message(self):
        dsn = self.dsn(ret="FULL")
        returned = parts(dsn)[2]
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        self.assertIn(b"the body", dsn)
        self.assertIn(b"Your message is attached.", dsn)

    def test_ret_full_of_a_big_or_8bit_message_returns_its_headers(self):
        e = Envelope("Q1", "a@sender.example", ("bob@example.org",), "192.0.2.1", ret="FULL")
        big = ORIGINAL + (b"x" * 70 + b"\r\n") * (MAX_RETURN // 72 + 1)
        for data in (big, ORIGINAL + b"caf\xc3\xa9\r\n"):
            dsn = make_dsn("mx.example.com", e, data, [failure()], 1700000100.0)
            self.assertEqual(parts(dsn)[2].get_content_type(), "text/rfc822-headers")
            self.assertTrue(dsn.isascii())


class NotifyTests(SchedulerCase):
    def queue_dsn(self, dsn, rcpts=("u@remote.example",), **fields):
        envelope = Envelope(queue_id="Q1", sender="a@sender.example", recipients=rcpts,
                            client_ip="192.0.2.1", received_at=self.clock.seconds(), dsn=dsn,
                            **fields)
        self.successResultOf(self.spool.enqueue(envelope, BODY))

    def notices(self):
        return [c[3].decode() for c in self.deliverer.calls if c[1] == ""]

    def test_notify_never_and_success_only_get_no_bounce(self):
        self.start()
        rcpts = ("n@remote.example", "s@remote.example", "f@remote.example", "d@remote.example")
        for r in rcpts:
            self.deliverer.replies[r] = (550, "5.1.1")
        self.queue_dsn(((rcpts[0], ("NEVER",), None), (rcpts[1], ("SUCCESS",), None),
                        (rcpts[2], ("FAILURE",), None)), rcpts=rcpts)
        [notice] = self.notices()
        self.assertIn("Final-Recipient: rfc822; f@remote.example", notice)
        self.assertIn("Final-Recipient: rfc822; d@remote.example", notice)  # no NOTIFY: default
        self.assertNotIn("n@remote.example", notice)
        self.assertNotIn("Final-Recipient: rfc822; s@remote.example", notice)
        self.assertEqual(self.entries(), {})

    def test_notify_never_for_all_makes_no_bounce_at_all(self):
        self.start()
        self.deliverer.replies["u@remote.example"] = (550, "5.1.1")
        self.queue_dsn((("u@remote.example", ("NEVER",), None),))
        self.assertEqual(self.notices(), [])
        self.assertEqual(self.entries(), {})

    def test_delay_notice_only_for_delay(self):
        self.service = self.make_service(delay_warning=300.0)
        self.start()
        rcpts = ("f@remote.example", "d@remote.example")
        for r in rcpts:
            self.deliverer.replies[r] = (451, "4.3.0")
        self.queue_dsn(((rcpts[0], ("FAILURE",), None), (rcpts[1], ("DELAY",), None)),
                       rcpts=rcpts)
        for _ in range(3):
            self.clock.advance(300)
        [notice] = self.notices()
        self.assertIn("Action: delayed", notice)
        self.assertIn("d@remote.example", notice)
        self.assertNotIn("f@remote.example", notice)

    def test_success_to_a_hop_without_dsn_is_reported_relayed(self):
        self.start()
        self.queue_dsn((("u@remote.example", ("SUCCESS",), "rfc822;u@remote.example"),),
                       envid="E1")
        [notice] = self.notices()
        self.assertIn("Action: relayed", notice)
        self.assertIn("Original-Envelope-Id: E1", notice)
        self.assertIn("Successful Mail Delivery Report", notice)
        self.assertEqual(self.entries(), {})

    def test_success_to_a_dsn_hop_is_the_hops_business(self):
        self.deliverer.dsn = True
        self.start()
        self.queue_dsn((("u@remote.example", ("SUCCESS", "FAILURE"), None),), ret="HDRS",
                       envid="E1")
        self.assertEqual(self.notices(), [])
        [transfer] = self.deliverer.transfers
        self.assertEqual((transfer.ret, transfer.envid, transfer.notify),
                         ("HDRS", "E1", {"u@remote.example": ("SUCCESS", "FAILURE")}))

    def test_no_notify_and_delivered_says_nothing(self):
        self.start()
        self.queue()
        self.assertEqual(self.notices(), [])
