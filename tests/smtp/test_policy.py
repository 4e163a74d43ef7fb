"""Tests for mailgate.smtp.policy: connection, sender and relay decisions."""

import ipaddress

import attr
import pytest

from mailgate.smtp.address import parse_rcpt
from mailgate.config import GatewayConfig, ListenerConfig
from mailgate.envelope import Address, Reply
from mailgate.smtp.policy import (
    banner_reply,
    client_allowed,
    denied_banner_reply,
    ip_in,
    may_relay,
    recipient_reply,
    sender_reply,
)


def nets(*cidrs):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def listener(allowed_ips=(), relay_ips=()):
    return ListenerConfig(
        name="mx",
        endpoint="tcp:25",
        role="relay",
        tls="optional",
        auth="none",
        allowed_ips=nets(*allowed_ips),
        relay_ips=nets(*relay_ips),
    )


GATEWAY = GatewayConfig(
    hostname="mx.accepted.example", accepted_domains=("accepted.example", "other.example")
)


@attr.s
class FakeUser:
    name = attr.ib()
    owned = attr.ib(default=())

    def may_send_as(self, address):
        return address in self.owned


# ---------------------------------------------------------------------------------------------
# ip_in
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "networks, ip, expected",
    [
        (("192.0.2.0/24",), "192.0.2.1", True),
        (("192.0.2.0/24",), "192.0.2.255", True),
        (("192.0.2.0/24",), "192.0.3.1", False),
        (("192.0.2.7/32",), "192.0.2.7", True),
        (("192.0.2.7/32",), "192.0.2.8", False),
        (("10.0.0.0/8", "192.0.2.0/24"), "10.1.2.3", True),
        ((), "192.0.2.1", False),
        (("0.0.0.0/0",), "203.0.113.9", True),
        (("0.0.0.0/0",), "2001:db8::1", False),
        (("::/0",), "192.0.2.1", False),
        (("2001:db8::/32",), "2001:db8::1", True),
        (("2001:db8::/32",), "2001:DB8:0:0::1", True),
        (("2001:db8::/32",), "2001:db9::1", False),
        (("fe80::/10",), "fe80::1%eth0", True),
        # IPv4-mapped IPv6 (dual-stack sockets) is the IPv4 address
        (("192.0.2.0/24",), "::ffff:192.0.2.1", True),
        (("192.0.2.0/24",), "::FFFF:192.0.2.1", True),
        (("192.0.2.0/24",), "::ffff:c000:201", True),
        (("192.0.2.0/24",), "::ffff:192.0.3.1", False),
        (("127.0.0.0/8",), "::ffff:127.0.0.1", True),
        (("0.0.0.0/32",), "::ffff:0.0.0.0", True),
        # ... and an IPv4-mapped network matches the IPv4 address too
        (("::ffff:192.0.2.0/120",), "192.0.2.1", True),
        (("::ffff:192.0.2.0/120",), "::ffff:192.0.2.1", True),
        (("::ffff:192.0.2.0/120",), "192.0.3.1", False),
        (("::ffff:0:0/96",), "203.0.113.9", True),
        (("::ffff:0:0/96",), "2001:db8::1", False),
        # ::/0 means "every IPv6 address": an IPv4 client is not in it, however it is reported
        (("::/0",), "::ffff:192.0.2.1", False),
        # not mapped: ::192.0.2.1 (IPv4-compatible, deprecated) and NAT64 are not the IPv4 address
        (("192.0.2.0/24",), "::192.0.2.1", False),
        (("192.0.2.0/24",), "64:ff9b::192.0.2.1", False),
        # v4 and v6 integers never meet: 0.0.0.1 is not ::1
        (("::/96",), "0.0.0.1", False),
        (("0.0.0.0/8",), "::1", False),
        # garbage is in nothing
        (("0.0.0.0/0", "::/0"), "", False),
        (("0.0.0.0/0", "::/0"), "not an ip", False),
        (("0.0.0.0/0", "::/0"), "192.0.2.256", False),
        (("0.0.0.0/0", "::/0"), "192.0.2.1/24", False),
        (("0.0.0.0/0", "::/0"), "[192.0.2.1]", False),
        (("0.0.0.0/0", "::/0"), " 192.0.2.1", False),
        (("0.0.0.0/0", "::/0"), "unix:/tmp/sock", False),
        (("0.0.0.0/0", "::/0"), None, False),
    ],
)
def test_ip_in(networks, ip, expected):
    assert ip_in(nets(*networks), ip) is expected


# ---------------------------------------------------------------------------------------------
# client_allowed / may_relay
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "allowed, ip, expected",
    [
        ((), "192.0.2.1", True),
        ((), "2001:db8::1", True),
        ((), "garbage", True),
        (("192.0.2.0/24",), "192.0.2.1", True),
        (("192.0.2.0/24",), "::ffff:192.0.2.1", True),
        (("192.0.2.0/24",), "198.51.100.1", False),
        (("192.0.2.0/24",), "garbage", False),
        (("192.0.2.0/24", "2001:db8::/32"), "2001:db8::5", True),
    ],
)
def test_client_allowed(allowed, ip, expected):
    assert client_allowed(listener(allowed_ips=allowed), ip) is expected


@pytest.mark.parametrize(
    "relay, ip, authenticated, expected",
    [
        ((), "192.0.2.1", False, False),
        ((), "192.0.2.1", True, True),
        ((), "127.0.0.1", False, False),  # loopback is not trusted unless listed
        (("192.0.2.0/24",), "192.0.2.1", False, True),
        (("192.0.2.0/24",), "::ffff:192.0.2.1", False, True),
        (("::ffff:192.0.2.0/120",), "192.0.2.1", False, True),
        (("192.0.2.0/24",), "198.51.100.1", False, False),
        (("192.0.2.0/24",), "198.51.100.1", True, True),
        (("192.0.2.0/24",), "garbage", False, False),
    ],
)
def test_may_relay(relay, ip, authenticated, expected):
    assert may_relay(listener(relay_ips=relay), ip, authenticated) is expected


def test_allowed_ips_do_not_grant_relay():
    assert not may_relay(listener(allowed_ips=("192.0.2.0/24",)), "192.0.2.1", False)


# ---------------------------------------------------------------------------------------------
# sender_reply
# ---------------------------------------------------------------------------------------------


def test_unauthenticated_sender_is_not_checked():
    assert sender_reply(None, Address("anyone", "anywhere.example")) is None
    assert sender_reply(None, Address("", "")) is None


def test_owned_sender():
    user = FakeUser("bob", owned=("bob@accepted.example",))
    assert sender_reply(user, Address("bob", "accepted.example")) is None


def test_not_owned_sender():
    user = FakeUser("bob", owned=("bob@accepted.example",))
    assert sender_reply(user, Address("alice", "accepted.example")) == Reply(
        553, "5.7.1", "Sender address rejected: <alice@accepted.example> not owned by user bob"
    )


def test_null_sender_for_authenticated_user():
    assert sender_reply(FakeUser("bob", owned=("",)), Address("", "")) is None
    assert sender_reply(FakeUser("bob"), Address("", "")) == Reply(
        553, "5.7.1", "Sender address rejected: <> not owned by user bob"
    )


def test_sender_is_asked_about_the_string_form():
    asked = []

    class Recorder:
        name = "bob"

        def may_send_as(self, address):
            asked.append(address)
            return True

    sender_reply(Recorder(), Address('"a b"', "x.example"))
    sender_reply(Recorder(), Address("", ""))
    assert asked == ['"a b"@x.example', ""]


# ---------------------------------------------------------------------------------------------
# recipient_reply: the open-relay question
# ---------------------------------------------------------------------------------------------


def denied(text):
    return Reply(554, "5.7.1", "%s: Relay access denied" % (text,))


def rcpt(arg):
    return parse_rcpt("TO:" + arg)[0]


STRANGER = "198.51.100.7"

RELAY_TABLE = [
    # accepted domains, exactly, any case
    ("<user@accepted.example>", None),
    ("<user@ACCEPTED.Example>", None),
    ("<User.Name+tag@other.example>", None),
    ('<"user"@accepted.example>', None),
    ('<"a b"@accepted.example>', None),
    ("<Postmaster>", None),
    ("<postmaster>", None),
    ("<postmaster@accepted.example>", None),
    # other domains, subdomains and look-alikes
    ("<user@evil.com>", denied("<user@evil.com>")),
    ("<user@sub.accepted.example>", denied("<user@sub.accepted.example>")),
    ("<user@accepted.example.evil.com>", denied("<user@accepted.example.evil.com>")),
    ("<user@notaccepted.example>", denied("<user@notaccepted.example>")),
    ("<user@example>", denied("<user@example>")),
    ("<postmaster@evil.com>", denied("<postmaster@evil.com>")),
    # routing tricks in the local part never make us relay
    ("<user%evil.com@accepted.example>", denied("<user%evil.com@accepted.example>")),
    ("<evil.com!user@accepted.example>", denied("<evil.com!user@accepted.example>")),
    ('<"user@evil.com"@accepted.example>', denied('<"user@evil.com"@accepted.example>')),
    ('<"user%evil.com"@accepted.example>', denied("<user%evil.com@accepted.example>")),
    ('<"evil.com!user"@accepted.example>', denied("<evil.com!user@accepted.example>")),
    ('<"user\\@evil.com"@accepted.example>', denied('<"user@evil.com"@accepted.example>')),
    ("<%@accepted.example>", denied("<%@accepted.example>")),
    # a source route is dropped: the decision is on the final mailbox
    ("<@accepted.example:user@evil.com>", denied("<user@evil.com>")),
    ("<@a.example,@accepted.example:user@evil.com>", denied("<user@evil.com>")),
    ("<@evil.com:user@accepted.example>", None),
    # address literals are never ours, even our own address
    ("<user@[127.0.0.1]>", denied("<user@[127.0.0.1]>")),
    ("<user@[192.0.2.1]>", denied("<user@[192.0.2.1]>")),
    ("<user@[IPv6:::1]>", denied("<user@[IPv6:::1]>")),
    ("<user@[x-accepted:accepted.example]>", denied("<user@[x-accepted:accepted.example]>")),
]


@pytest.mark.parametrize("arg, expected", RELAY_TABLE)
def test_recipient_from_stranger(arg, expected):
    assert recipient_reply(listener(), GATEWAY, STRANGER, False, rcpt(arg)) == expected


@pytest.mark.parametrize("arg, expected", RELAY_TABLE)
def test_recipient_from_stranger_in_allowed_ips(arg, expected):
    mx = listener(allowed_ips=(STRANGER + "/32",))
    assert recipient_reply(mx, GATEWAY, STRANGER, False, rcpt(arg)) == expected


@pytest.mark.parametrize("arg", [arg for arg, _ in RELAY_TABLE])
def test_authenticated_client_relays_anywhere(arg):
    assert recipient_reply(listener(), GATEWAY, STRANGER, True, rcpt(arg)) is None


@pytest.mark.parametrize(
    "relay_ips, ip",
    [
        (("192.0.2.0/24",), "192.0.2.10"),
        (("192.0.2.0/24",), "::ffff:192.0.2.10"),
        (("::ffff:192.0.2.0/120",), "192.0.2.10"),
        (("2001:db8::/32",), "2001:db8::25"),
    ],
)
@pytest.mark.parametrize("arg", ["<user@evil.com>", "<user%evil.com@accepted.example>"])
def test_relay_ips_relay_anywhere(relay_ips, ip, arg):
    assert recipient_reply(listener(relay_ips=relay_ips), GATEWAY, ip, False, rcpt(arg)) is None


@pytest.mark.parametrize("ip", ["::ffff:198.51.100.10", "198.51.100.10", "2001:db9::1", "junk"])
def test_outside_relay_ips_is_refused(ip):
    mx = listener(relay_ips=("192.0.2.0/24", "2001:db8::/32"))
    assert recipient_reply(mx, GATEWAY, ip, False, rcpt("<u@evil.com>")) == denied("<u@evil.com>")


def test_accepted_domains_compared_case_insensitively_even_if_configured_in_upper_case():
    gateway = GatewayConfig(hostname="mx", accepted_domains=("Accepted.EXAMPLE",))
    address = rcpt("<u@accepted.example>")
    assert recipient_reply(listener(), gateway, STRANGER, False, address) is None


def test_no_accepted_domains_accepts_only_postmaster():
    gateway = GatewayConfig(hostname="mx")
    mx = listener()
    assert recipient_reply(mx, gateway, STRANGER, False, rcpt("<Postmaster>")) is None
    assert recipient_reply(mx, gateway, STRANGER, False, rcpt("<u@x.example>")) == denied(
        "<u@x.example>"
    )


def test_null_recipient_is_never_local():
    assert recipient_reply(listener(), GATEWAY, STRANGER, False, Address("", "")) == denied("<>")


# ---------------------------------------------------------------------------------------------
# Banners
# ---------------------------------------------------------------------------------------------


def test_banner_reply():
    reply = banner_reply("mx.accepted.example")
    assert reply == Reply(220, "", "mx.accepted.example ESMTP")
    assert reply.lines() == [b"220 mx.accepted.example ESMTP"]


def test_denied_banner_reply():
    reply = denied_banner_reply("mx.accepted.example")
    assert reply == Reply(554, "5.7.1", "mx.accepted.example Access denied")
    assert reply.lines() == [b"554 5.7.1 mx.accepted.example Access denied"]
