"""Tests for mailgate.smtp.address: strict RFC 5321 parsing of MAIL, RCPT and EHLO arguments."""

import pytest

from mailgate.smtp.address import parse_helo, parse_mail, parse_rcpt
from mailgate.envelope import Address, Reply
from mailgate.errors import ReplyError

MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
INVALID_CHARACTER = Reply(501, "5.5.4", "Invalid character in command")
NON_ASCII = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter")


def unsupported(keyword):
    return Reply(555, "5.5.4", "Unsupported parameter %s" % (keyword,))


def duplicate(keyword):
    return Reply(501, "5.5.4", "Duplicate parameter %s" % (keyword,))


def reply_of(function, arg):
    with pytest.raises(ReplyError) as info:
        function(arg)
    return info.value.reply


# ---------------------------------------------------------------------------------------------
# Valid paths: the same table holds for MAIL and RCPT.
# ---------------------------------------------------------------------------------------------

VALID_PATHS = [
    # plain dot-strings
    ("<a@b.example>", Address("a", "b.example")),
    ("<First.Last@Example.COM>", Address("First.Last", "example.com")),
    ("<a.b.c.d@x.example>", Address("a.b.c.d", "x.example")),
    ("<user+tag@x.example>", Address("user+tag", "x.example")),
    ("<!#$%&'*+-/=?^_`{|}~@x.example>", Address("!#$%&'*+-/=?^_`{|}~", "x.example")),
    ("<user%evil.com@x.example>", Address("user%evil.com", "x.example")),
    ("<evil.com!user@x.example>", Address("evil.com!user", "x.example")),
    ("<a@localhost>", Address("a", "localhost")),
    ("<a@1.2.3.4>", Address("a", "1.2.3.4")),  # all-digit labels are valid LDH
    ("<a@x-y.example>", Address("a", "x-y.example")),
    ("<a@x--y.example>", Address("a", "x--y.example")),
    ("<a@xn--bcher-kva.example>", Address("a", "xn--bcher-kva.example")),
    ("<a@b>", Address("a", "b")),
    # quoted strings: unquoted when the quotes were unnecessary
    ('<"joe"@x.example>', Address("joe", "x.example")),
    ('<"joe.smith"@x.example>', Address("joe.smith", "x.example")),
    ('<"j\\oe"@x.example>', Address("joe", "x.example")),
    # ... kept (with normalised escapes) otherwise
    ('<"joe smith"@x.example>', Address('"joe smith"', "x.example")),
    ('<"joe\\ smith"@x.example>', Address('"joe smith"', "x.example")),
    ('<"user@evil.com"@x.example>', Address('"user@evil.com"', "x.example")),
    ('<"user%evil"@x.example>', Address("user%evil", "x.example")),  # % is atext: still visible
    ('<"evil!user"@x.example>', Address("evil!user", "x.example")),
    ('<"a\\"b"@x.example>', Address('"a\\"b"', "x.example")),
    ('<"a\\\\b"@x.example>', Address('"a\\\\b"', "x.example")),
    ('<"a..b"@x.example>', Address('"a..b"', "x.example")),
    ('<".a"@x.example>', Address('".a"', "x.example")),
    ('<""@x.example>', Address('""', "x.example")),
    ('<"a>b"@x.example>', Address('"a>b"', "x.example")),
    ('<"a[b"@x.example>', Address('"a[b"', "x.example")),
    ('<"(comment)"@x.example>', Address('"(comment)"', "x.example")),
    # address literals
    ("<a@[192.0.2.1]>", Address("a", "[192.0.2.1]")),
    ("<a@[127.0.0.1]>", Address("a", "[127.0.0.1]")),
    ("<a@[0.0.0.0]>", Address("a", "[0.0.0.0]")),
    ("<a@[255.255.255.255]>", Address("a", "[255.255.255.255]")),
    ("<a@[IPv6:2001:db8::1]>", Address("a", "[IPv6:2001:db8::1]")),
    ("<a@[ipv6:2001:DB8::1]>", Address("a", "[IPv6:2001:db8::1]")),
    ("<a@[IPV6:::1]>", Address("a", "[IPv6:::1]")),
    ("<a@[IPv6:2001:db8:0:0:0:0:0:1]>", Address("a", "[IPv6:2001:db8:0:0:0:0:0:1]")),
    ("<a@[IPv6:::ffff:192.0.2.1]>", Address("a", "[IPv6:::ffff:192.0.2.1]")),
    ("<a@[x-tag:Some-Content]>", Address("a", "[x-tag:some-content]")),
    ("<a@[tag:a>b]>", Address("a", "[tag:a>b]")),
    # source routes: checked, then dropped
    ("<@relay.example:a@b.example>", Address("a", "b.example")),
    ("<@r1.example,@r2.example:a@b.example>", Address("a", "b.example")),
    ("<@r1.example,@r2.example,@R3.Example:a@B.example>", Address("a", "b.example")),
    ("<@accepted.example:user@evil.com>", Address("user", "evil.com")),
    # length limits, at the limit
    ("<%s@x.example>" % ("l" * 64,), Address("l" * 64, "x.example")),
    ("<a@%s.example>" % ("d" * 63,), Address("a", "d" * 63 + ".example")),
]


@pytest.mark.parametrize("path, address", VALID_PATHS)
def test_valid_sender(path, address):
    assert parse_mail("FROM:" + path) == (address, {})


@pytest.mark.parametrize("path, address", VALID_PATHS)
def test_valid_recipient(path, address):
    assert parse_rcpt("TO:" + path) == (address, {})


def _long_domain(length):
    """A domain of exactly length octets whose only fault, if any, is its total length."""
    labels = []
    while length > 50:
        labels.append("d" * 49)
        length -= 50
    return ".".join(labels + ["e" * length])


def test_long_domain_helper():
    assert len(_long_domain(255)) == 255
    assert len(_long_domain(256)) == 256


def test_domain_of_255_octets_fits_in_a_path_of_256():
    # "<a@" + 251 + ">" is 256 octets: the largest path
    domain = _long_domain(251)
    assert parse_rcpt("TO:<a@%s>" % (domain,)) == (Address("a", domain), {})


# ---------------------------------------------------------------------------------------------
# Invalid paths: bracketed, ASCII, but not RFC 5321.
# ---------------------------------------------------------------------------------------------

INVALID_PATHS = [
    "<a>",
    "<@x.example>",
    "<a@>",
    "<a@@x.example>",
    "<a@b@x.example>",
    "<a b@x.example>",
    "< a@x.example>",
    "<a@x.example >",
    # dot-string edge cases
    "<.a@x.example>",
    "<a.@x.example>",
    "<a..b@x.example>",
    "<.@x.example>",
    "<a(b)@x.example>",
    "<a,b@x.example>",
    "<a;b@x.example>",
    "<a:b@x.example>",
    "<a\\b@x.example>",
    "<a[b@x.example>",
    '<a"b"@x.example>',
    '<"a"b@x.example>',
    # quoted strings
    '<"a@x.example>',
    '<"a\\"@x.example>',
    '<"a"b"@x.example>',
    # domains
    "<a@x.example.>",
    "<a@.x.example>",
    "<a@x..example>",
    "<a@-x.example>",
    "<a@x-.example>",
    "<a@x.-example>",
    "<a@x_y.example>",
    "<a@x!y.example>",
    "<a@x.example:25>",
    # address literals
    "<a@[]>",
    "<a@[192.0.2]>",
    "<a@[192.0.2.256]>",
    "<a@[192.0.2.1.5]>",
    "<a@[192.0.2.01]>",
    "<a@[192.0.2.1 ]>",
    "<a@[ 192.0.2.1]>",
    "<a@[IPv6:2001:db8::g]>",
    "<a@[IPv6:2001:db8::1::2]>",
    "<a@[IPv6:192.0.2.1]>",
    "<a@[IPv6:]>",
    "<a@[IPv6:fe80::1%eth0]>",
    "<a@[-:x]>",
    "<a@[tag-:x]>",
    "<a@[tag:]>",
    "<a@[:x]>",
    "<a@[tag:a\\b]>",
    "<a@[192.0.2.1>",
    "<a@192.0.2.1]>",
    "<a@[[192.0.2.1]]>",
    # source routes
    "<@:a@x.example>",
    "<@r.example a@x.example>",
    "<@r.example,a@x.example>",
    "<@r.example,:a@x.example>",
    "<@r.example;@s.example:a@x.example>",
    "<r.example:a@x.example>",
    "<@r..example:a@x.example>",
    "<@[192.0.2.1]:a@x.example>",
    "<@r.example:@s.example:a@x.example>",
    # too long
    "<%s@x.example>" % ("l" * 65,),
    '<"%s"@x.example>' % ("l" * 63,),  # 65 octets with its quotes
    "<a@%s.example>" % ("d" * 64,),
    "<a@%s>" % (_long_domain(256),),
    "<%s@%s>" % ("l" * 64, _long_domain(190)),  # 64 + 1 + 190 + 2 = 257 octets
    "<@%s:a@x.example>" % (_long_domain(250),),
]


def test_general_literal_that_looks_like_ipv6_is_still_a_general_literal():
    # "[2001:db8::1]" parses as tag "2001" and dcontent "db8::1": RFC 5321 allows it.
    assert parse_rcpt("TO:<a@[2001:db8::1]>")[0] == Address("a", "[2001:db8::1]")


@pytest.mark.parametrize("path", INVALID_PATHS)
def test_invalid_sender(path):
    assert reply_of(parse_mail, "FROM:" + path) == BAD_SENDER


@pytest.mark.parametrize("path", INVALID_PATHS)
def test_invalid_recipient(path):
    assert reply_of(parse_rcpt, "TO:" + path) == BAD_RECIPIENT


def test_path_of_256_octets_is_accepted_and_257_refused():
    local = "l" * 64
    fits = "<%s@%s>" % (local, _long_domain(256 - 64 - 3))
    assert len(fits) == 256
    assert parse_mail("FROM:" + fits)[0].local == local
    too_long = "<%s@%s>" % (local, _long_domain(257 - 64 - 3))
    assert reply_of(parse_mail, "FROM:" + too_long) == BAD_SENDER


def test_source_route_counts_towards_path_length():
    fits = "<@%s:a@x.example>" % (_long_domain(241),)
    assert len(fits) == 256
    assert parse_rcpt("TO:" + fits)[0] == Address("a", "x.example")
    too_long = "<@%s:a@x.example>" % (_long_domain(242),)
    assert reply_of(parse_rcpt, "TO:" + too_long) == BAD_RECIPIENT


@pytest.mark.parametrize(
    "arg", ['FROM:<"a@x.example>', "FROM:<a@[192.0.2.1>", 'FROM:<"a"b"@x.example> SIZE=1']
)
def test_unclosed_quote_or_literal_inside_brackets_is_a_bad_path(arg):
    assert reply_of(parse_mail, arg) == BAD_SENDER


# ---------------------------------------------------------------------------------------------
# Keyword, brackets, null sender, postmaster
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<a@x.example>",
        "from:<a@x.example>",
        "FrOm:<a@x.example>",
        "FROM: <a@x.example>",
        "FROM:   <a@x.example>",
        " FROM:<a@x.example>",
        "FROM:<a@x.example> ",
    ],
)
def test_mail_keyword_variants(arg):
    assert parse_mail(arg) == (Address("a", "x.example"), {})


@pytest.mark.parametrize(
    "arg",
    [
        "",
        " ",
        "FROM",
        "FROM:",
        "FROM: ",
        "FROM <a@x.example>",
        "FROM :<a@x.example>",
        "FROM<a@x.example>",
        "FROMA:<a@x.example>",
        "TO:<a@x.example>",
        "<a@x.example>",
        "FROM:a@x.example",
        "FROM:<a@x.example",
        "FROM:a@x.example>",
        "FROM:<a@x.example>junk",
        "FROM:<a@x.example>>",
        "FROM:<<a@x.example>>",
        "FROM:Joe <a@x.example>",
        "FR\u00d6M:<a@x.example>",
        "FROM:<a@x.example> =x",
        "FROM:<a@x.example> -X",
        "FROM:<a@x.example> \u00e9",
    ],
)
def test_mail_syntax(arg):
    assert reply_of(parse_mail, arg) == MAIL_SYNTAX


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "TO",
        "TO:",
        "TO <u@x.example>",
        "FROM:<u@x.example>",
        "TO:u@x.example",
        "TO:<u@x.example",
        "TO:<u@x.example>junk",
        "TO:Postmaster",
        "TO:<a@x.example> =x",
    ],
)
def test_rcpt_syntax(arg):
    assert reply_of(parse_rcpt, arg) == RCPT_SYNTAX


@pytest.mark.parametrize("arg", ["TO:<u@x.example>", "to:<u@x.example>", "To:  <u@x.example>"])
def test_rcpt_keyword_variants(arg):
    assert parse_rcpt(arg) == (Address("u", "x.example"), {})


def test_null_sender():
    address, params = parse_mail("FROM:<>")
    assert address == Address("", "")
    assert address.is_null and str(address) == ""
    assert params == {}


def test_null_sender_with_parameters():
    assert parse_mail("FROM:<> SIZE=10 BODY=8bitmime") == (
        Address("", ""),
        {"SIZE": 10, "BODY": "8BITMIME"},
    )


def test_null_recipient_is_refused():
    assert reply_of(parse_rcpt, "TO:<>") == BAD_RECIPIENT


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>", "<PostMaster>"])
def test_bare_postmaster_recipient(path):
    assert parse_rcpt("TO:" + path) == (Address("postmaster", ""), {})


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>"])
def test_bare_postmaster_sender_is_refused(path):
    assert reply_of(parse_mail, "FROM:" + path) == BAD_SENDER


@pytest.mark.parametrize("path", ["<postmasters>", "<@r.example:postmaster>", '<"postmaster">'])
def test_only_exactly_bare_postmaster(path):
    assert reply_of(parse_rcpt, "TO:" + path) == BAD_RECIPIENT


def test_postmaster_with_domain_keeps_its_case():
    assert parse_rcpt("TO:<PostMaster@X.example>")[0] == Address("PostMaster", "x.example")


# ---------------------------------------------------------------------------------------------
# Control characters and non-ASCII
# ---------------------------------------------------------------------------------------------

CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f"]


@pytest.mark.parametrize("char", CONTROLS)
def test_control_character_in_mail(char):
    assert reply_of(parse_mail, "FROM:<a%s@x.example>" % (char,)) == INVALID_CHARACTER


@pytest.mark.parametrize("char", CONTROLS)
def test_control_character_in_rcpt(char):
    assert reply_of(parse_rcpt, "TO:<u@x.example>%s" % (char,)) == INVALID_CHARACTER


@pytest.mark.parametrize(
    "arg",
    [
        "\x00FROM:<a@x.example>",
        "FROM:\t<a@x.example>",
        'FROM:<"a\tb"@x.example>',
        "FROM:<a@x.example> SIZE=1\r",
        "FROM:<a@x.example>\r\nRCPT TO:<b@y.example>",
        "garbage\x1b[0m",
    ],
)
def test_control_character_anywhere(arg):
    assert reply_of(parse_mail, arg) == INVALID_CHARACTER


@pytest.mark.parametrize(
    "path",
    [
        "<j\u00f6rg@x.example>",
        "<a@b\u00fccher.example>",
        '<"j\u00f6rg"@x.example>',
        "<a@x.example\u00a0>",
        "<\u00ff@x.example>",
        "<a@[192.0.2.1\u0085]>",
        "<@r\u00e9.example:a@x.example>",
        "<Postm\u00e4ster>",
    ],
)
def test_non_ascii_path(path):
    assert reply_of(parse_mail, "FROM:" + path) == NON_ASCII
    assert reply_of(parse_rcpt, "TO:" + path) == NON_ASCII


def test_control_character_wins_over_non_ascii():
    assert reply_of(parse_mail, "FROM:<j\u00f6rg\x00@x.example>") == INVALID_CHARACTER


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, expected",
    [
        ("SIZE=123", {"SIZE": 123}),
        ("size=0", {"SIZE": 0}),
        ("SIZE=000123", {"SIZE": 123}),
        ("SIZE=99999999999999999999", {"SIZE": 99999999999999999999}),
        ("BODY=7BIT", {"BODY": "7BIT"}),
        ("BODY=8BITMIME", {"BODY": "8BITMIME"}),
        ("body=8bitmime", {"BODY": "8BITMIME"}),
        ("Body=7bit", {"BODY": "7BIT"}),
        ("SIZE=123 BODY=8BITMIME", {"SIZE": 123, "BODY": "8BITMIME"}),
        ("BODY=8BITMIME  SIZE=5", {"SIZE": 5, "BODY": "8BITMIME"}),
        ("SIZE=5 ", {"SIZE": 5}),
    ],
)
def test_mail_parameters(params, expected):
    assert parse_mail("FROM:<a@x.example> " + params) == (Address("a", "x.example"), expected)


@pytest.mark.parametrize(
    "params",
    [
        "SIZE",
        "SIZE=",
        "SIZE=abc",
        "SIZE=-1",
        "SIZE=+1",
        "SIZE=1.5",
        "SIZE=1e6",
        "SIZE=0x10",
        "SIZE=123456789012345678901",
        "SIZE=\u0661\u0662",  # Arabic-Indic digits: isdigit() would say yes
        "SIZE=1=2",
    ],
)
def test_bad_size(params):
    assert reply_of(parse_mail, "FROM:<a@x.example> " + params) == BAD_SIZE


@pytest.mark.parametrize(
    "params",
    ["BODY", "BODY=", "BODY=BINARYMIME", "BODY=8BIT", "BODY=7BIT8BITMIME", "BODY=7b\u0131t"],
)
def test_bad_body(params):
    assert reply_of(parse_mail, "FROM:<a@x.example> " + params) == BAD_BODY


@pytest.mark.parametrize(
    "params, keyword",
    [
        ("AUTH=<>", "AUTH"),
        ("NOTIFY=NEVER", "NOTIFY"),
        ("ORCPT=rfc822;a@x.example", "ORCPT"),
        ("SIZE=1 X-FOO", "X-FOO"),
        ("X-FOO=\u00e9", "X-FOO"),
        ("REQUIRETLS", "REQUIRETLS"),
    ],
)
def test_unsupported_mail_parameter(params, keyword):
    assert reply_of(parse_mail, "FROM:<a@x.example> " + params) == unsupported(keyword)


@pytest.mark.parametrize(
    "params, keyword",
    [
        ("SIZE=1", "SIZE"),
        ("BODY=8BITMIME", "BODY"),
        ("SMTPUTF8", "SMTPUTF8"),
        ("RET=FULL", "RET"),
    ],
)
def test_rcpt_supports_only_the_dsn_parameters(params, keyword):
    assert reply_of(parse_rcpt, "TO:<u@x.example> " + params) == unsupported(keyword)


@pytest.mark.parametrize(
    "params, keyword",
    [
        ("SIZE=1 SIZE=1", "SIZE"),
        ("SIZE=1 size=2", "SIZE"),
        ("BODY=7BIT body=8BITMIME", "BODY"),
        ("SIZE=1 BODY=7BIT SIZE=x", "SIZE"),
    ],
)
def test_duplicate_parameter(params, keyword):
    assert reply_of(parse_mail, "FROM:<a@x.example> " + params) == duplicate(keyword)


def test_parameters_after_quoted_local_part_with_spaces_and_brackets():
    assert parse_mail('FROM:<"a > b"@x.example> SIZE=7') == (
        Address('"a > b"', "x.example"),
        {"SIZE": 7},
    )


def test_parameters_after_postmaster():
    assert reply_of(parse_rcpt, "TO:<Postmaster> X=1") == unsupported("X")


def test_path_checked_before_parameters():
    assert reply_of(parse_mail, "FROM:<a..b@x.example> X=1") == BAD_SENDER


# ---------------------------------------------------------------------------------------------
# EHLO / HELO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("mail.example.com", "mail.example.com"),
        ("Mail.Example.COM", "Mail.Example.COM"),
        (" mail.example.com ", "mail.example.com"),
        ("localhost", "localhost"),
        ("DESKTOP-AB12CD", "DESKTOP-AB12CD"),
        ("my_pc.corp.example", "my_pc.corp.example"),
        ("_dmarc.example", "_dmarc.example"),
        ("host_.example", "host_.example"),
        ("192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]"),
        ("[ipv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
        ("d" * 63 + ".example", "d" * 63 + ".example"),
    ],
)
def test_valid_helo(arg, expected):
    assert parse_helo(arg) == expected


@pytest.mark.parametrize("arg", ["", " ", "   "])
def test_helo_required(arg):
    assert reply_of(parse_helo, arg) == Reply(501, "5.5.4", "Syntax: EHLO hostname")


@pytest.mark.parametrize(
    "arg",
    [
        "host\x00",
        "host\r\nX-Injected: yes",
        "host\tname",
        "\x7f",
        "host\x1b",
    ],
)
def test_helo_control_characters(arg):
    assert reply_of(parse_helo, arg) == INVALID_CHARACTER


@pytest.mark.parametrize(
    "arg",
    [
        "host name",
        "host.example (spoofed)",
        "host(x)",
        "host;by=x",
        "host.example;",
        '"host"',
        "'host'",
        "host.example.",
        ".host.example",
        "host..example",
        "-host.example",
        "host-.example",
        "host@example",
        "<host.example>",
        "h\u00f6st.example",
        "host/example",
        "host:25",
        "[192.0.2.256]",
        "[192.0.2.1",
        "192.0.2.1]",
        "[]",
        "[IPv6:fe80::1%eth0]",
        "[x-tag:content]",  # general literals carry header-unsafe characters: not for EHLO
        "[tag:(x);]",
        "[192.0.2.\u00b9]",
        "d" * 64 + ".example",
        _long_domain(256),
    ],
)
def test_invalid_helo(arg):
    assert reply_of(parse_helo, arg) == Reply(501, "5.5.4", "Invalid EHLO hostname")


def test_helo_replies_name_the_verb():
    assert reply_of(lambda a: parse_helo(a, "HELO"), "") == Reply(
        501, "5.5.4", "Syntax: HELO hostname"
    )
    assert reply_of(lambda a: parse_helo(a, "HELO"), "a b") == Reply(
        501, "5.5.4", "Invalid HELO hostname"
    )


def test_helo_accepts_255_octet_domain():
    assert parse_helo(_long_domain(255)) == _long_domain(255)


# ---------------------------------------------------------------------------------------------
# The error carries the reply; latin-1 decoded wire bytes behave as documented.
# ---------------------------------------------------------------------------------------------


def test_reply_error_renders_the_reply():
    with pytest.raises(ReplyError) as info:
        parse_rcpt("TO:<>")
    assert str(info.value) == "501 5.1.3 Bad recipient address syntax"


def test_latin1_decoded_utf8_address():
    wire = "MAIL FROM:<j\u00f6rg@x.example>".encode("utf-8").decode("latin-1")
    assert reply_of(parse_mail, wire[len("MAIL ") :]) == NON_ASCII


def test_quadratic_inputs_are_cheap():
    # a long label just past the path limit must be refused by length, not by regex effort
    assert reply_of(parse_mail, "FROM:<a@%s!>" % ("a" * 100000,)) == BAD_SENDER
    assert reply_of(parse_helo, "a" * 100000 + "!") == Reply(
        501, "5.5.4", "Invalid EHLO hostname"
    )
