"""
ESMTP parameters (mailgate.smtp.params) and UTF-8 addresses (RFC 6531) in MAIL and RCPT:
the values, the exact replies for bad ones, xtext both ways.
"""

import pytest

from mailgate.envelope import Address, Reply
from mailgate.errors import ReplyError
from mailgate.smtp import params
from mailgate.smtp.address import parse_mail, parse_rcpt


def wire(text):
    """What the server hands the parser: the UTF-8 bytes of the line, decoded as latin-1."""
    return text.encode("utf-8").decode("latin-1")


def reply_of(function, *args, **kw):
    with pytest.raises(ReplyError) as info:
        function(*args, **kw)
    return info.value.reply


def test_dsn_parameters_of_mail():
    sender, p = parse_mail("FROM:<a@x.example> RET=hdrs ENVID=QQ314159+2Bx BODY=8bitmime SIZE=9")
    assert p == {"RET": "HDRS", "ENVID": "QQ314159+x", "BODY": "8BITMIME", "SIZE": 9}


def test_dsn_parameters_of_rcpt():
    _, p = parse_rcpt("TO:<u@x.example> NOTIFY=failure,Delay ORCPT=rfc822;u+2Bextra@x.example")
    assert p == {"NOTIFY": ("FAILURE", "DELAY"), "ORCPT": "rfc822;u+extra@x.example"}
    assert parse_rcpt("TO:<u@x.example> NOTIFY=NEVER")[1] == {"NOTIFY": ("NEVER",)}
    _, p = parse_rcpt("TO:<u@x.example> ORCPT=utf-8;j\\x{00F6}rg@x.example")
    assert p["ORCPT"] == "utf-8;j\\x{00F6}rg@x.example"


@pytest.mark.parametrize("arg, reply", [
    ("FROM:<a@x.example> RET=ALL", params.BAD_RET),
    ("FROM:<a@x.example> RET", params.BAD_RET),
    ("FROM:<a@x.example> ENVID=", params.BAD_ENVID),
    ("FROM:<a@x.example> ENVID=a+zz", params.BAD_ENVID),
    ("FROM:<a@x.example> ENVID=a+0D+0A", params.BAD_ENVID),  # decodes to CR LF
    ("FROM:<a@x.example> ENVID=" + "x" * 101, params.BAD_ENVID),
    ("FROM:<a@x.example> SMTPUTF8=yes", params.BAD_SMTPUTF8),
    ("FROM:<a@x.example> BODY=BINARYMIME", params.BAD_BODY),  # not offered
    ("FROM:<a@x.example> RET=FULL RET=HDRS", Reply(501, "5.5.4", "Duplicate parameter RET")),
])
def test_bad_mail_parameters(arg, reply):
    assert reply_of(parse_mail, arg) == reply


@pytest.mark.parametrize("arg, reply", [
    ("TO:<u@x.example> NOTIFY=NEVER,FAILURE", params.BAD_NOTIFY),
    ("TO:<u@x.example> NOTIFY=SOMETIMES", params.BAD_NOTIFY),
    ("TO:<u@x.example> NOTIFY=DELAY,DELAY", params.BAD_NOTIFY),
    ("TO:<u@x.example> NOTIFY", params.BAD_NOTIFY),
    ("TO:<u@x.example> ORCPT=u@x.example", params.BAD_ORCPT),
    ("TO:<u@x.example> ORCPT=rfc822;", params.BAD_ORCPT),
    ("TO:<u@x.example> ORCPT=rfc822;a+00b", params.BAD_ORCPT),
    ("TO:<u@x.example> ORCPT=rfc822;" + "a" * 500, params.BAD_ORCPT),
])
def test_bad_rcpt_parameters(arg, reply):
    assert reply_of(parse_rcpt, arg) == reply


def test_xtext_round_trip():
    assert params.xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert params.xtext_decode("a+2Bb+3Dc+20d", params.BAD_ENVID) == "a+b=c d"
    assert params.orcpt_for_next_hop("rfc822;u+x@x.example", "ignored") == "rfc822;u+2Bx@x.example"
    assert params.orcpt_for_next_hop(None, "u@x.example") == "rfc822;u@x.example"
    assert params.orcpt_for_next_hop(None, "jörg@x.example") is None


# --- SMTPUTF8 ----------------------------------------------------------------------------------


def test_utf8_sender_and_recipient_with_smtputf8():
    sender, p = parse_mail(wire("FROM:<jörg@bücher.example> SMTPUTF8"))
    assert (sender, p) == (Address("jörg", "bücher.example"), {"SMTPUTF8": True})
    recipient, _ = parse_rcpt(wire("TO:<θέμα@παράδειγμα.δοκιμή>"), smtputf8=True)
    assert recipient == Address("θέμα", "παράδειγμα.δοκιμή")
    recipient, _ = parse_rcpt(wire('TO:<"jö rg"@x.example>'), smtputf8=True)
    assert recipient == Address('"jö rg"', "x.example")
    # An ASCII address is the same with or without SMTPUTF8.
    assert parse_mail("FROM:<a@x.example> SMTPUTF8")[0] == Address("a", "x.example")


def test_utf8_domain_is_lower_cased_and_nfc():
    recipient, _ = parse_rcpt(wire("TO:<a@BÜCHER.example>"), smtputf8=True)
    assert recipient.domain == "bücher.example"
    decomposed = wire("TO:<jo\u0308rg@x.example>")  # o + combining diaeresis
    assert parse_rcpt(decomposed, smtputf8=True)[0].local == "jörg"


def test_utf8_without_smtputf8_is_553_5_6_7():
    reply = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
    assert reply_of(parse_mail, wire("FROM:<jörg@x.example>")) == reply
    assert reply_of(parse_rcpt, wire("TO:<jörg@x.example>")) == reply


@pytest.mark.parametrize("path", [
    "<jörg@bü cher.example>",  # a space
    "<jörg@x.example\u00a0>",  # a no-break space
    "<j\u200börg@x.example>",  # a zero-width space (format character)
    "<jörg@\u2603\u2603.example>",  # IDNA refuses symbols
    "<jörg@-bücher.example>",
    "<jörg\u0085@x.example>",  # C1 control
    "<" + "ö" * 33 + "@x.example>",  # 66 octets in the local part
])
def test_bad_utf8_addresses(path):
    bad = Reply(501, "5.1.3", "Bad recipient address syntax")
    assert reply_of(parse_rcpt, wire("TO:" + path), smtputf8=True) == bad


def test_invalid_utf8_bytes():
    bad = Reply(501, "5.1.7", "Bad sender address syntax")
    assert reply_of(parse_mail, "FROM:<j\xc3@x.example> SMTPUTF8") == bad
