"""
[delivery], [route:NAME] and [dkim]: how mail is handed on, by which route, and signed with
which key.
"""

import attr

from mailgate.config.schema import Key, Section, _plain
from mailgate.config.types import (Bool, Choice, Duration, DurationList, DomainList, HeaderList,
                                   HeaderPatternList, HostList, Int, Label, Path, Port,
                                   RouteDomains, SecretFile, Text)

# Exchange's internal header fields: never for the internet (inbound or outbound; see
# mailgate.headerfirewall).
EXCHANGE_HEADERS = ("x-ms-exchange-organization-*", "x-ms-exchange-forest-*",
                    "x-ms-exchange-transport-*")


@attr.s(frozen=True, slots=True)
class DeliveryConfig:
    mx_port = attr.ib(default=25)
    concurrency = attr.ib(default=20)
    per_destination_concurrency = attr.ib(default=20)
    initial_destination_concurrency = attr.ib(default=5)
    connection_cache_time = attr.ib(default=2.0)  # 0: one message per connection
    connection_reuse_time = attr.ib(default=300.0)
    retry = attr.ib(default=(60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0))  # last repeats
    max_lifetime = attr.ib(default=172800.0)
    delay_warning = attr.ib(default=14400.0)  # 0: off
    connect_timeout = attr.ib(default=30.0)
    command_timeout = attr.ib(default=300.0)
    data_timeout = attr.ib(default=600.0)
    chunking = attr.ib(default=True)  # BDAT (RFC 3030) when the next hop offers CHUNKING


@attr.s(frozen=True, slots=True)
class RouteConfig:
    name = attr.ib()
    domains = attr.ib()  # tuple of str: "example.com" exact, ".example.com" subdomains, "*" the rest
    smarthosts = attr.ib(default=())  # tuple of (host str, port int), tried in order
    mx = attr.ib(default=False)
    tls = attr.ib(default="opportunistic")  # "none" | "opportunistic" | "required" | "verify"
    username = attr.ib(default=None)
    password = attr.ib(default=None)  # from password or password_file
    dkim_sign = attr.ib(default=False)  # default: yes for mx routes, no for smarthost routes
    strip_headers = attr.ib(default=())  # header names / "prefix*" removed before sending


@attr.s(frozen=True, slots=True)
class DKIMConfig:
    sign_domains = attr.ib(default=())  # tuple of lower-case domains; empty: no signing
    selector = attr.ib(default=None)
    private_key = attr.ib(default=None)  # path
    headers = attr.ib(default=(
        "from", "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
        "references", "mime-version", "content-type", "content-transfer-encoding"))


DELIVERY_KEYS = {
    "mx_port": Key(
        Port(), "25",
        doc="The port of the MX hosts that `mx = yes` routes deliver to (change it only for "
        "testing).",
        example="2525",
    ),
    "concurrency": Key(
        Int(1), "20", doc="Outgoing connections at most, over all destinations.", example="50"
    ),
    "per_destination_concurrency": Key(
        Int(1), "20",
        doc="Outgoing connections at most to one destination (a smarthost, or a domain's MX "
        "hosts), as Postfix's `default_destination_concurrency_limit`.",
        example="4",
    ),
    "initial_destination_concurrency": Key(
        Int(1), "5",
        doc="Connections to a destination at first (slow start, as Postfix's "
        "`initial_destination_concurrency`): each success allows one more, up to "
        "`per_destination_concurrency`; a destination that fails (refused, timed out, dropped "
        "connections) gets one fewer, down to 1.",
        example="2",
    ),
    "connection_cache_time": Key(
        Duration(positive=False), "2s",
        doc="How long a connection stays open after a message, waiting for the next message to "
        "the same destination (Postfix's `smtp_connection_cache_time_limit`); `0` closes every "
        "connection after one message. A connection whose message got a temporary failure "
        "(4xx) is not kept: the retry gets a new one.",
        example="5s",
    ),
    "connection_reuse_time": Key(
        Duration(), "5m",
        doc="How long a connection may be used for one message after another before it is "
        "closed (Postfix's `smtp_connection_reuse_time_limit`), so that the load spreads over "
        "a destination's servers again.",
        example="1m",
    ),
    "retry": Key(
        DurationList(), "1m, 5m, 15m, 30m, 1h, 2h, 4h",
        doc="The waits between attempts after a temporary failure: the first attempt is retried "
        "after the first wait, and so on; the last wait repeats until `max_lifetime`.",
        example="5m, 30m, 1h",
    ),
    "max_lifetime": Key(
        Duration(), "2d",
        doc="How long a message is retried before it is bounced to its sender.",
        example="5d",
    ),
    "delay_warning": Key(
        Duration(positive=False), "4h",
        doc="After how long still undelivered the sender is sent a delay notice (delivery goes "
        "on).",
        example="0",
    ),
    "connect_timeout": Key(
        Duration(), "30s",
        doc="How long to wait for the TCP connection to the next hop.",
        example="1m",
    ),
    "command_timeout": Key(
        Duration(), "5m",
        doc="How long to wait for the server's reply to each command (RFC 5321 asks for at "
        "least 5 minutes for most).",
        example="10m",
    ),
    "data_timeout": Key(
        Duration(), "10m",
        doc="How long to wait for the server's reply after the end of the message (RFC 5321: "
        "10 minutes).",
        example="15m",
    ),
    "chunking": Key(
        Bool(), "yes",
        doc="Send messages with BDAT (RFC 3030 CHUNKING, as Exchange does) when the next hop "
        "offers it; DATA otherwise.",
        example="no",
    ),
}

ROUTE_KEYS = {
    "domains": Key(
        RouteDomains(),
        doc="The recipient domains this route is for: `example.com` that domain exactly, "
        "`.example.com` any subdomain of example.com (not example.com itself), `*` every domain "
        "no other route names.  Lower-cased.  An entry may be in one route only "
        "(`[route:b] domains: example.com is already in [route:a]`).",
        example="example.com, .example.com",
    ),
    "smarthost": Key(
        HostList(), "",
        doc="The servers to hand the mail to, tried in order.  Exactly one of `smarthost` and "
        "`mx = yes` is required.",
        example="exchange1.corp.example:25, exchange2.corp.example:25",
    ),
    "mx": Key(
        Bool(), "no",
        doc="`yes`: deliver to the MX hosts of each recipient domain (port `[delivery] "
        "mx_port`), the way to the internet.",
        example="yes",
    ),
    "tls": Key(
        Choice(("none", "opportunistic", "required", "verify")), "opportunistic",
        doc="TLS towards the next hop.  `opportunistic`: STARTTLS when the server offers it, any "
        "certificate.  `required`: no delivery without STARTTLS, any certificate.  `verify`: "
        "STARTTLS with a certificate trusted by `[tls] ca_file` (or the system's trust store "
        "when unset).",
        example="verify",
    ),
    "username": Key(
        Text(), "",
        doc="The SMTP AUTH username for the smarthost.  Needs `password` or `password_file`, "
        "and `tls` other than `none`: credentials are sent only over TLS.",
        example="gateway@corp.example",
    ),
    "password": Key(
        Text(), "",
        doc="The SMTP AUTH password, as written (a password with ` #` in it, or starting with "
        "`#`, must go in a `password_file`).  Needs `username`.",
        example="s3cret",
    ),
    "password_file": Key(
        SecretFile(), "",
        doc="A file whose first line (blanks around it removed) is the password, read when the "
        "configuration is loaded; it must exist, be readable and have a non-empty first line.  "
        "Not with `password`.",
        example="/etc/mailgate/smarthost.password",
    ),
    "dkim_sign": Key(
        Bool(), lambda values, built: values["mx"],
        default_doc="`yes` for `mx = yes` routes, `no` for smarthost routes",
        doc="Sign mail leaving by this route with the `[dkim]` key (only for the `[dkim] "
        "sign_domains`).",
        example="no",
    ),
    "strip_headers": Key(
        HeaderPatternList(), lambda values, built: EXCHANGE_HEADERS if values["mx"] else (),
        default_doc="`%s` for `mx = yes` routes, none for smarthost routes"
        % ", ".join(EXCHANGE_HEADERS),
        doc="Header fields removed from mail leaving by this route (names, or prefixes ending "
        "in `*`), before it is DKIM-signed: Exchange's organisation headers must not reach "
        "the internet.  `none`: keep every header.",
        example="X-MS-Exchange-Organization-*, X-Originating-IP",
    ),
}


def _build_route(name, values):
    from_file, inline = values.pop("password_file"), values.pop("password")
    password = inline if from_file is None else from_file
    return RouteConfig(name=name, smarthosts=values.pop("smarthost"), password=password, **values)


def _flatten_route(route):
    values = attr.asdict(route, recurse=False)
    values["smarthost"] = values.pop("smarthosts")
    values["password_file"] = None  # its secret is rendered as password
    return values.pop("name"), values


def _check_route(values):
    if values["mx"] and values["smarthost"]:
        return "smarthost", "not allowed with mx = yes: a route delivers by MX or to smarthosts"
    if not values["mx"] and not values["smarthost"]:
        return "smarthost", "required, unless mx = yes"
    if values["password"] is not None and values["password_file"] is not None:
        return "password_file", "not allowed with password: set one of them"
    has_password = values["password"] is not None or values["password_file"] is not None
    if values["username"] is not None and not has_password:
        return "username", "needs password or password_file"
    if values["username"] is None and has_password:
        key = "password" if values["password"] is not None else "password_file"
        return key, "needs username"
    if values["username"] is not None and values["tls"] == "none":
        return "username", "needs tls other than none: credentials are sent only over TLS"
    return None


DKIM_KEYS = {
    "sign_domains": Key(
        DomainList(), "",
        default_doc="empty: no signing",
        doc="The sender domains mail is signed for.",
        example="example.com, example.org",
    ),
    "selector": Key(
        Label(), "",
        doc="The selector: the public key is published at `SELECTOR._domainkey.DOMAIN`.  "
        "Required when `sign_domains` is set.",
        example="mail2024",
    ),
    "private_key": Key(
        Path(), "",
        doc="The private key, PEM.  Required when `sign_domains` is set; it must exist and be "
        "readable.",
        example="/etc/mailgate/dkim.key",
    ),
    "headers": Key(
        HeaderList(), ", ".join(attr.fields(DKIMConfig).headers.default),
        doc="The header fields signed.  A name listed twice is oversigned: no second copy can "
        "be added after signing.  Must include `from`.",
        example="from, from, to, subject, date",
    ),
}


def _check_dkim_section(values):
    if values["sign_domains"]:
        for key in ("selector", "private_key"):
            if values[key] is None:
                return key, "required, because sign_domains is set"
    if "from" not in values["headers"]:
        return "headers", "must include from (RFC 6376 requires From to be signed)"
    return None


DELIVERY = _plain("delivery", DeliveryConfig, DELIVERY_KEYS)
ROUTE = Section("routes", ROUTE_KEYS, _build_route, _flatten_route, _check_route, named=True)
DKIM = _plain("dkim", DKIMConfig, DKIM_KEYS, _check_dkim_section)
