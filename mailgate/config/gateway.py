"""
[gateway], [limits] and [dns]: the gateway's own name and domains, the per-connection limits
(which a listener may override) and the resolver.
"""

import socket

import attr

from mailgate.config.schema import Key, _plain
from mailgate.config.types import (DomainList, Duration, Hostname, Int, NameserverList, Size,
                                   _hostname)


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
    "hostname": Key(Hostname(), _default_hostname),
    "accepted_domains": Key(DomainList(), ""),
    "max_message_size": Key(Size(), "35M"),
}

LIMITS_KEYS = {
    "max_auth_failures": Key(Int(1), "3"),
    "max_errors": Key(Int(1), "10"),
    "command_timeout": Key(Duration(), "5m"),
    "data_timeout": Key(Duration(), "10m"),
    "session_timeout": Key(Duration(), "30m"),
}

DNS_KEYS = {
    "nameservers": Key(NameserverList(), ""),
    "timeout": Key(Duration(), "5s"),
}

GATEWAY = _plain("gateway", GatewayConfig, GATEWAY_KEYS)
LIMITS = _plain("limits", Limits, LIMITS_KEYS)
DNS = _plain("dns", DNSConfig, DNS_KEYS)
