"""
The listener's SMTP dialogue, driven in memory with exact replies.

Each row S1-S15 of ../shared/twisted-mail-notes.md has a test named after it that sends the raw
bytes from the note and checks the exact reply and what was (not) stored.
"""

import base64
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailgate.config import Limits
from mailgate.envelope import Reply

from tests import REPO
from tests.smtphelp import Session, listener

MESSAGE = "Subject: hi\r\n\r\nhello\r\n.\r\n"


def relay_session(**kw):
    return Session(listener(**kw))


def submission(**kw):
    values = dict(role="submission", tls="required", auth="required")
    values.update(kw)
    return Session(listener(**values))


def send_message(s, sender="a@remote.example", rcpts=("u@example.com",), body=MESSAGE):
    assert s.cmd("MAIL FROM:<%s>" % sender).startswith("250 2.1.0"), sender
    for rcpt in rcpts:
        assert s.cmd("RCPT TO:<%s>" % rcpt).startswith("250 2.1.5"), rcpt
    assert s.cmd("DATA").startswith("354 ")
    s.send(body)
    return s.read()


class GreetingTests(unittest.TestCase):
    def test_banner_uses_configured_hostname(self):
        s = relay_session()
        self.assertEqual(s.read(), "220 mx.example.net ESMTP\r\n")

    def test_client_outside_allowed_ips_gets_554_and_close(self):
        s = Session(listener(allowed_ips=["10.0.0.0/8"]), peer="192.0.2.10")
        self.assertEqual(s.read(), "554 5.7.1 mx.example.net Access denied\r\n")
        self.assertTrue(s.closed)

    def test_client_inside_allowed_ips(self):
        s = Session(listener(allowed_ips=["192.0.2.0/24"]))
        self.assertTrue(s.read().startswith("220 "))
        self.assertFalse(s.closed)

    def test_ehlo_before_tls_advertises_starttls_not_auth(self):
        s = relay_session()
        s.read()
        self.assertEqual(
            s.cmd("EHLO client.example"),
            "250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n"
            "250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-SMTPUTF8\r\n250-DSN\r\n"
            "250 STARTTLS\r\n")

    def test_ehlo_after_tls_advertises_auth_not_starttls(self):
        s = relay_session()
        s.read()
        s.cmd("EHLO client.example")
        reply = s.start_tls()
        self.assertIn("250 AUTH PLAIN LOGIN\r\n", reply)
        self.assertNotIn("STARTTLS", reply)

    def test_no_auth_advertised_when_auth_none(self):
        s = relay_session(auth="none")
        s.read()
        s.cmd("EHLO c.example")
        self.assertNotIn("AUTH", s.start_tls())

    def test_no_starttls_when_tls_none(self):
        s = relay_session(tls="none", auth="none")
        s.read()
        self.assertNotIn("STARTTLS", s.cmd("EHLO c.example"))

    def test_implicit_tls_advertises_auth_from_the_start(self):
        s = Session(listener(role="submission", tls="implicit", auth="required"))
        s.read()
        reply = s.cmd("EHLO c.example")
        self.assertIn("AUTH PLAIN LOGIN", reply)
        self.assertNotIn("STARTTLS", reply)

    def test_helo(self):
        s = relay_session()
        s.read()
        self.assertEqual(s.cmd("HELO c.example"), "250 mx.example.net\r\n")


class SequenceTests(unittest.TestCase):
    def setUp(self):
        self.s = relay_session()
        self.s.read()

    def test_mail_before_helo(self):
        self.assertEqual(self.s.cmd("MAIL FROM:<a@b.example>"), "503 5.5.1 Send EHLO/HELO first\r\n")

    def test_rcpt_before_mail(self):
        self.s.cmd("EHLO c.example")
        self.assertEqual(self.s.cmd("RCPT TO:<u@example.com>"), "503 5.5.1 Need MAIL command\r\n")

    def test_data_before_mail_and_without_recipients(self):
        self.s.cmd("EHLO c.example")
        self.assertEqual(self.s.cmd("DATA"), "503 5.5.1 Need MAIL command\r\n")
        self.s.cmd("MAIL FROM:<a@b.example>")
        self.assertEqual(self.s.cmd("DATA"), "554 5.5.1 No valid recipients\r\n")

    def test_nested_mail(self):
        self.s.cmd("EHLO c.example")
        self.s.cmd("MAIL FROM:<a@b.example>")
        self.assertEqual(self.s.cmd("MAIL FROM:<a@b.example>"), "503 5.5.1 Nested MAIL command\r\n")

    def test_unknown_commands(self):
        for line in ("FOO", "UNKNOWN x", "LOOKUPMETHOD", "", "MAIL-FROM", "BDATA 1"):
            self.assertEqual(self.s.cmd(line), "500 5.5.2 Command not recognized\r\n", line)

    def test_vrfy_expn_rset_noop_help_quit(self):
        self.assertEqual(self.s.cmd("VRFY root"),
                         "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n")
        self.assertEqual(self.s.cmd("EXPN staff"), "502 5.5.1 EXPN not available\r\n")
        self.assertEqual(self.s.cmd("NOOP"), "250 2.0.0 Ok\r\n")
        self.s.cmd("EHLO c.example")
        self.s.cmd("MAIL FROM:<a@b.example>")
        self.assertEqual(self.s.cmd("RSET"), "250 2.0.0 Ok\r\n")
        self.assertTrue(self.s.cmd("MAIL FROM:<a@b.example>").startswith("250 2.1.0"))
        self.assertTrue(self.s.cmd("HELP").startswith("214 2.0.0"))
        self.assertEqual(self.s.cmd("QUIT"), "221 2.0.0 Bye\r\n")
        self.assertTrue(self.s.closed)

    def test_lower_case_commands(self):
        self.assertTrue(self.s.cmd("ehlo c.example").startswith("250-"))
        self.assertTrue(self.s.cmd("mail from:<a@b.example>").startswith("250 2.1.0"))


class TLSPolicyTests(unittest.TestCase):
    def test_tls_required_blocks_mail_rcpt_data_auth(self):
        s = Session(listener(tls="required", auth="optional"))
        s.read()
        s.cmd("EHLO c.example")
        for line in ("MAIL FROM:<a@b.example>", "RCPT TO:<u@example.com>", "DATA", "AUTH PLAIN AGFAYg=="):
            self.assertEqual(s.cmd(line), "530 5.7.0 Must issue a STARTTLS command first\r\n", line)

    def test_starttls_when_not_offered(self):
        s = relay_session(tls="none", auth="none")
        s.read()
        s.cmd("EHLO c.example")
        self.assertEqual(s.cmd("STARTTLS"), "502 5.5.1 STARTTLS not available\r\n")

    def test_starttls_twice(self):
        s = relay_session()
        s.read()
        s.cmd("EHLO c.example")
        s.start_tls()
        self.assertEqual(s.cmd("STARTTLS"), "503 5.5.1 TLS already active\r\n")

    def test_starttls_with_argument(self):
        s = relay_session()
        s.read()
        self.assertEqual(s.cmd("STARTTLS now"), "501 5.5.4 Syntax: STARTTLS\r\n")


class AuthTests(unittest.TestCase):
    def tls_session(self, **kw):
        s = submission(**kw)
        s.read()
        s.cmd("EHLO c.example")
        s.start_tls()
        return s

    def test_auth_required_blocks_mail(self):
        s = self.tls_session()
        self.assertEqual(s.cmd("MAIL FROM:<alice@example.com>"), "530 5.7.0 Authentication required\r\n")

    def test_auth_without_tls_on_optional_listener(self):
        s = relay_session()
        s.read()
        s.cmd("EHLO c.example")
        self.assertEqual(s.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
                         "538 5.7.11 Encryption required for requested authentication mechanism\r\n")

    def test_plain_initial_response(self):
        s = self.tls_session()
        self.assertEqual(s.login(), "235 2.7.0 Authentication successful\r\n")
        self.assertTrue(s.cmd("MAIL FROM:<alice@example.com>").startswith("250 2.1.0"))

    def test_plain_with_challenge(self):
        s = self.tls_session()
        self.assertEqual(s.cmd("AUTH PLAIN"), "334 \r\n")
        token = base64.b64encode(b"\0alice@example.com\0secret").decode()
        self.assertEqual(s.cmd(token), "235 2.7.0 Authentication successful\r\n")

    def test_login(self):
        s = self.tls_session()
        self.assertEqual(s.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6\r\n")
        self.assertEqual(s.cmd(base64.b64encode(b"alice@example.com").decode()), "334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.cmd(base64.b64encode(b"secret").decode()),
                         "235 2.7.0 Authentication successful\r\n")

    def test_login_with_initial_username(self):
        s = self.tls_session()
        self.assertEqual(s.cmd("AUTH LOGIN " + base64.b64encode(b"alice@example.com").decode()),
                         "334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.cmd(base64.b64encode(b"secret").decode()),
                         "235 2.7.0 Authentication successful\r\n")

    def test_wrong_password(self):
        s = self.tls_session()
        self.assertEqual(s.login(password="wrong"), "535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(s.cmd("MAIL FROM:<alice@example.com>"), "530 5.7.0 Authentication required\r\n")

    def test_authzid_must_match(self):
        s = self.tls_session()
        token = base64.b64encode(b"bob@example.com\0alice@example.com\0secret").decode()
        self.assertEqual(s.cmd("AUTH PLAIN " + token), "535 5.7.8 Authentication credentials invalid\r\n")

    def test_cancel_and_garbage(self):
        s = self.tls_session()
        s.cmd("AUTH LOGIN")
        self.assertEqual(s.cmd("*"), "501 5.7.0 Authentication cancelled\r\n")
        s.cmd("AUTH LOGIN")
        self.assertEqual(s.cmd("!!!notbase64"), "501 5.5.2 Cannot decode response\r\n")
        self.assertEqual(s.cmd("AUTH PLAIN %%%"), "501 5.5.2 Cannot decode response\r\n")

    def test_unknown_mechanism(self):
        s = self.tls_session()
        self.assertEqual(s.cmd("AUTH CRAM-MD5"), "504 5.5.4 Unrecognized authentication type\r\n")

    def test_already_authenticated(self):
        s = self.tls_session()
        s.login()
        self.assertEqual(s.login(), "503 5.5.1 Already authenticated\r\n")

    def test_auth_not_enabled(self):
        s = relay_session(auth="none")
        s.read()
        s.cmd("EHLO c.example")
        s.start_tls()
        self.assertEqual(s.login(), "503 5.5.1 Authentication not enabled\r\n")

    def test_too_many_failures_closes_with_421(self):
        s = self.tls_session()
        self.assertTrue(s.login(password="x").startswith("535 5.7.8"))
        self.assertTrue(s.login(password="x").startswith("535 5.7.8"))
        self.assertEqual(s.login(password="x"),
                         "535 5.7.8 Authentication credentials invalid\r\n"
                         "421 4.7.0 mx.example.net Error: too many authentication failures\r\n")
        self.assertTrue(s.closed)

    def test_backend_failure_is_temporary(self):
        s = self.tls_session()
        s.auth.broken = True
        self.assertEqual(s.login(), "454 4.7.0 Temporary authentication failure\r\n")
        self.flushLoggedErrors(RuntimeError)

    def test_sender_not_owned(self):
        s = self.tls_session()
        s.login()
        self.assertEqual(s.cmd("MAIL FROM:<bob@example.com>"),
                         "553 5.7.1 Sender address rejected: <bob@example.com> not owned by user alice@example.com\r\n")
        self.assertTrue(s.cmd("MAIL FROM:<alice@example.com>").startswith("250 2.1.0"))

    def test_submission_accepts_any_recipient_domain(self):
        s = self.tls_session()
        s.login()
        reply = send_message(s, "alice@example.com", ("x@elsewhere.example", "y@example.com"))
        self.assertTrue(reply.startswith("250 2.0.0 Ok: queued as Q0001"), reply)
        envelope, data = s.queue.messages["Q0001"]
        self.assertEqual(envelope.user, "alice@example.com")
        self.assertEqual(envelope.protocol, "ESMTPSA")
        self.assertIn(b"with ESMTPSA id Q0001", data)


class RelayTests(unittest.TestCase):
    def setUp(self):
        self.s = relay_session()
        self.s.read()
        self.s.cmd("EHLO c.example")
        self.s.cmd("MAIL FROM:<a@remote.example>")

    def test_accepted_domain(self):
        self.assertEqual(self.s.cmd("RCPT TO:<u@Example.COM>"), "250 2.1.5 Ok\r\n")

    def test_other_domain_denied(self):
        self.assertEqual(self.s.cmd("RCPT TO:<u@elsewhere.example>"),
                         "554 5.7.1 <u@elsewhere.example>: Relay access denied\r\n")

    def test_routing_tricks_never_relay(self):
        for rcpt in ("u%elsewhere.example@example.com", "elsewhere.example!u@example.com",
                     '"u@elsewhere.example"@example.com', "@example.com:u@elsewhere.example",
                     "u@[192.0.2.1]", "u@sub.example.com"):
            self.assertTrue(self.s.cmd("RCPT TO:<%s>" % rcpt).startswith("554 5.7.1 "), rcpt)

    def test_relay_ips_may_relay(self):
        s = Session(listener(relay_ips=["192.0.2.0/24"]))
        s.read()
        s.cmd("EHLO c.example")
        s.cmd("MAIL FROM:<a@example.com>")
        self.assertEqual(s.cmd("RCPT TO:<u@elsewhere.example>"), "250 2.1.5 Ok\r\n")

    def test_authenticated_may_relay(self):
        s = relay_session()
        s.read()
        s.cmd("EHLO c.example")
        s.start_tls()
        s.login()
        s.cmd("MAIL FROM:<alice@example.com>")
        self.assertEqual(s.cmd("RCPT TO:<u@elsewhere.example>"), "250 2.1.5 Ok\r\n")

    def test_postmaster_without_domain(self):
        self.assertEqual(self.s.cmd("RCPT TO:<Postmaster>"), "250 2.1.5 Ok\r\n")
        self.s.cmd("DATA")
        self.s.send(MESSAGE)
        envelope, _ = self.s.queue.messages["Q0001"]
        self.assertEqual(envelope.recipients, ("postmaster@example.com",))

    def test_too_many_recipients(self):
        for i in range(5):
            self.assertEqual(self.s.cmd("RCPT TO:<u%d@example.com>" % i), "250 2.1.5 Ok\r\n")
        self.assertEqual(self.s.cmd("RCPT TO:<u9@example.com>"), "452 4.5.3 Too many recipients\r\n")

    def test_size_parameter_over_limit(self):
        self.s.cmd("RSET")
        self.assertEqual(self.s.cmd("MAIL FROM:<a@remote.example> SIZE=10001"),
                         "552 5.3.4 Message size exceeds fixed limit\r\n")
        self.assertTrue(self.s.cmd("MAIL FROM:<a@remote.example> SIZE=9000").startswith("250 2.1.0"))

    def test_size_exceeded_while_receiving(self):
        self.s.cmd("RCPT TO:<u@example.com>")
        self.s.cmd("DATA")
        self.s.send(("x" * 70 + "\r\n") * 200 + ".\r\n")
        self.assertEqual(self.s.read(), "552 5.3.4 Message size exceeds fixed limit\r\n")
        self.assertEqual(self.s.queue.messages, {})

    def test_bad_addresses(self):
        self.assertEqual(self.s.cmd("RCPT TO:u@example.com"), "501 5.5.4 Syntax: RCPT TO:<address>\r\n")
        self.assertEqual(self.s.cmd("RCPT TO:<u@@example.com>"), "501 5.1.3 Bad recipient address syntax\r\n")


class AcceptTests(unittest.TestCase):
    def test_queued_with_received_header(self):
        s = relay_session()
        s.read()
        s.cmd("EHLO client.example")
        reply = send_message(s, rcpts=("u@example.com",))
        self.assertEqual(reply, "250 2.0.0 Ok: queued as Q0001\r\n")
        envelope, data = s.queue.messages["Q0001"]
        self.assertEqual(envelope.sender, "a@remote.example")
        self.assertEqual(envelope.recipients, ("u@example.com",))
        self.assertEqual(envelope.client_ip, "192.0.2.10")
        self.assertEqual(envelope.helo, "client.example")
        self.assertEqual(envelope.listener, "test")
        self.assertEqual(envelope.protocol, "ESMTP")
        self.assertEqual(envelope.size, len(data))
        first, second, third, rest = data.split(b"\r\n", 3)
        self.assertEqual(first, b"Received: from client.example ([192.0.2.10])")
        self.assertEqual(second, b"\tby mx.example.net (mailgate) with ESMTP id Q0001")
        self.assertTrue(third.startswith(b"\tfor <u@example.com>; "), third)
        self.assertEqual(rest, b"Subject: hi\r\n\r\nhello\r\n")

    def test_two_messages_in_one_session_and_dot_unstuffing(self):
        s = relay_session()
        s.read()
        s.cmd("EHLO c.example")
        send_message(s, body="a\r\n..b\r\n.\r\n")
        self.assertTrue(send_message(s, body="x\r\n.\r\n").startswith("250 2.0.0 Ok: queued as Q0002"))
        self.assertTrue(s.queue.messages["Q0001"][1].endswith(b"a\r\n.b\r\n"))

    def test_s13_body_written_once_for_many_recipients(self):
        s = relay_session()
        s.read()
        s.cmd("EHLO c.example")
        send_message(s, rcpts=("a@example.com", "b@example.com", "c@example.org"))
        self.assertEqual(s.queue.calls, 1)
        envelope, data = s.queue.messages["Q0001"]
        self.assertEqual(envelope.recipients, ("a@example.com", "b@example.com", "c@example.org"))
        self.assertNotIn(b"for <", data)


class SmugglingAndSafetyTests(unittest.TestCase):
    """The rows of ../shared/twisted-mail-notes.md, server side."""

    def ready(self, **kw):
        s = relay_session(**kw)
        s.read()
        s.cmd("EHLO c.example")
        return s

    def test_s1_bare_lf_in_data_is_rejected_after_the_real_end(self):
        s = self.ready()
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(b"body\n.\nMAIL FROM:<x@evil.example>\nRCPT TO:<v@example.com>\nDATA\nevil\n.\n"
               b"more\r\n.\r\n")
        self.assertEqual(s.read(), "550 5.6.0 Message contains bare CR or LF characters\r\n")
        self.assertEqual(s.queue.messages, {})

    def test_s1_bare_cr_in_data(self):
        s = self.ready()
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(b"body\r.\rMAIL FROM:<x@evil.example>\r\n.\r\n")
        self.assertEqual(s.read(), "550 5.6.0 Message contains bare CR or LF characters\r\n")
        self.assertEqual(s.queue.messages, {})

    def test_s1_only_crlf_dot_crlf_ends_data(self):
        s = self.ready()
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(b"a\r\n.\n")
        self.assertEqual(s.read(), "")
        s.send(b"\r\n.\r\n")
        self.assertEqual(s.read(), "550 5.6.0 Message contains bare CR or LF characters\r\n")

    def test_s2_starttls_injection_is_discarded(self):
        s = self.ready()
        s.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<x@evil.example>\r\n")
        self.assertEqual(s.read(), "220 2.0.0 Ready to start TLS\r\n")
        self.assertIsNotNone(s.transport.tls_started)
        self.assertEqual(s.cmd("MAIL FROM:<x@evil.example>"), "503 5.5.1 Send EHLO/HELO first\r\n")

    def test_s3_state_reset_by_starttls(self):
        s = self.ready()
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("STARTTLS")
        self.assertEqual(s.cmd("RCPT TO:<u@example.com>"), "503 5.5.1 Need MAIL command\r\n")
        self.assertEqual(s.cmd("MAIL FROM:<a@remote.example>"), "503 5.5.1 Send EHLO/HELO first\r\n")
        s.cmd("EHLO c.example")
        self.assertTrue(s.cmd("MAIL FROM:<a@remote.example>").startswith("250 2.1.0"))

    def test_s4_command_line_over_512_octets(self):
        s = self.ready()
        line = "MAIL FROM:<%s@remote.example>" % ("a" * 490)
        self.assertEqual(len(line) + 2, 519)
        self.assertEqual(s.cmd(line), "500 5.5.2 Line too long\r\n")
        self.assertFalse(s.closed)

    def test_s4_text_line_over_1000_octets_rejects_message(self):
        s = self.ready()
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(b"Subject: x\r\n\r\n" + b"y" * 999 + b"\r\n.\r\n")
        self.assertEqual(s.read(), "554 5.6.0 Message contains a line longer than 998 characters\r\n")
        self.assertEqual(s.queue.messages, {})

    def test_s4_998_octet_line_is_fine(self):
        s = self.ready()
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n.\r\n")
        self.assertTrue(s.read().startswith("250 2.0.0"))

    def test_s5_long_line_does_not_leave_data(self):
        s = self.ready(max_message_size=100000)
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(b"x" * 20000 + b"\r\nRSET\r\nMAIL FROM:<x@evil.example>\r\n")
        self.assertEqual(s.read(), "")  # still in DATA: nothing was run as a command
        s.send(b".\r\n")
        self.assertEqual(s.read(), "554 5.6.0 Message contains a line longer than 998 characters\r\n")

    def test_s6_unbounded_line_closes(self):
        s = self.ready()
        s.send(b"A" * 10000)
        self.assertEqual(s.read(), "")
        s.send(b"A" * 10000)
        self.assertEqual(s.read(), "500 5.5.2 Line too long\r\n")
        self.assertTrue(s.closed)
        s.send(b"A" * 100000)  # nothing more is buffered or answered
        self.assertEqual(s.proto._buffer, b"")

    def test_s7_pipelined_commands_answered_in_order_with_async_checks(self):
        hooks = SlowHooks()
        s = Session(listener(), hooks=hooks)
        s.read()
        s.cmd("EHLO c.example")
        s.send(b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<u@example.com>\r\nRCPT TO:<v@elsewhere.example>\r\n"
               b"RCPT TO:<w@example.com>\r\nDATA\r\n")
        self.assertEqual(s.read(), "")
        hooks.fire_all_in_reverse()
        self.assertEqual(s.read(), "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                         "554 5.7.1 <v@elsewhere.example>: Relay access denied\r\n"
                         "250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        s.send(MESSAGE + "QUIT\r\n")
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n221 2.0.0 Bye\r\n")

    def test_s7_input_paused_while_a_check_is_pending(self):
        hooks = SlowHooks()
        s = Session(listener(), hooks=hooks)
        s.read()
        s.cmd("EHLO c.example")
        s.send(b"MAIL FROM:<a@remote.example>\r\n" + b"NOOP\r\n" * 20000)
        self.assertEqual(s.transport.producerState, "paused")
        hooks.fire_all_in_reverse()
        self.assertEqual(s.transport.producerState, "producing")
        self.assertEqual(s.read(), "250 2.1.0 Ok\r\n" + "250 2.0.0 Ok\r\n" * 20000)

    def test_s7_slow_queue_holds_the_next_command(self):
        s = self.ready()
        s.queue.hold = True
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.send(MESSAGE + "MAIL FROM:<b@remote.example>\r\n")
        self.assertEqual(s.read(), "")
        s.queue.release()
        self.assertEqual(s.read(), "250 2.0.0 Ok: queued as Q0001\r\n250 2.1.0 Ok\r\n")

    def test_s8_auth_before_tls(self):
        s = self.ready()
        self.assertTrue(s.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").startswith("538 5.7.11"))
        s = Session(listener(role="submission", tls="required", auth="required"))
        s.read()
        s.cmd("EHLO c.example")
        self.assertTrue(s.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").startswith("530 5.7.0"))

    def test_s9_command_timeout_not_reset_by_partial_bytes(self):
        s = self.ready()
        s.clock.advance(299)
        s.send(b"NO")
        s.clock.advance(1)
        self.assertEqual(s.read(), "421 4.4.2 mx.example.net Error: command timeout exceeded\r\n")
        self.assertTrue(s.closed)

    def test_s9_command_timeout_reset_by_complete_command(self):
        s = self.ready()
        s.clock.advance(299)
        s.cmd("NOOP")
        s.clock.advance(299)
        self.assertFalse(s.closed)

    def test_s9_data_timeout(self):
        s = Session(listener(limits=Limits(data_timeout=60)))
        s.read()
        s.cmd("EHLO c.example")
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("DATA")
        s.clock.advance(59)
        s.send(b"some")
        s.clock.advance(59)
        self.assertFalse(s.closed)
        s.clock.advance(1)
        self.assertEqual(s.read(), "421 4.4.2 mx.example.net Error: data timeout exceeded\r\n")
        self.assertEqual(s.queue.messages, {})

    def test_s9_session_deadline_stops_slowloris(self):
        s = Session(listener(limits=Limits(session_timeout=1000)))
        s.read()
        for _ in range(9):
            s.clock.advance(100)
            s.cmd("NOOP")
        s.clock.advance(100)
        self.assertEqual(s.read(), "421 4.4.2 mx.example.net Error: session time limit exceeded\r\n")
        self.assertTrue(s.closed)

    def test_s9_too_many_errors(self):
        s = Session(listener(limits=Limits(max_errors=3)))
        s.read()
        s.cmd("BAD")
        s.cmd("BAD")
        self.assertEqual(s.cmd("BAD"), "500 5.5.2 Command not recognized\r\n"
                         "421 4.7.0 mx.example.net Error: too many errors\r\n")
        self.assertTrue(s.closed)

    def test_s10_controls_in_ehlo_and_addresses(self):
        s = relay_session()
        s.read()
        self.assertEqual(s.cmd("EHLO evil\nX-Injected: yes"), "501 5.5.4 Invalid character in command\r\n")
        self.assertEqual(s.cmd("EHLO evil\x00"), "501 5.5.4 Invalid character in command\r\n")
        s.cmd("EHLO c.example")
        self.assertEqual(s.cmd('MAIL FROM:<"a\nb"@remote.example>'), "501 5.5.4 Invalid character in command\r\n")
        self.assertEqual(s.cmd("EHLO (evil)"), "501 5.5.4 Invalid EHLO hostname\r\n")

    def test_s11_source_route_judged_on_final_domain(self):
        s = self.ready()
        s.cmd("MAIL FROM:<a@remote.example>")
        self.assertEqual(s.cmd("RCPT TO:<@example.com:u@elsewhere.example>"),
                         "554 5.7.1 <u@elsewhere.example>: Relay access denied\r\n")
        self.assertEqual(s.cmd("RCPT TO:<@elsewhere.example:u@example.com>"), "250 2.1.5 Ok\r\n")

    def test_s12_queue_failure_is_451_never_5xx_or_250(self):
        s = self.ready()
        s.queue.fail = True
        reply = send_message(s)
        self.assertEqual(reply, "451 4.3.0 Temporary failure, please try again later\r\n")
        self.flushLoggedErrors(OSError)
        s.queue.fail = False
        self.assertTrue(send_message(s).startswith("250 2.0.0"))

    def test_s12_hook_exception_is_451(self):
        s = Session(listener(), hooks=BrokenDataHook())
        s.read()
        s.cmd("EHLO c.example")
        self.assertEqual(send_message(s), "451 4.3.0 Temporary failure, please try again later\r\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(s.queue.messages, {})

    def test_s15_hostname_from_config_and_timers_on_the_injected_clock(self):
        # twisted.mail.smtp computes DNSNAME with getfqdn() at import and imports the global
        # reactor; mailgate must use neither.
        from twisted.internet import reactor
        from twisted.mail import smtp

        before = set(reactor.getDelayedCalls())
        self.patch(smtp, "DNSNAME", b"wrong.invalid")
        s = self.ready()
        send_message(s)
        s.cmd("MAIL FROM:<a@remote.example>")
        self.assertEqual(set(reactor.getDelayedCalls()), before)
        self.assertTrue(s.clock.getDelayedCalls())
        envelope, data = s.queue.messages["Q0001"]
        self.assertIn(b"by mx.example.net (mailgate)", data)
        self.assertNotIn(b"wrong.invalid", data)

    def test_s15_library_modules_do_not_import_the_reactor_themselves(self):
        # Only the programs' entry points, mailgate.tap and the receiver process's main (and
        # Gateway.from_config when given no reactor), may touch it.
        import pathlib

        root = pathlib.Path(REPO).joinpath("mailgate")
        for path in root.rglob("*.py"):
            if path.name in ("tap.py", "__init__.py") or path == root / "processes" / "receiver.py":
                continue
            self.assertNotIn("from twisted.internet import reactor", path.read_text(), path)


class HookTests(unittest.TestCase):
    def test_hook_reply_rejects_recipient(self):
        class Reject:
            def on_rcpt(self, session, recipient):
                return Reply(550, "5.1.1", "No such user")

        s = Session(listener(), hooks=Reject())
        s.read()
        s.cmd("EHLO c.example")
        s.cmd("MAIL FROM:<a@remote.example>")
        self.assertEqual(s.cmd("RCPT TO:<u@example.com>"), "550 5.1.1 No such user\r\n")

    def test_temporary_refusal_at_connect_is_a_421_greeting(self):
        class Busy:
            def on_connect(self, session):
                return Reply(451, "4.3.0", "Temporary failure, please try again later")

        s = Session(listener(), hooks=Busy())
        self.assertEqual(s.read(), "421 4.3.0 mx.example.net Temporary failure, please try again later\r\n")
        self.assertTrue(s.closed)

    def test_connect_hook_can_refuse(self):
        class Refuse:
            def on_connect(self, session):
                return defer.succeed(Reply(554, "5.7.1", "Go away"))

        s = Session(listener(), hooks=Refuse())
        self.assertEqual(s.read(), "554 5.7.1 Go away\r\n")
        self.assertTrue(s.closed)


class DataResultTests(unittest.TestCase):
    def test_filter_result_replaces_bytes_and_sets_state(self):
        from mailgate.verdict import DataResult

        seen = []

        class Tagger:
            def on_data(self, session, envelope, message):
                seen.append((session.client_ip, session.helo, session.listener, message))
                return DataResult(b"X-Tag: yes\r\n" + message, state="quarantine",
                                  verdicts=[("tagger", "quarantine")])

        s = Session(listener(), hooks=Tagger())
        s.read()
        s.cmd("EHLO c.example")
        self.assertEqual(send_message(s), "250 2.0.0 Ok: queued as Q0001\r\n")
        self.assertEqual(seen, [("192.0.2.10", "c.example", "test", b"Subject: hi\r\n\r\nhello\r\n")])
        envelope, data = s.queue.messages["Q0001"]
        self.assertEqual(s.queue.where["Q0001"], "quarantine")
        self.assertTrue(data.startswith(b"Received: from c.example"))
        self.assertIn(b"\r\nX-Tag: yes\r\nSubject: hi\r\n", data)
        self.assertEqual(envelope.verdicts, (("tagger", "quarantine"),))
        self.assertEqual(envelope.size, len(data))

    def test_transaction_dict_cleared_between_messages(self):
        class Counter:
            def on_mail(self, session, sender):
                session.transaction["n"] = session.transaction.get("n", 0) + 1
                self.last = dict(session.transaction)

        hooks = Counter()
        s = Session(listener(), hooks=hooks)
        s.read()
        s.cmd("EHLO c.example")
        send_message(s)
        send_message(s)
        self.assertEqual(hooks.last, {"n": 1})


class EventTests(unittest.TestCase):
    def setUp(self):
        from mailgate.events import EventBus

        self.events = []
        self.clock = Clock()
        bus = EventBus(self.clock)
        bus.subscribe(lambda kind, fields: self.events.append((kind, dict(fields))))
        self.s = Session(listener(role="submission", tls="required", auth="required"), events=bus,
                         clock=self.clock)
        self.s.read()

    def of(self, kind, **match):
        return [f for k, f in self.events if k == kind and all(f.get(x) == y for x, y in match.items())]

    def test_protocol_events_mask_auth_and_never_carry_the_body(self):
        s = self.s
        s.cmd("EHLO c.example")
        s.start_tls()
        s.login(password="wrong")
        s.cmd("AUTH LOGIN")
        s.cmd("YWxpY2VAZXhhbXBsZS5jb20=")
        s.cmd("c2VjcmV0")
        send_message(s, "alice@example.com", body="Subject: secret body\r\n\r\nBODYTEXT\r\n.\r\n")
        s.proto.connectionLost(None)
        kinds = [f["event"] for f in self.of("protocol")]
        self.assertEqual(kinds[0], "connect")
        self.assertEqual(kinds[-1], "disconnect")
        self.assertIn("tls", kinds)
        commands = [f["data"] for f in self.of("protocol", event="command")]
        self.assertIn("AUTH PLAIN ****", commands)
        self.assertIn("AUTH LOGIN", commands)
        self.assertEqual(commands.count("****"), 2)
        everything = repr(self.events)
        self.assertNotIn("secret", everything.replace("secret body", ""))
        self.assertNotIn("BODYTEXT", everything)
        self.assertNotIn("c2VjcmV0", everything)
        replies = [f["data"] for f in self.of("protocol", event="reply")]
        self.assertIn("235 2.7.0 Authentication successful", replies)
        first = self.of("protocol")[0]
        self.assertEqual((first["session"], first["listener"], first["direction"]),
                         (s.proto.session.id, "test", "in"))
        self.assertEqual(first["remote"], "192.0.2.10:40000")

    def test_tracking_receive_reject_and_auth_fail(self):
        s = self.s
        s.cmd("EHLO c.example")
        s.start_tls()
        s.login(password="wrong")
        s.login()
        s.cmd("MAIL FROM:<bob@example.com>")
        s.cmd("MAIL FROM:<alice@example.com>")
        s.cmd("RCPT TO:<x@elsewhere.example>")
        s.cmd("DATA")
        self.clock.advance(2)
        s.send("Message-ID: <m1@example.com>\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        [fail] = self.of("tracking", event="AUTH_FAIL")
        self.assertEqual(fail["user_attempted"], "alice@example.com")
        [reject] = self.of("tracking", event="REJECT")
        self.assertEqual(reject["stage"], "MAIL")
        self.assertEqual(reject["sender"], "bob@example.com")
        self.assertTrue(reject["reply"].startswith("553 5.7.1 Sender address rejected"))
        [receive] = self.of("tracking", event="RECEIVE")
        self.assertEqual(receive["queue_id"], "Q0001")
        self.assertEqual(receive["message_id"], "<m1@example.com>")
        self.assertEqual(receive["sender"], "alice@example.com")
        self.assertEqual(receive["recipients"], ["x@elsewhere.example"])
        self.assertEqual(receive["user"], "alice@example.com")
        self.assertEqual(receive["listener"], "test")
        self.assertEqual(receive["client"], "192.0.2.10")
        self.assertEqual(receive["latency"], 0)
        self.assertEqual(receive["size"], s.queue.messages["Q0001"][0].size)

    def test_rejected_message_at_end_of_data_is_tracked(self):
        s = Session(listener(), events=self.s.factory.events)
        s.read()
        s.cmd("EHLO c.example")
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<u@example.com>")
        s.cmd("RCPT TO:<v@elsewhere.example>")
        s.cmd("DATA")
        s.send(b"bad\nline\r\n.\r\n")
        stages = [(f["stage"], f["reply"][:3], f["recipients"])
                  for f in self.of("tracking", event="REJECT")]
        self.assertEqual(stages, [("RCPT", "554", ["v@elsewhere.example"]),
                                  ("DATA", "550", ["u@example.com"])])

    def test_closing_421_after_too_many_errors_is_not_another_reject(self):
        s = Session(listener(limits=Limits(max_errors=2)), events=self.s.factory.events)
        s.read()
        s.cmd("EHLO c.example")
        s.cmd("MAIL FROM:<a@remote.example>")
        s.cmd("RCPT TO:<v@elsewhere.example>")
        self.assertIn("421 4.7.0", s.cmd("RCPT TO:<w@elsewhere.example>"))
        self.assertEqual(len(self.of("tracking", event="REJECT")), 2)


class SlowHooks:
    """MAIL and RCPT checks that answer only when the test says so."""

    def __init__(self):
        self.pending = []

    def _later(self):
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def on_mail(self, session, sender):
        return self._later()

    def on_rcpt(self, session, recipient):
        return self._later()

    def fire_all_in_reverse(self):
        # Fire whatever is pending, newest first, until nothing is left: a session must still
        # answer in order because it never has more than one check outstanding.
        while self.pending:
            self.pending.pop().callback(None)


class BrokenDataHook:
    def on_data(self, session, envelope, data):
        1 / 0
