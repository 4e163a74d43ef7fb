"""
The header firewall (mailgate.headerfirewall): Exchange's internal fields removed on the way in
(a listener's header_firewall, plus [gateway] strip_headers) and on the way out (a route's
strip_headers, before DKIM signing); the rest of the message kept byte for byte.
"""

from twisted.trial import unittest

from mailgate.config import GatewayConfig
from mailgate.headerfirewall import EXCHANGE_HEADERS, inbound_patterns, strip
from tests.smtphelp import Session, listener

MESSAGE = (
    b"From: a@remote.example\r\n"
    b"X-MS-Exchange-Organization-SCL: -1\r\n"
    b"X-MS-Exchange-Organization-AuthAs: Internal\r\n"
    b"Subject: hello\r\n"
    b"x-ms-exchange-organization-authsource: exch1.corp.example\r\n"
    b"X-MS-Exchange-Transport-CrossTenantHeadersStamped: folded\r\n"
    b"\tcontinued value\r\n"
    b" and more\r\n"
    b"X-MS-Exchange-Forest-RulesExecuted: EXCH1\r\n"
    b"X-MS-Exchange-Organizational-Unit-Lookalike: kept\r\n"
    b"X-Secret: s\r\n"
    b"\r\n"
    b"X-MS-Exchange-Organization-SCL: in the body, kept\r\n"
)


class StripTests(unittest.TestCase):
    def test_exchange_fields_and_their_continuations_go(self):
        data, removed = strip(MESSAGE, EXCHANGE_HEADERS)
        self.assertEqual(data, (
            b"From: a@remote.example\r\n"
            b"Subject: hello\r\n"
            b"X-MS-Exchange-Organizational-Unit-Lookalike: kept\r\n"
            b"X-Secret: s\r\n"
            b"\r\n"
            b"X-MS-Exchange-Organization-SCL: in the body, kept\r\n"))
        self.assertEqual(removed, {
            "x-ms-exchange-organization-scl": 1, "x-ms-exchange-organization-authas": 1,
            "x-ms-exchange-organization-authsource": 1,
            "x-ms-exchange-transport-crosstenantheadersstamped": 1,
            "x-ms-exchange-forest-rulesexecuted": 1})

    def test_exact_names_too(self):
        data, removed = strip(MESSAGE, ("x-secret",))
        self.assertNotIn(b"X-Secret", data)
        self.assertEqual(removed, {"x-secret": 1})
        self.assertEqual(len(data), len(MESSAGE) - len(b"X-Secret: s\r\n"))

    def test_nothing_to_do_returns_the_same_bytes(self):
        plain = b"From: a@b.example\r\n\r\nbody\r\n"
        self.assertIs(strip(plain, EXCHANGE_HEADERS)[0], plain)
        self.assertIs(strip(MESSAGE, ())[0], MESSAGE)
        self.assertEqual(strip(b"\r\nX-Secret: body only\r\n", ("x-secret",))[1], {})

    def test_a_message_that_is_all_header(self):
        data, removed = strip(b"X-Secret: a\r\nSubject: b\r\n", ("x-secret",))
        self.assertEqual((data, removed), (b"Subject: b\r\n", {"x-secret": 1}))

    def test_inbound_patterns(self):
        gateway = GatewayConfig(hostname="mx.example.net", strip_headers=("x-corp-*",))
        self.assertEqual(inbound_patterns(listener(header_firewall=True), gateway),
                         EXCHANGE_HEADERS + ("x-corp-*",))
        self.assertEqual(inbound_patterns(listener(header_firewall=False), gateway), ())


class InboundTests(unittest.TestCase):
    def send(self, firewall):
        s = Session(listener(header_firewall=firewall))
        s.read()
        s.cmd("EHLO client.example")
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(MESSAGE + b".\r\n")
        self.assertTrue(s.read().startswith("250 2.0.0 Ok: queued"))
        [(_, data)] = s.queue.messages.values()
        return data

    def test_a_firewalled_listener_queues_the_message_without_them(self):
        data = self.send(True)
        self.assertTrue(data.startswith(b"Received: "))
        self.assertNotIn(b"X-MS-Exchange-Organization-SCL: -1", data)
        self.assertNotIn(b"continued value", data)
        self.assertIn(b"X-MS-Exchange-Organization-SCL: in the body, kept", data)
        self.assertIn(b"X-Secret: s", data)

    def test_without_the_firewall_everything_stays(self):
        self.assertIn(b"X-MS-Exchange-Organization-SCL: -1", self.send(False))
