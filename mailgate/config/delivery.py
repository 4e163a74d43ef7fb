"""
[delivery], [route:NAME] and [dkim]: how mail is handed on, by which route, and signed with
which key.
"""

import attr

from mailgate.config.schema import Key, Section, _plain
from mailgate.config.types import (Bool, Choice, Duration, DurationList, DomainList, HeaderList,
                                   HostList, Int, Label, Path, Port, RouteDomains, SecretFile,
                                   Text)


@attr.s(frozen=True, slots=True)
class DeliveryConfig:
    mx_port = attr.ib(default=25)
    concurrency = attr.ib(default=20)
    per_destination_concurrency = attr.ib(default=4)
    retry = attr.ib(default=(60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0))  # last repeats
    max_lifetime = attr.ib(default=172800.0)
    delay_warning = attr.ib(default=14400.0)  # 0: off
    connect_timeout = attr.ib(default=30.0)
    command_timeout = attr.ib(default=300.0)
    data_timeout = attr.ib(default=600.0)


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


@attr.s(frozen=True, slots=True)
class DKIMConfig:
    sign_domains = attr.ib(default=())  # tuple of lower-case domains; empty: no signing
    selector = attr.ib(default=None)
    private_key = attr.ib(default=None)  # path
    headers = attr.ib(default=(
        "from", "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
        "references", "mime-version", "content-type", "content-transfer-encoding"))


DELIVERY_KEYS = {
    "mx_port": Key(Port(), "25"),
    "concurrency": Key(Int(1), "20"),
    "per_destination_concurrency": Key(Int(1), "4"),
    "retry": Key(DurationList(), "1m, 5m, 15m, 30m, 1h, 2h, 4h"),
    "max_lifetime": Key(Duration(), "2d"),
    "delay_warning": Key(Duration(positive=False), "4h"),
    "connect_timeout": Key(Duration(), "30s"),
    "command_timeout": Key(Duration(), "5m"),
    "data_timeout": Key(Duration(), "10m"),
}

ROUTE_KEYS = {
    "domains": Key(RouteDomains()),
    "smarthost": Key(HostList(), ""),
    "mx": Key(Bool(), "no"),
    "tls": Key(Choice(("none", "opportunistic", "required", "verify")), "opportunistic"),
    "username": Key(Text(), ""),
    "password": Key(Text(), ""),
    "password_file": Key(SecretFile(), ""),
    "dkim_sign": Key(Bool(), lambda values, built: values["mx"]),
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
    "sign_domains": Key(DomainList(), ""),
    "selector": Key(Label(), ""),
    "private_key": Key(Path(), ""),
    "headers": Key(HeaderList(), ", ".join(attr.fields(DKIMConfig).headers.default)),
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
