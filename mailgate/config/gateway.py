"""
[gateway], [limits] and [dns]: the gateway's own name and domains, the per-connection limits
(which a listener may override) and the resolver.
"""

import socket

import attr

from mailgate.config.schema import Key, _plain
import ipaddress

from mailgate.config.types import (RELAY_IPS, Bool, DomainList, Duration, ExemptList,
                                   HeaderPatternList, Hostname, Int, NameserverList, ProcessCount,
                                   Rate, RateLimit, Size, Text, _hostname)


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@attr.s(frozen=True, slots=True)
class Limits:
    """
    A listener's limits: per session (the first five) and across sessions (counted by
    mailgate.smtp.anvil; rates are config.types.Rate or None for no limit; 0 turns a count off).
    """

    max_auth_failures = attr.ib(default=3)
    max_errors = attr.ib(default=10)
    command_timeout = attr.ib(default=300.0)
    data_timeout = attr.ib(default=600.0)
    session_timeout = attr.ib(default=1800.0)
    max_connections = attr.ib(default=1000)
    max_connections_per_ip = attr.ib(default=20)
    connection_rate_per_ip = attr.ib(default=Rate(60, 60.0))
    message_rate_per_ip = attr.ib(default=None)
    recipient_rate_per_ip = attr.ib(default=None)
    message_rate_per_user = attr.ib(default=None)
    recipient_rate_per_user = attr.ib(default=None)
    limit_exempt_ips = attr.ib(default=(RELAY_IPS,) + _LOOPBACK)
    limit_exempt_authenticated = attr.ib(default=False)
    max_auth_failures_per_ip = attr.ib(default=10)
    max_auth_failures_per_user = attr.ib(default=20)
    auth_failure_window = attr.ib(default=600.0)
    auth_failure_delay = attr.ib(default=1.0)
    greet_delay = attr.ib(default=0.0)
    max_received_headers = attr.ib(default=50)
    min_data_rate = attr.ib(default=0)


@attr.s(frozen=True, slots=True)
class GatewayConfig:
    hostname = attr.ib()
    accepted_domains = attr.ib(default=())  # tuple of lower-case str
    max_message_size = attr.ib(default=35 * 1024 * 1024)
    workers = attr.ib(default=0)  # 0: auto
    user = attr.ib(default=None)  # drop to this user (name or uid) once the listeners are bound
    group = attr.ib(default=None)  # and this group; None: the user's primary group
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
    "workers": Key(
        ProcessCount(), "auto",
        doc="How many processes receive mail: `auto` is one a CPU.  With more than one, the "
        "main process binds the listeners, recovers the queue, delivers and serves the admin "
        "socket and `/metrics`, and the receiver processes accept on the listeners' sockets "
        "(each writes the messages it accepts to the queue itself, before its 250); with `1`, "
        "one process does everything.  A gateway embedded in another Twisted program "
        "(`Gateway.from_config`) is always one process.",
        example="4",
    ),
    "user": Key(
        Text(), "",
        default_doc="not set: keep the user mailgate was started as",
        doc="Started as root (to bind ports 25, 465 and 587), switch to this user (a name or a "
        "number) once the listeners are bound.  The spool and log directories are handed to "
        "it; the TLS key and the users file must stay readable by it or by `group` (0640).  "
        "twistd's `--uid`/`--gid` do the same.",
        example="mailgate",
    ),
    "group": Key(
        Text(), "",
        default_doc="the user's primary group",
        doc="The group to switch to with `user` (a name or a number).",
        example="mailgate",
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
    # Across sessions: counted in memory on each node, shared by its receiver processes
    # (mailgate.smtp.anvil).
    "max_connections": Key(
        Int(0), "1000",
        doc="Open connections of the whole gateway (all listeners together) above which a new "
        "one on this listener gets `421 4.7.0 <hostname> Too many connections`; `0` for no "
        "limit.  A listener may set a higher value to stay reachable when another is flooded.",
        example="5000",
    ),
    "max_connections_per_ip": Key(
        Int(0), "20",
        doc="Open connections from one client address (an IPv6 client: its /64) at most; more "
        "get `421 4.7.0 <hostname> Too many connections`.  `0` for no limit.",
        example="50",
    ),
    "connection_rate_per_ip": Key(
        RateLimit(), "60/1m",
        doc="New connections from one address (IPv6: /64) per time (a token bucket: the count "
        "at once, then refilled evenly); over it `421 4.7.0`.",
        example="300/1m",
    ),
    "message_rate_per_ip": Key(
        RateLimit(), "",
        doc="Messages (MAIL commands) from one address (IPv6: /64) per time; over it MAIL gets "
        "`450 4.7.1`.",
        example="100/1h",
    ),
    "recipient_rate_per_ip": Key(
        RateLimit(), "",
        doc="Recipients (RCPT commands, accepted or not) from one address (IPv6: /64) per time; "
        "over it RCPT gets `450 4.7.1`.",
        example="1000/1h",
    ),
    "message_rate_per_user": Key(
        RateLimit(), "",
        doc="Messages per authenticated user (from any address) per time; over it `450 4.7.1`.",
        example="200/1h",
    ),
    "recipient_rate_per_user": Key(
        RateLimit(), "",
        doc="Recipients per authenticated user (from any address) per time; over it "
        "`450 4.7.1`.",
        example="2000/1d",
    ),
    "limit_exempt_ips": Key(
        ExemptList(), "relay_ips, 127.0.0.0/8, ::1",
        doc="Clients none of the limits across sessions apply to (connections and rates per "
        "address, failed-login counts, `greet_delay`) except `max_connections`.  The word "
        "`relay_ips` stands for the listener's `relay_ips` (your Exchange servers); empty: "
        "nobody is exempt.",
        example="relay_ips, 10.0.0.0/8",
    ),
    "limit_exempt_authenticated": Key(
        Bool(), "no",
        doc="`yes`: authenticated sessions are not counted by `message_rate_per_ip` and "
        "`recipient_rate_per_ip` (many users behind one NAT address); the per-user rates still "
        "apply.",
        example="yes",
    ),
    "max_auth_failures_per_ip": Key(
        Int(0), "10",
        doc="Failed AUTH attempts from one address (IPv6: /64), in all its sessions, within "
        "`auth_failure_window`; past it AUTH gets `454 4.7.0 Too many failed authentications, "
        "try later` without the password being checked, until the window has passed.  `0` for "
        "no limit.",
        example="5",
    ),
    "max_auth_failures_per_user": Key(
        Int(0), "20",
        doc="Failed AUTH attempts for one username from all addresses within "
        "`auth_failure_window` (credential stuffing); past it AUTH for that name gets `454 "
        "4.7.0`.  `0` for no limit.",
        example="50",
    ),
    "auth_failure_window": Key(
        Duration(), "10m", doc="The window the failed AUTH attempts are counted in.",
        example="1h",
    ),
    "auth_failure_delay": Key(
        Duration(positive=False), "1s",
        doc="How long after a failed AUTH began its `535` reply is sent (this session only "
        "waits); unknown users and wrong passwords take the same time.",
        example="3s",
    ),
    "greet_delay": Key(
        Duration(positive=False), "0",
        doc="Wait this long before the banner (Postfix's postscreen uses a few seconds): a "
        "client that talks before the banner gets `554 5.5.0 Protocol error` and is closed.  "
        "Clients in `limit_exempt_ips` are greeted at once.",
        example="3s",
    ),
    "max_received_headers": Key(
        Int(1), "50",
        doc="A message with more `Received:` headers than this is refused with `554 5.4.6 Too "
        "many hops (mail loop)`.",
        example="30",
    ),
    "min_data_rate": Key(
        Int(0), "0",
        doc="The slowest DATA a client may send, in bytes per second (checked every 10 seconds "
        "of DATA); slower: `421 4.4.2` and the connection is closed.  `0`: off.",
        example="100",
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

def _check_gateway(values):
    if values["group"] is not None and values["user"] is None:
        return "group", "set, but user is not (the group is what user switches to)"
    return None


GATEWAY = _plain("gateway", GatewayConfig, GATEWAY_KEYS, _check_gateway)
LIMITS = _plain("limits", Limits, LIMITS_KEYS)
DNS = _plain("dns", DNSConfig, DNS_KEYS)
