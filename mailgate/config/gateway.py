"""
[gateway], [limits] and [dns]: the gateway's own name and domains, the per-connection limits
(which a listener may override) and the resolver.
"""

import socket

import attr

from mailgate.config.schema import Key, _plain
from mailgate.config.types import (DomainList, Duration, HeaderPatternList, Hostname, Int,
                                   NameserverList, Size, _hostname)


@attr.s(frozen=True, slots=True)
class Limits:
    max_auth_failures = attr.ib(default=3)
    max_errors = attr.ib(default=10)
    command_timeout = attr.ib(default=300.0)
    data_timeout = attr.ib(default=600.0)
    session_timeout = attr.ib(default=1800.0)


@attr.s(frozen=True, slots=True)
class GatewayConfig:
    hostname = attr.ib()
    accepted_domains = attr.ib(default=())  # tuple of lower-case str
    max_message_size = attr.ib(default=35 * 1024 * 1024)
    strip_headers = attr.ib(default=())  # more header names (or "prefix*") the firewall removes


@attr.s(frozen=True, slots=True)
class DNSConfig:
    nameservers = attr.ib(default=())  # tuple of (ip str, port int); empty: the system's resolv.conf
    timeout = attr.ib(default=5.0)


def _default_hostname(values, built):
    name = socket.getfqdn()
    try:
        return _hostname(name)
    except ValueError:
        raise ValueError("not set, and this machine's name %r is not a valid hostname" % name)


GATEWAY_KEYS = {
    "hostname": Key(
        Hostname(), _default_hostname,
        default_doc="the machine's fully qualified name (`socket.getfqdn()`)",
        doc="The name the gateway uses for itself: the SMTP greeting, EHLO and `Received:` "
        "headers.  Set it to the name the MX record points to.",
        example="mx1.example.com",
    ),
    "accepted_domains": Key(
        DomainList(), "",
        doc="The domains mail is accepted for from anyone (inbound mail).  Exact domains: "
        "`example.com` does not include `sub.example.com`.  An internationalised domain may be "
        "written either way (`bücher.example` is `xn--bcher-kva.example`).  Mail to other domains is relayed "
        "only for authenticated users and `relay_ips`.",
        example="example.com, example.org",
    ),
    "max_message_size": Key(
        Size(), "35M",
        doc="The largest message accepted (announced with EHLO `SIZE`); the default for every "
        "listener's `max_message_size`.",
        example="50M",
    ),
    "strip_headers": Key(
        HeaderPatternList(), "",
        doc="More header fields the header firewall (a listener's `header_firewall`) removes "
        "from mail received from the internet, besides Exchange's `X-MS-Exchange-Organization-*`, "
        "`X-MS-Exchange-Forest-*` and `X-MS-Exchange-Transport-*`: names, or prefixes ending in "
        "`*`.",
        example="X-MS-Has-Attach, X-Contoso-Internal-*",
    ),
}

LIMITS_KEYS = {
    "max_auth_failures": Key(
        Int(1), "3", doc="Failed AUTH attempts before the connection is closed.", example="5"
    ),
    "max_errors": Key(
        Int(1), "10", doc="Bad or out-of-order commands before the connection is closed.",
        example="20",
    ),
    "command_timeout": Key(
        Duration(), "5m",
        doc="How long to wait for the client's next command (RFC 5321 asks for at least 5 "
        "minutes).",
        example="10m",
    ),
    "data_timeout": Key(
        Duration(), "10m", doc="How long to wait for more of the message during DATA.",
        example="15m",
    ),
    "session_timeout": Key(
        Duration(), "30m",
        doc="The total time a connection may stay open however active it is: the guard against "
        "clients that trickle bytes to hold connections (slowloris).",
        example="1h",
    ),
}

DNS_KEYS = {
    "nameservers": Key(
        NameserverList(), "",
        default_doc="empty: the system's resolver (`/etc/resolv.conf`)",
        doc="The DNS servers to ask, in order.  The port defaults to 53; an IPv6 address is "
        "written bare (`::1`, port 53) or in brackets with a port (`[::1]:5353`).  Addresses "
        "only, no names.",
        example="127.0.0.1, [2001:db8::53]:5353",
    ),
    "timeout": Key(
        Duration(), "5s",
        doc="How long to wait for an answer; a query that times out is a temporary failure, and "
        "the delivery is retried.",
        example="10s",
    ),
}

GATEWAY = _plain("gateway", GatewayConfig, GATEWAY_KEYS)
LIMITS = _plain("limits", Limits, LIMITS_KEYS)
DNS = _plain("dns", DNSConfig, DNS_KEYS)
