"""
[ldap]: the directory (Active Directory, OpenLDAP) that recipient validation (a listener's
`recipients = ldap`) and SMTP AUTH (`[auth] backend = ldap`) ask.
"""

import re

import attr

from mailgate.config.schema import Key, _plain
from mailgate.config.types import Duration, Int, Path, Text, _expected, _hostname, _items, _ip


@attr.s(frozen=True, slots=True)
class LDAPServer:
    """One directory server of [ldap] uri: ldaps (TLS from the first byte) or ldap + StartTLS."""

    scheme = attr.ib()  # "ldap" | "ldaps"
    host = attr.ib()  # a hostname or an IP address (IPv6 without brackets)
    port = attr.ib()

    def __str__(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        default = 636 if self.scheme == "ldaps" else 389
        return "%s://%s%s" % (self.scheme, host, "" if self.port == default else ":%d" % self.port)


@attr.s(frozen=True, slots=True)
class LDAPConfig:
    servers = attr.ib(default=())  # tuple of LDAPServer, tried in order
    bind_dn = attr.ib(default=None)
    bind_password_file = attr.ib(default=None)
    base_dn = attr.ib(default=None)
    ca_file = attr.ib(default=None)
    timeout = attr.ib(default=5.0)
    cache_ttl = attr.ib(default=300.0)
    negative_cache_ttl = attr.ib(default=60.0)
    cache_size = attr.ib(default=10000)
    recipient_filter = attr.ib(default="(|(proxyAddresses=smtp:%s)(mail=%s))")
    user_filter = attr.ib(default="(|(userPrincipalName=%s)(sAMAccountName=%s)(mail=%s))")


_URI = re.compile(r"(ldaps?)://(\[[^\]]*\]|[^:/\[\]]+)(?::([0-9]{1,5}))?/?", re.IGNORECASE)


@attr.s(frozen=True)
class LDAPURIList:
    """A tuple of LDAPServer from ldap://host[:port] and ldaps://host[:port] URIs, in order."""

    EMPTY = "not set"

    def parse(self, text, base):
        servers = []
        for item in _items(text):
            match = _URI.fullmatch(item)
            if not match:
                raise _expected("a URI like ldap://dc1.example.com or ldaps://192.0.2.10:636", item)
            scheme, host, port = match.group(1).lower(), match.group(2), match.group(3)
            if host.startswith("["):
                host = _ip(host[1:-1])
                if host is None or ":" not in host:
                    raise _expected("an IPv6 address in brackets", item)
            else:
                host = _ip(host) or _hostname(host)
            port = int(port) if port else (636 if scheme == "ldaps" else 389)
            if not 1 <= port <= 65535:
                raise _expected("a port from 1 to 65535", item)
            server = LDAPServer(scheme, host, port)
            if server not in servers:
                servers.append(server)
        return tuple(servers)

    def describe(self):
        return "list of `ldap://` or `ldaps://` URIs"

    def render(self, value):
        return ", ".join(str(server) for server in value)


@attr.s(frozen=True)
class LDAPFilterTemplate:
    """An RFC 4515 search filter with %s where the address (or username) goes."""

    def parse(self, text, base):
        if "%s" not in text:
            raise _expected("an LDAP filter with %s for the address, like (mail=%s)", text)
        if "%" in text.replace("%s", ""):
            raise _expected("%s as the only %-sequence in the filter", text)
        try:
            from ldaptor.ldapfilter import InvalidLDAPFilter, parseFilter
        except ImportError:  # pragma: no cover (ldaptor is a dependency)
            return text
        try:
            parseFilter(text.replace("%s", "placeholder"))
        except (InvalidLDAPFilter, Exception):
            raise _expected("a valid LDAP filter (RFC 4515) like (|(mail=%s)(proxyAddresses="
                            "smtp:%s))", text) from None
        return text

    def describe(self):
        return "LDAP filter with `%s`"

    def render(self, value):
        return value


LDAP_KEYS = {
    "uri": Key(
        LDAPURIList(), "",
        doc="The directory servers, tried in order (the next one when a server cannot be "
        "reached or does not answer within `timeout`).  `ldap://` speaks StartTLS before "
        "anything else, `ldaps://` TLS from the first byte; either way the server's "
        "certificate is checked against `ca_file` and the host name, and nothing is sent "
        "without TLS.  The port defaults to 389 and 636.  Required when a listener has "
        "`recipients = ldap` or `[auth] backend` names `ldap`.",
        example="ldap://dc1.corp.example, ldap://dc2.corp.example",
    ),
    "bind_dn": Key(
        Text(), "",
        doc="The service account mailgate searches the directory as (an Active Directory user "
        "with read access is enough).  Not set: anonymous searches.",
        example="CN=svc-mailgate,OU=Service Accounts,DC=corp,DC=example",
    ),
    "bind_password_file": Key(
        Path(), "",
        doc="A file whose first line is the service account's password (read at start-up and "
        "on a reload).  Required with `bind_dn`.",
        example="/etc/mailgate/ldap.password",
    ),
    "base_dn": Key(
        Text(), "",
        doc="Where the searches start (the whole subtree below it is searched).  Required with "
        "`uri`.",
        example="DC=corp,DC=example",
    ),
    "ca_file": Key(
        Path(), "",
        default_doc="not set: the system's trust store",
        doc="The CA certificates (PEM) the directory servers' certificates are checked "
        "against, such as your enterprise CA.",
        example="/etc/mailgate/corp-ca.pem",
    ),
    "timeout": Key(
        Duration(), "5s",
        doc="How long one directory server may take to connect, start TLS and answer; past it "
        "the next server is tried, and when none answers in time the client gets a temporary "
        "error (`451 4.4.3`), never a rejection.",
        example="3s",
    ),
    "cache_ttl": Key(
        Duration(), "5m",
        doc="How long an address found in the directory (and a user's sender addresses) is "
        "remembered.",
        example="15m",
    ),
    "negative_cache_ttl": Key(
        Duration(), "1m",
        doc="How long an address not found in the directory is remembered (a new mailbox is "
        "accepted at most this long after it was created).",
        example="30s",
    ),
    "cache_size": Key(
        Int(1), "10000",
        doc="Addresses remembered at most (found and not found together); the oldest are "
        "forgotten first.",
        example="50000",
    ),
    "recipient_filter": Key(
        LDAPFilterTemplate(), "(|(proxyAddresses=smtp:%s)(mail=%s))",
        doc="The search for a recipient address; `%s` is the address, escaped.  The default "
        "finds Active Directory's primary and secondary addresses (`proxyAddresses` matches "
        "`SMTP:` and `smtp:` alike: the match is case-insensitive) and `mail`.  An address is "
        "known when at least one entry matches.",
        example="(&(objectClass=user)(|(proxyAddresses=smtp:%s)(mail=%s)))",
    ),
    "user_filter": Key(
        LDAPFilterTemplate(), "(|(userPrincipalName=%s)(sAMAccountName=%s)(mail=%s))",
        doc="The search for an AUTH username (`%s`, escaped): its entry's password is then "
        "checked by binding as it, over TLS, and its `mail` and `proxyAddresses` (`smtp:`) are "
        "the addresses it may send as.  Exactly one entry must match.",
        example="(&(objectClass=user)(!(userAccountControl:1.2.840.113556.1.4.803:=2))"
        "(|(userPrincipalName=%s)(sAMAccountName=%s)))",
    ),
}


def _build(values):
    return LDAPConfig(servers=values.pop("uri"), **values)


def _flatten(value):
    values = attr.asdict(value, recurse=False)
    values["uri"] = values.pop("servers")
    return None, values


def _check(values):
    if values["bind_dn"] is not None and values["bind_password_file"] is None:
        return "bind_password_file", "required, because bind_dn is set"
    if values["bind_password_file"] is not None and values["bind_dn"] is None:
        return "bind_dn", "required, because bind_password_file is set"
    if values["uri"] and values["base_dn"] is None:
        return "base_dn", "required, because uri is set"
    return None


LDAP = _plain("ldap", LDAPConfig, LDAP_KEYS, _check)
LDAP = attr.evolve(LDAP, build=lambda name, values: _build(values), flatten=_flatten)
