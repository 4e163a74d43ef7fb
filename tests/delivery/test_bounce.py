"""RFC 3464 delivery status notifications: structure, fields, and 7-bit safety."""

import email
import email.policy
import email.utils
import re

import pytest

from mailgate.delivery import bounce
from mailgate.delivery.bounce import make_dsn, should_bounce
from mailgate.envelope import Envelope, Hop, RecipientResult

HOST = "mx.example.com"
ARRIVED = 1700000000.0
NOW = 1700003600.0

ORIGINAL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"\r\n"
    b"The body, which must not come back.\r\n"
)


def envelope(sender="alice@example.com", **kwargs):
    kwargs.setdefault("received_at", ARRIVED)
    return Envelope("Q123", sender, ["bob@example.org", "carol@example.net"], "192.0.2.1", **kwargs)


def remote_failure(rcpt="bob@example.org", text="5.1.1 <bob@example.org>: user unknown"):
    hop = Hop("mx1.example.org", "192.0.2.25", 25)
    return RecipientResult(rcpt, "bounced", 550, "5.1.1", text, hop), NOW - 60


def parse(dsn):
    return email.message_from_bytes(dsn, policy=email.policy.default)


def status_blocks(dsn):
    """[per-message fields, per-recipient fields...] as dicts (the email package's own parse)."""
    report = parse(dsn)
    part = report.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    return [dict(block.items()) for block in part.get_payload()]


def assert_wire_safe(dsn):
    assert dsn.isascii()
    assert b"\n" not in dsn.replace(b"\r\n", b"")
    assert b"\r" not in dsn.replace(b"\r\n", b"")
    assert dsn.endswith(b"\r\n")
    for line in dsn.split(b"\r\n"):
        assert len(line) <= 998


# --- should_bounce -----------------------------------------------------------------------------


def test_never_bounce_a_bounce():
    assert should_bounce(envelope()) is True
    assert should_bounce(envelope(sender="")) is False


# --- structure ---------------------------------------------------------------------------------


def test_bounce_structure_and_headers():
    dsn = make_dsn(HOST, envelope(), ORIGINAL, [remote_failure()], NOW)
    assert_wire_safe(dsn)
    msg = parse(dsn)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    types = [part.get_content_type() for part in msg.get_payload()]
    assert types == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@" + HOST
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert re.fullmatch(r"<[^<>@\s]+@%s>" % re.escape(HOST), msg["Message-ID"])
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert not msg.defects
    for part in msg.walk():
        assert not part.defects, part.defects


def test_delivery_status_fields():
    failures = [
        remote_failure(),
        (RecipientResult("carol@example.net", "bounced", 554, "5.7.1", "rejected", None), NOW - 5),
    ]
    blocks = status_blocks(make_dsn(HOST, envelope(), ORIGINAL, failures, NOW))
    assert len(blocks) == 3
    per_message, bob, carol = blocks
    assert per_message["Reporting-MTA"] == "dns; " + HOST
    assert per_message["X-Mailgate-Queue-ID"] == "Q123"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVED
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx1.example.org"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 5.1.1 <bob@example.org>: user unknown"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert "Will-Retry-Until" not in bob
    # Our own reason (no remote): no Remote-MTA, but still the diagnostic.
    assert carol["Final-Recipient"] == "rfc822; carol@example.net"
    assert "Remote-MTA" not in carol
    assert carol["Diagnostic-Code"] == "smtp; 554 5.7.1 rejected"
    assert carol["Status"] == "5.7.1"


def test_human_part_names_recipients_and_replies():
    dsn = make_dsn(HOST, envelope(), ORIGINAL, [remote_failure()], NOW)
    text = parse(dsn).get_payload()[0].get_content()
    assert "<bob@example.org>" in text
    assert "mx1.example.org said:" in text
    assert "550 5.1.1 5.1.1 <bob@example.org>: user unknown" in text
    assert "Q123" in text
    assert "will not be retried" in text


def test_original_headers_only():
    dsn = make_dsn(HOST, envelope(), ORIGINAL, [remote_failure()], NOW)
    part = parse(dsn).get_payload()[2]
    headers = part.get_content()
    assert "Subject: lunch" in headers
    assert "Message-ID: <m1@example.com>" in headers
    assert b"must not come back" not in dsn
    assert dsn.count(b"Subject: lunch\r\n") == 1


def test_original_with_bare_lf_and_no_body():
    data = b"From: alice@example.com\nSubject: lf only\n"
    dsn = make_dsn(HOST, envelope(), data, [remote_failure()], NOW)
    assert_wire_safe(dsn)
    assert b"From: alice@example.com\r\nSubject: lf only\r\n" in dsn


def test_original_without_headers():
    dsn = make_dsn(HOST, envelope(), b"\r\njust a body\r\n", [remote_failure()], NOW)
    assert_wire_safe(dsn)
    assert b"just a body" not in dsn
    assert parse(dsn).get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_huge_header_block_is_cut():
    data = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 200) for i in range(2000)) + b"\r\nbody"
    dsn = make_dsn(HOST, envelope(), data, [remote_failure()], NOW)
    assert_wire_safe(dsn)
    assert len(dsn) < bounce.MAX_HEADERS + 16 * 1024


# --- delayed and expired -----------------------------------------------------------------------


def test_delay_warning():
    until = ARRIVED + 5 * 86400
    deferred = RecipientResult("bob@example.org", "deferred", 451, "4.3.0", "try later",
                               Hop("mx1.example.org", "192.0.2.25", 25))
    dsn = make_dsn(HOST, envelope(), ORIGINAL, [(deferred, NOW)], NOW, action="delayed",
                   retry_until=until)
    assert_wire_safe(dsn)
    msg = parse(dsn)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["Auto-Submitted"] == "auto-replied"
    _, bob = status_blocks(dsn)
    assert bob["Action"] == "delayed"
    assert bob["Status"] == "4.3.0"
    assert email.utils.parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp() == until
    text = " ".join(msg.get_payload()[0].get_content().split())
    assert "do not need to send the message again" in text
    assert "retried until %s" % bounce._date(until) in text


def test_delay_warning_without_retry_until():
    deferred = RecipientResult("bob@example.org", "deferred", 0, "", "")
    dsn = make_dsn(HOST, envelope(), ORIGINAL, [(deferred, None)], NOW, action="delayed")
    _, bob = status_blocks(dsn)
    assert bob["Action"] == "delayed"
    assert bob["Status"] == "4.0.0"  # nothing known yet: a generic transient status
    assert "Diagnostic-Code" not in bob
    assert "Last-Attempt-Date" not in bob
    assert "Will-Retry-Until" not in bob


def test_expired_is_failed_with_4_4_7():
    expired = RecipientResult("bob@example.org", "bounced", 451, "4.4.7",
                              "message expired after 2 days: connection refused")
    _, bob = status_blocks(make_dsn(HOST, envelope(), ORIGINAL, [(expired, NOW)], NOW))
    assert bob["Action"] == "failed"
    assert bob["Status"] == "4.4.7"


def test_status_from_code_when_missing():
    result = RecipientResult("bob@example.org", "bounced", 554, "", "no")
    _, bob = status_blocks(make_dsn(HOST, envelope(), ORIGINAL, [(result, NOW)], NOW))
    assert bob["Status"] == "5.0.0"
    assert bob["Diagnostic-Code"] == "smtp; 554 no"


# --- 7-bit safety ------------------------------------------------------------------------------


def test_non_ascii_everywhere_stays_7bit():
    data = "From: Zoë <zoe@exämple.com>\r\nSubject: café\r\n\r\nbody\r\n".encode("utf-8")
    result = RecipientResult("jürgen@exämple.de", "bounced", 550, "5.1.1",
                             "Benutzer unbekannt: jürgen", Hop("mx.exämple.de", "192.0.2.9", 25))
    dsn = make_dsn(HOST, envelope(sender="zoë@exämple.com"), data, [(result, NOW)], NOW)
    assert_wire_safe(dsn)
    msg = parse(dsn)
    assert not msg.defects
    text = msg.get_payload()[0].get_content()
    assert "jürgen@exämple.de" in text
    assert "Benutzer unbekannt: jürgen" in text
    _, rcpt = status_blocks(dsn)
    assert rcpt["Final-Recipient"] == "utf-8; j\\x{FC}rgen@ex\\x{E4}mple.de"  # RFC 6533 xtext
    assert "zoë@exämple.com" in str(msg["To"])
    headers = msg.get_payload()[2].get_content()
    assert "Subject: café" in headers


def test_ascii_local_part_idn_domain_sender():
    dsn = make_dsn(HOST, envelope(sender="zoe@exämple.com"), ORIGINAL, [remote_failure()], NOW)
    assert_wire_safe(dsn)
    assert parse(dsn)["To"].addresses[0].addr_spec == "zoe@xn--exmple-cua.com"


def test_long_and_multiline_replies():
    text = "first line\nsecond " + "y" * 3000
    result = RecipientResult("bob@example.org", "bounced", 550, "5.7.1", text,
                             Hop("mx1.example.org", "192.0.2.25", 25))
    dsn = make_dsn(HOST, envelope(), ORIGINAL, [(result, NOW)], NOW)
    assert_wire_safe(dsn)
    _, bob = status_blocks(dsn)
    assert bob["Diagnostic-Code"].startswith("smtp; 550 5.7.1 first line second yyy")
    human = parse(dsn).get_payload()[0].get_content()
    assert "550 5.7.1 first line" in human
    assert "550 5.7.1 second " + "y" * 3000 in human


def test_header_injection_in_reply_text():
    result = RecipientResult("bob@example.org", "bounced", 550, "5.1.1",
                             "no\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; x@y")
    dsn = make_dsn(HOST, envelope(), ORIGINAL, [(result, NOW)], NOW)
    blocks = status_blocks(dsn)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.org"


def test_boundary_avoids_content():
    digest = "ab" * 32
    first = "=_mailgate_dsn_%s_0" % digest[:24]
    assert bounce._boundary(digest, [b"x", first.encode("ascii")]) != first
    assert bounce._boundary(digest, [b"x"]) == first


# --- misc --------------------------------------------------------------------------------------


def test_deterministic():
    one = make_dsn(HOST, envelope(), ORIGINAL, [remote_failure()], NOW)
    assert one == make_dsn(HOST, envelope(), ORIGINAL, [remote_failure()], NOW)
    other = make_dsn(HOST, envelope(), ORIGINAL, [remote_failure()], NOW + 1)
    assert parse(one)["Message-ID"] != parse(other)["Message-ID"]


def test_no_queue_id_no_arrival():
    env = Envelope("", "alice@example.com", ["bob@example.org"], "192.0.2.1")
    per_message, _ = status_blocks(make_dsn(HOST, env, ORIGINAL, [remote_failure()], NOW))
    assert per_message == {"Reporting-MTA": "dns; " + HOST}


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_dsn(HOST, envelope(), ORIGINAL, [remote_failure()], NOW, action="delivered")
    with pytest.raises(ValueError):
        make_dsn(HOST, envelope(), ORIGINAL, [], NOW)
