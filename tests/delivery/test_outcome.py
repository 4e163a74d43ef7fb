"""
The reply-to-outcome mapping (mailgate.delivery.outcome) on its own: how a reply's code and text
become (code, status, text).  How replies decide each recipient's outcome over real sockets is
tested in test_client.py.
"""

from twisted.trial.unittest import SynchronousTestCase

from mailgate.delivery.outcome import parse_reply


class ReplyParsingTests(SynchronousTestCase):
    def test_status_split(self):
        r = parse_reply(550, b"5.1.1 No such user")
        self.assertEqual((r.code, r.status, r.text), (550, "5.1.1", "No such user"))

    def test_status_derived(self):
        self.assertEqual(parse_reply(250, b"Ok").status, "2.0.0")
        self.assertEqual(parse_reply(451, b"later").status, "4.0.0")
        self.assertEqual(parse_reply(554, b"no").status, "5.0.0")

    def test_status_class_must_match(self):
        r = parse_reply(550, b"4.1.1 odd")
        self.assertEqual((r.status, r.text), ("5.0.0", "4.1.1 odd"))

    def test_multiline(self):
        r = parse_reply(550, b"5.7.1 first line\n5.7.1 second line")
        self.assertEqual((r.status, r.text), ("5.7.1", "first line\nsecond line"))

    def test_status_only(self):
        r = parse_reply(250, b"2.0.0")
        self.assertEqual((r.status, r.text), ("2.0.0", ""))
