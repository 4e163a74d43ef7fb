"""
[listener:NAME], [tls] and [auth]: where mail comes in, and what a client must show there (TLS
certificate, SMTP AUTH users).  A listener's defaults come from [gateway] and [limits].
"""

import attr

from mailgate.config.gateway import LIMITS_KEYS, Limits
from mailgate.config.schema import Key, Section, _inherit, _plain
from mailgate.config.types import (BUILTIN_FILTERS, Bool, Choice, Endpoint, FilterList, Int,
                                   NetworkList, Path, Size)

DEFAULT_FILTERS = {"relay": BUILTIN_FILTERS, "submission": ("attachments",)}


@attr.s(frozen=True, slots=True)
class TLSConfig:
    certificate = attr.ib(default=None)
    private_key = attr.ib(default=None)
    min_version = attr.ib(default="TLSv1.2")  # "TLSv1.2" or "TLSv1.3"
    generate_self_signed = attr.ib(default=False)
    ca_file = attr.ib(default=None)  # trust store for outbound "verify" (None: the system's)


@attr.s(frozen=True, slots=True)
class AuthConfig:
    users_file = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class ListenerConfig:
    name = attr.ib()
    endpoint = attr.ib()
    role = attr.ib()  # "submission" | "relay"
    tls = attr.ib()  # "none" | "optional" | "required" | "implicit"
    auth = attr.ib()  # "none" | "optional" | "required"
    allowed_ips = attr.ib(default=())  # empty tuple: every address
    relay_ips = attr.ib(default=())
    max_message_size = attr.ib(default=35 * 1024 * 1024)
    max_recipients = attr.ib(default=100)
    limits = attr.ib(factory=Limits)
    # Filter names in order: built-in ("spf", "dkim", "dmarc", "attachments") or dotted paths.
    # Default: spf, dkim, dmarc, attachments for relay; attachments for submission.
    filters = attr.ib(default=("attachments",))


def _by_role(submission, relay):
    return lambda values, built: submission if values["role"] == "submission" else relay


TLS_KEYS = {
    "certificate": Key(Path(), ""),
    "private_key": Key(Path(), ""),
    "min_version": Key(Choice(("TLSv1.2", "TLSv1.3")), "TLSv1.2"),
    "generate_self_signed": Key(Bool(), "no"),
    "ca_file": Key(Path(), ""),
}

AUTH_KEYS = {
    "users_file": Key(Path(), ""),
}

LISTENER_KEYS = {
    "endpoint": Key(Endpoint()),
    "role": Key(Choice(("submission", "relay"))),
    "tls": Key(
        Choice(("none", "optional", "required", "implicit")), _by_role("required", "optional")
    ),
    "auth": Key(Choice(("none", "optional", "required")), _by_role("required", "optional")),
    "allowed_ips": Key(NetworkList(), ""),
    "relay_ips": Key(NetworkList(), ""),
    "max_message_size": Key(Size(), _inherit("gateway", "max_message_size")),
    "max_recipients": Key(Int(1), "100"),
    "filters": Key(FilterList(), lambda values, built: DEFAULT_FILTERS[values["role"]]),
}
LISTENER_KEYS.update(
    {key: Key(spec.kind, _inherit("limits", key)) for key, spec in LIMITS_KEYS.items()}
)


def _build_listener(name, values):
    limits = Limits(**{key: values.pop(key) for key in LIMITS_KEYS})
    return ListenerConfig(name=name, limits=limits, **values)


def _flatten_listener(listener):
    values = attr.asdict(listener, recurse=False)
    values.update(attr.asdict(values.pop("limits")))
    return values.pop("name"), values


def _check_listener(values):
    if values["auth"] == "required" and values["tls"] == "none":
        return "auth", "auth = required needs tls"
    return None


TLS = _plain("tls", TLSConfig, TLS_KEYS)
AUTH = _plain("auth", AuthConfig, AUTH_KEYS)
LISTENER = Section(
    "listeners", LISTENER_KEYS, _build_listener, _flatten_listener, _check_listener, named=True
)
