"""
[listener:NAME], [tls] and [auth]: where mail comes in, and what a client must show there (TLS
certificate, SMTP AUTH users).  A listener's defaults come from [gateway] and [limits].
"""

import attr

from mailgate.config.gateway import LIMITS_KEYS, Limits
from mailgate.config.schema import Key, Section, _inherit, _plain
from mailgate.config.types import (BUILTIN_FILTERS, Bool, Choice, ChoiceList, DomainList,
                                   Endpoint, FilterList, Int, NetworkList, Path, Size,
                                   proxied_endpoint)

DEFAULT_FILTERS = {"relay": BUILTIN_FILTERS, "submission": ("attachments",)}


@attr.s(frozen=True, slots=True)
class TLSConfig:
    certificate = attr.ib(default=None)
    private_key = attr.ib(default=None)
    min_version = attr.ib(default="TLSv1.2")  # "TLSv1.2" or "TLSv1.3"
    generate_self_signed = attr.ib(default=False)
    ca_file = attr.ib(default=None)  # trust store for outbound "verify" (None: the system's)
    client_ca_file = attr.ib(default=None)  # the CAs client certificates must chain to


@attr.s(frozen=True, slots=True)
class AuthConfig:
    users_file = attr.ib(default=None)
    backend = attr.ib(default=("file",))  # "file" and/or "ldap", in the order asked


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
    backlog = attr.ib(default=1024)
    limits = attr.ib(factory=Limits)
    # Filter names in order: built-in ("spf", "dkim", "dmarc", "attachments") or dotted paths.
    # Default: spf, dkim, dmarc, attachments for relay; attachments for submission.
    filters = attr.ib(default=("attachments",))
    recipients = attr.ib(default="any")  # "any" | "ldap": RCPT to an accepted domain looked up
    header_firewall = attr.ib(default=False)  # strip Exchange's internal headers on the way in
    relay_client_certs = attr.ib(default=())  # names a trusted client certificate may carry
    # With a haproxy: endpoint: the load balancers that may send a PROXY header.
    proxy_from = attr.ib(default=())


def _by_role(submission, relay):
    return lambda values, built: submission if values["role"] == "submission" else relay


TLS_KEYS = {
    "certificate": Key(
        Path(), "",
        doc="The certificate, PEM, full chain: the server certificate first, then the "
        "intermediates.  Required when any listener has `tls` other than `none`.",
        example="/etc/letsencrypt/live/mx1.example.com/fullchain.pem",
    ),
    "private_key": Key(
        Path(), "",
        doc="The certificate's private key, PEM.  Required with `certificate`.",
        example="/etc/letsencrypt/live/mx1.example.com/privkey.pem",
    ),
    "min_version": Key(
        Choice(("TLSv1.2", "TLSv1.3")), "TLSv1.2", doc="The oldest TLS version offered.",
        example="TLSv1.3",
    ),
    "generate_self_signed": Key(
        Bool(), "no",
        doc="**For trying mailgate out only.**  When `yes` and the files do not exist, a "
        "self-signed certificate for `hostname` is generated at start-up and written to "
        "`certificate` and `private_key`.  No client will trust it.",
        example="yes",
    ),
    "ca_file": Key(
        Path(), "",
        default_doc="not set: the system's trust store",
        doc="The CA certificates (a PEM bundle) trusted when delivering by a route with "
        "`tls = verify`.  It must exist and be readable when set.",
        example="/etc/mailgate/corp-ca.pem",
    ),
    "client_ca_file": Key(
        Path(), "",
        doc="The CA certificates (PEM) a client certificate must chain to for a listener's "
        "`relay_client_certs`.  Required when a listener sets `relay_client_certs`; it must "
        "exist and be readable.",
        example="/etc/mailgate/partner-cas.pem",
    ),
}

AUTH_KEYS = {
    "backend": Key(
        ChoiceList(("file", "ldap")), "file",
        doc="Where SMTP AUTH checks passwords: `file` (the `users_file`), `ldap` (a bind as the "
        "user found with `[ldap] user_filter`, over TLS), or both, asked in the order written "
        "until one knows the user.  With both, an LDAP user may also send as the senders the "
        "users file grants it (`mailgate passwd FILE USER --sender ...`, with no password "
        "needed there).",
        example="ldap, file",
    ),
    "users_file": Key(
        Path(), "",
        doc="The users file for SMTP AUTH.  Required when any listener has `auth` other than "
        "`none` and `backend` names `file`; it must exist and be readable.  It is re-read when it changes, so users can be "
        "added without a restart.",
        example="/etc/mailgate/users",
    ),
}

_BY_ROLE = "`%s` for submission, `%s` for relay"

LISTENER_KEYS = {
    "endpoint": Key(
        Endpoint(),
        doc=r"Where to listen.  Types `tcp`, `tcp6`, `unix` and `systemd` only (`tcp:25`, "
        r"`tcp:587:interface=192.0.2.1`, `tcp6:25:interface=\:\:`, "
        r"`unix:/run/mailgate/smtp.sock`, `systemd:domain=INET:index=0`).  `ssl:` is refused: "
        r"write a `tcp:` endpoint and `tls = implicit`.  Two listeners may not have the same "
        r"endpoint.  `haproxy:` before any of them (`haproxy:tcp:25`) is a listener behind a "
        r"load balancer: every connection starts with a PROXY protocol header (v1 or v2) naming "
        r"the real client, which `allowed_ips`, `relay_ips`, limits, logs, `Received:` and SPF "
        r"then see; it needs `proxy_from`.",
    ),
    "role": Key(
        Choice(("submission", "relay")),
        doc="`relay`: mail from other servers (the MX, port 25).  `submission`: mail from your "
        "own users (port 587, or 465 with `tls = implicit`).  It sets the defaults of `tls` and "
        "`auth`.",
    ),
    "tls": Key(
        Choice(("none", "optional", "required", "implicit")), _by_role("required", "optional"),
        default_doc=_BY_ROLE % ("required", "optional"),
        doc="`optional`: STARTTLS is offered.  `required`: STARTTLS must be used before mail is "
        "accepted.  `implicit`: TLS from the first byte (port 465 style).  Anything but `none` "
        "needs `[tls] certificate` and `private_key`.",
        example="implicit",
    ),
    "auth": Key(
        Choice(("none", "optional", "required")), _by_role("required", "optional"),
        default_doc=_BY_ROLE % ("required", "optional"),
        doc="`optional`: AUTH is offered (over TLS).  `required`: no mail without AUTH; needs "
        "`tls` other than `none`.  Anything but `none` needs `[auth] users_file`.",
        example="none",
    ),
    "allowed_ips": Key(
        NetworkList(), "",
        default_doc="empty (everyone)",
        doc="The clients allowed to connect at all; others get a 554 greeting.",
        example="192.0.2.0/24, 2001:db8::/32",
    ),
    "relay_ips": Key(
        NetworkList(), "",
        doc="Clients that may send to any domain without AUTH (for example your own servers).",
        example="127.0.0.0/8, ::1",
    ),
    "proxy_from": Key(
        NetworkList(), "",
        doc="With a `haproxy:` endpoint: the load balancers' addresses, the only peers that may "
        "send a PROXY header; a connection from anywhere else is refused (closed, and logged) "
        "before anything is read from it.  Required with `haproxy:tcp`, `haproxy:tcp6` and "
        "`haproxy:systemd` endpoints; on `haproxy:unix` the socket's file permissions say who "
        "may connect, and it may be left empty.  Not allowed without `haproxy:`.",
        example="10.0.0.5, 10.0.0.6",
    ),
    "max_message_size": Key(
        Size(), _inherit("gateway", "max_message_size"),
        default_doc="`[gateway] max_message_size`",
        doc="The largest message on this listener.",
        example="10M",
    ),
    "max_recipients": Key(
        Int(1), "100",
        doc="Recipients per message; more are refused with a temporary error.",
        example="500",
    ),
    "backlog": Key(
        Int(1), "1024",
        doc="How many connections the kernel may queue for this listener before mailgate "
        "accepts them (the listen backlog; the kernel caps it at `net.core.somaxconn`).  Too "
        "small a queue makes a busy gateway drop connection attempts, and every dropped client "
        "waits a second or more before it tries again.  A `backlog=` written in `endpoint` "
        "wins.",
        example="4096",
    ),
    "filters": Key(
        FilterList(), lambda values, built: DEFAULT_FILTERS[values["role"]],
        default_doc="`%s` for relay, `%s` for submission"
        % tuple(", ".join(DEFAULT_FILTERS[role]) for role in ("relay", "submission")),
        doc="The filters each message on this listener goes through, in this order.  A name is "
        "a built-in filter (%s, any case) or a filter of your own written as the dotted Python "
        "path of its class (`mycompany.filters.Greylist`: letters, digits and `_` in "
        "dot-separated parts, at least two parts; it is imported when mailgate starts, not by "
        "`check-config`).  Each name at most once (`[listener:mx] filters: spf is listed "
        "twice`).  `dmarc` uses the results of `spf` and `dkim` listed before it; without them "
        "it still runs, and every message fails DMARC alignment."
        % ", ".join("`%s`" % name for name in BUILTIN_FILTERS),
        example="spf, dkim, dmarc, attachments, mycompany.filters.Greylist",
    ),
    "recipients": Key(
        Choice(("any", "ldap")), "any",
        doc="`ldap`: RCPT to an accepted domain is looked up in the directory (`[ldap] "
        "recipient_filter`) before it is accepted; an unknown address gets `550 5.1.1`, a "
        "directory that is down or slow `451 4.4.3`.  `any`: every address of an accepted "
        "domain is accepted.",
        example="ldap",
    ),
    "header_firewall": Key(
        Bool(), lambda values, built: values["role"] == "relay" and not values["relay_ips"],
        default_doc="`yes` for relay listeners without `relay_ips`, `no` otherwise",
        doc="Remove Exchange's internal header fields (`X-MS-Exchange-Organization-*`, "
        "`X-MS-Exchange-Forest-*`, `X-MS-Exchange-Transport-*`) and the `[gateway] "
        "strip_headers` from every message received here, so nobody on the internet can "
        "forge what Exchange trusts (the spam verdict, the authentication state).  Counted in "
        "the log, never their values.",
        example="no",
    ),
    "relay_client_certs": Key(
        DomainList(), "",
        doc="A client presenting a certificate that chains to `[tls] client_ca_file` and "
        "whose subject common name or a DNS name of its subjectAltName is one of these may "
        "relay to any domain without AUTH (like a certificate-based connector of Exchange "
        "Online).  Only with this key set does the listener ask for client certificates.",
        example="mail.protection.outlook.com",
    ),
}
# Each [limits] key may be set per listener: one row of the reference for them all.
LISTENER_KEYS.update(
    {
        key: Key(
            spec.kind, _inherit("limits", key),
            type="as in `[limits]`",
            default_doc="the `[limits]` value",
            doc="Override that limit for this listener.",
            example="1m" if key == "command_timeout" else None,
        )
        for key, spec in LIMITS_KEYS.items()
    }
)


def _build_listener(name, values):
    limits = Limits(**{key: values.pop(key) for key in LIMITS_KEYS})
    return ListenerConfig(name=name, limits=limits, **values)


def _flatten_listener(listener):
    values = attr.asdict(listener, recurse=False)
    values.update(attr.asdict(values.pop("limits"), recurse=False))
    return values.pop("name"), values


def _check_listener(values):
    if values["auth"] == "required" and values["tls"] == "none":
        return "auth", "auth = required needs tls"
    if values["relay_client_certs"] and values["tls"] == "none":
        return "relay_client_certs", "needs tls other than none: certificates come with TLS"
    proxied, inner = proxied_endpoint(values["endpoint"])
    if values["proxy_from"] and not proxied:
        return "proxy_from", "only used with a haproxy: endpoint (haproxy:tcp:25)"
    if proxied and not values["proxy_from"] and not inner.startswith("unix:"):
        return "proxy_from", "required with a haproxy: endpoint: the load balancers' addresses"
    return None


TLS = _plain("tls", TLSConfig, TLS_KEYS)
AUTH = _plain("auth", AuthConfig, AUTH_KEYS)
LISTENER = Section(
    "listeners", LISTENER_KEYS, _build_listener, _flatten_listener, _check_listener, named=True
)
