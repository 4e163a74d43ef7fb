"""
The gateway's configuration: the ini file is read and validated here, once, into frozen values.

No other module reads the ini.  Every problem is a mailgate.errors.ConfigError naming the file,
section and key.  Relative paths in a config file are relative to the directory holding that file.

Parsing is driven by SECTIONS (one table of key -> Key(kind, default) per section).  To add a
section: write its frozen attrs class, add a field for it to Config, add a KEYS table and one
SECTIONS entry (named=True for [KIND:NAME] sections that may repeat; they become a tuple), and
document every key in etc/mailgate.ini and the README's configuration reference (a test checks both).
Checks spanning sections go in CHECKS.
"""

import ast
import configparser
import ipaddress
import os
import re
import socket
import stat

import attr
from twisted.internet import endpoints

from mailgate.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# The typed values (the contract other modules rely on).  Sizes are ints (bytes), durations are
# floats (seconds), CIDR lists are tuples of ipaddress.ip_network objects, paths are absolute str.
# ---------------------------------------------------------------------------------------------


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
class QueueConfig:
    backend = attr.ib(default="spool")
    path = attr.ib(default=None)


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


@attr.s(frozen=True, slots=True)
class DNSConfig:
    nameservers = attr.ib(default=())  # tuple of (ip str, port int); empty: the system's resolv.conf
    timeout = attr.ib(default=5.0)


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


@attr.s(frozen=True, slots=True)
class FiltersConfig:
    timeout = attr.ib(default=30.0)


@attr.s(frozen=True, slots=True)
class FilterSection:
    """[filter:NAME]: options for the filter named NAME in a listener's filters (dotted or not)."""

    name = attr.ib()
    options = attr.ib(default=())  # tuple of (key, str value) pairs, in file order


@attr.s(frozen=True, slots=True)
class SPFConfig:
    reject_fail = attr.ib(default=False)
    tempfail_on_error = attr.ib(default=False)
    reject_permerror = attr.ib(default=False)
    check_internal = attr.ib(default=False)


@attr.s(frozen=True, slots=True)
class DMARCConfig:
    enforce = attr.ib(default=False)
    quarantine_action = attr.ib(default="quarantine")  # "quarantine" | "tag"
    tempfail_on_error = attr.ib(default=False)
    check_internal = attr.ib(default=False)


DEFAULT_BLOCKED_EXTENSIONS = (
    "ade", "adp", "app", "appx", "appxbundle", "application", "bas", "bat", "cab", "chm", "cmd",
    "com", "cpl", "dll", "docm", "dotm", "exe", "gadget", "hta", "img", "inf", "ins", "iso", "isp",
    "jar", "js", "jse", "lnk", "mde", "msc", "msi", "msix", "msp", "mst", "one", "pif", "potm",
    "ppam", "ppsm", "pptm", "ps1", "ps1xml", "ps2", "psc1", "psd1", "psm1", "reg", "scf", "scr",
    "sct", "shb", "shs", "sldm", "url", "vb", "vbe", "vbs", "vhd", "vhdx", "ws", "wsc", "wsf",
    "wsh", "xlam", "xll", "xlsm", "xltm",
)


@attr.s(frozen=True, slots=True)
class AttachmentsConfig:
    blocked_extensions = attr.ib(default=DEFAULT_BLOCKED_EXTENSIONS)  # lower-case, no dot
    blocked_mime_types = attr.ib(default=())  # lower-case "type/subtype" or "type/*"
    detect_executables = attr.ib(default=True)
    action = attr.ib(default="reject")  # "reject" | "quarantine" | "strip"
    max_archive_depth = attr.ib(default=3)
    max_archive_members = attr.ib(default=1000)
    max_expanded_size = attr.ib(default=100 * 1024 * 1024)
    max_compression_ratio = attr.ib(default=100)
    encrypted_archives = attr.ib(default="reject")  # "allow" | "reject"
    max_mime_depth = attr.ib(default=20)
    max_parts = attr.ib(default=500)
    malformed = attr.ib(default="reject")  # "reject" | "accept"


@attr.s(frozen=True, slots=True)
class LoggingConfig:
    dir = attr.ib(default=None)  # None: no protocol.log / tracking.log
    max_size = attr.ib(default=100 * 1024 * 1024)  # rotate a log past this size (and daily)
    retention_days = attr.ib(default=30)


@attr.s(frozen=True, slots=True)
class MetricsConfig:
    endpoint = attr.ib(default=None)  # a Twisted server endpoint string; None: off


@attr.s(frozen=True, slots=True)
class AlertsConfig:
    interval = attr.ib(default=30.0)
    queue_size = attr.ib(default=0)  # messages; 0: off
    oldest_message_age = attr.ib(default=0.0)  # seconds; 0: off
    deferred_ratio = attr.ib(default=0.0)  # deferred / all queued, 0..1; 0: off
    connection_timeouts_per_minute = attr.ib(default=0)  # 0: off
    command = attr.ib(default=None)  # run with the alert's details in its environment


@attr.s(frozen=True, slots=True)
class AdminConfig:
    socket = attr.ib(default=None)  # path of the admin unix socket; None: <queue path>/admin.sock


@attr.s(frozen=True, slots=True)
class Config:
    path = attr.ib()  # absolute path of the ini file it came from
    gateway = attr.ib()
    limits = attr.ib()
    queue = attr.ib()
    tls = attr.ib()
    auth = attr.ib()
    listeners = attr.ib()  # tuple of ListenerConfig, in file order
    dns = attr.ib(factory=DNSConfig)
    delivery = attr.ib(factory=DeliveryConfig)
    routes = attr.ib(default=())  # tuple of RouteConfig, in file order
    dkim = attr.ib(factory=DKIMConfig)
    filters = attr.ib(factory=FiltersConfig)
    filter_sections = attr.ib(default=())  # tuple of FilterSection
    spf = attr.ib(factory=SPFConfig)
    dmarc = attr.ib(factory=DMARCConfig)
    attachments = attr.ib(factory=AttachmentsConfig)
    logging = attr.ib(factory=LoggingConfig)
    metrics = attr.ib(factory=MetricsConfig)
    alerts = attr.ib(factory=AlertsConfig)
    admin = attr.ib(factory=AdminConfig)


# ---------------------------------------------------------------------------------------------
# Value kinds.  Each turns the text of one ini value into a typed value (raising ValueError with
# what was expected and what was given) and back into text for render_config.
# ---------------------------------------------------------------------------------------------


def _expected(what, text):
    return ValueError("expected %s, got %r" % (what, text))


def _items(text):
    """Comma-separated (or continued on indented lines); blanks around items are ignored."""
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]


@attr.s(frozen=True)
class Int:
    minimum = attr.ib(default=None)
    maximum = attr.ib(default=None)

    def parse(self, text, base):
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise _expected("an integer", text)
        value = int(text)
        too_small = self.minimum is not None and value < self.minimum
        too_big = self.maximum is not None and value > self.maximum
        if (too_small or too_big) and None not in (self.minimum, self.maximum):
            raise _expected("an integer from %d to %d" % (self.minimum, self.maximum), text)
        if too_small:
            raise _expected("an integer >= %d" % self.minimum, text)
        if too_big:
            raise _expected("an integer <= %d" % self.maximum, text)
        return value

    def render(self, value):
        return str(value)


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


@attr.s(frozen=True)
class Size:
    """Bytes, or K/M/G in powers of 1024 (35M, 512K, 1048576)."""

    minimum = attr.ib(default=1)

    def parse(self, text, base):
        match = re.fullmatch(r"([0-9]+) *([KMG]?)", text, re.IGNORECASE)
        if not match:
            raise _expected("a size like 35M", text)
        value = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
        if value < self.minimum:
            raise _expected("a size of at least %d bytes" % self.minimum, text)
        return value

    def render(self, value):
        for unit in "GMK":
            if value and value % _SIZE_UNITS[unit] == 0:
                return "%d%s" % (value // _SIZE_UNITS[unit], unit)
        return str(value)


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@attr.s(frozen=True)
class Duration:
    """Seconds, or a number with an s/m/h/d suffix (30, 10s, 5m, 1h, 2d); a float of seconds."""

    positive = attr.ib(default=True)

    def parse(self, text, base):
        match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?) *([smhd]?)", text, re.IGNORECASE)
        if not match:
            raise _expected("a duration like 30s, 5m, 1h or 2d", text)
        value = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
        if self.positive and value <= 0:
            raise _expected("a duration greater than 0", text)
        return value

    def render(self, value):
        if value != int(value):
            return "%ss" % (value,)
        for unit in "dhm":
            if value and value % _DURATION_UNITS[unit] == 0:
                return "%d%s" % (value // _DURATION_UNITS[unit], unit)
        return "%ds" % (value,)


@attr.s(frozen=True)
class Bool:
    def parse(self, text, base):
        try:
            return configparser.ConfigParser.BOOLEAN_STATES[text.lower()]
        except KeyError:
            raise _expected("yes or no", text) from None

    def render(self, value):
        return "yes" if value else "no"


@attr.s(frozen=True)
class Choice:
    choices = attr.ib()  # the canonical spellings; matched without regard to case

    def parse(self, text, base):
        for choice in self.choices:
            if text.lower() == choice.lower():
                return choice
        raise _expected("one of %s" % ", ".join(self.choices), text)

    def render(self, value):
        return value


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _hostname(text):
    """A lower-case DNS name (LDH labels); one trailing dot is dropped."""
    name = text.lower()
    name = name[:-1] if name.endswith(".") else name
    if 1 <= len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split(".")):
        return name
    raise _expected("a hostname like mail.example.com", text)


@attr.s(frozen=True)
class Hostname:
    def parse(self, text, base):
        return _hostname(text)

    def render(self, value):
        return value


@attr.s(frozen=True)
class DomainList:
    """A tuple of lower-case domains, duplicates dropped, order kept."""

    def parse(self, text, base):
        domains = []
        for item in _items(text):
            try:
                domain = _hostname(item)
            except ValueError:
                raise _expected("a comma-separated list of domains like example.com", item)
            if domain not in domains:
                domains.append(domain)
        return tuple(domains)

    def render(self, value):
        return ", ".join(value)


@attr.s(frozen=True)
class NetworkList:
    """A tuple of ipaddress networks; a bare address is a single host."""

    def parse(self, text, base):
        return tuple(self._network(item) for item in _items(text))

    def _network(self, item):
        what = "an address or network like 192.0.2.0/24 or 2001:db8::/32"
        try:
            return ipaddress.ip_network(item)
        except ValueError:
            pass
        try:
            loose = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _expected(what, item) from None
        raise ValueError("%s (host bits set: did you mean %s?)" % (_expected(what, item), loose))

    def render(self, value):
        return ", ".join(str(network) for network in value)


@attr.s(frozen=True)
class Path:
    """An absolute path; relative ones are taken from the config file's directory."""

    optional = attr.ib(default=True)  # then an empty value means not set: None

    def parse(self, text, base):
        if not text and self.optional:
            return None
        if not text or "\n" in text or "\0" in text:
            raise _expected("a path", text)
        return os.path.normpath(os.path.join(base, text))

    def render(self, value):
        return "" if value is None else value


_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")


@attr.s(frozen=True)
class Endpoint:
    """A Twisted server endpoint string of an allowed type, kept as written."""

    def parse(self, text, base):
        kind = text.split(":", 1)[0]
        if kind == "ssl":
            message = "ssl endpoints are not used: write tcp:PORT and tls = implicit, got %r"
            raise ValueError(message % text)
        if kind not in _ENDPOINT_TYPES or ":" not in text:
            what = "an endpoint like tcp:25 of type %s" % ", ".join(_ENDPOINT_TYPES)
            raise _expected(what, text)
        try:
            endpoint = endpoints.serverFromString(None, text)
        except (IndexError, KeyError):
            if kind != "systemd":
                raise _expected("a valid %s endpoint" % kind, text) from None
            return text  # systemd's descriptors exist only once systemd starts us
        except Exception as e:
            raise ValueError("%s (%s)" % (_expected("a valid %s endpoint" % kind, text), e))
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            raise _expected("a port from 0 to 65535", text)
        return text

    def render(self, value):
        return value


@attr.s(frozen=True)
class Port:
    def parse(self, text, base):
        return _port(text, text)

    def render(self, value):
        return str(value)


def _port(text, item):
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise _expected("a port from 1 to 65535", item)
    return int(text)


def _split_port(item):
    """
    'host', 'host:port', '[v6]', '[v6]:port' or a bare IPv6 address (which cannot carry a port)
    -> (host, port text or None, whether the host was in brackets).
    """
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", item)
    if bracketed:
        return bracketed.group(1), bracketed.group(2), True
    if item.count(":") > 1:
        return item, None, False
    host, colon, port = item.partition(":")
    return host, (port if colon else None), False


def _ip(text):
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _join_port(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


@attr.s(frozen=True)
class NameserverList:
    """A tuple of (ip str, port int): 192.0.2.53, 192.0.2.53:5353, ::1 or [::1]:5353 (port 53)."""

    def parse(self, text, base):
        servers = []
        for item in _items(text):
            host, port, bracketed = _split_port(item)
            address = _ip(host)
            if address is None or (bracketed and ":" not in address):
                what = "a nameserver address like 192.0.2.53, 192.0.2.53:5353, ::1 or [::1]:5353"
                raise _expected(what, item)
            server = (address, 53 if port is None else _port(port, item))
            if server not in servers:
                servers.append(server)
        return tuple(servers)

    def render(self, value):
        return ", ".join(_join_port(host, port) for host, port in value)


@attr.s(frozen=True)
class HostList:
    """A tuple of (host str, port int): a DNS name or an IP address, then :port (default 25)."""

    default_port = attr.ib(default=25)
    _WHAT = "a host like mx.example.com, mx.example.com:587, 192.0.2.25 or [2001:db8::25]:25"

    def parse(self, text, base):
        hosts = []
        for item in _items(text):
            host, port, bracketed = _split_port(item)
            name = _ip(host)
            if name is None and not bracketed:
                name = self._name(host)
            if name is None or (bracketed and ":" not in name):
                raise _expected(self._WHAT, item)
            one = (name, self.default_port if port is None else _port(port, item))
            if one not in hosts:
                hosts.append(one)
        return tuple(hosts)

    def _name(self, text):
        try:
            name = _hostname(text)
        except ValueError:
            return None
        # An all-numeric last label is a mistyped address (192.0.2.300), never a name.
        return None if name.rsplit(".", 1)[-1].isdigit() else name

    def render(self, value):
        return ", ".join(_join_port(host, port) for host, port in value)


@attr.s(frozen=True)
class DurationList:
    """A tuple of durations, at least one."""

    def parse(self, text, base):
        durations = tuple(Duration().parse(item, base) for item in _items(text))
        if not durations:
            raise _expected("at least one duration like 1m, 5m, 1h", text)
        return durations

    def render(self, value):
        return ", ".join(Duration().render(one) for one in value)


@attr.s(frozen=True)
class RouteDomains:
    """At least one of: example.com (exact), .example.com (its subdomains), * (everything else)."""

    def parse(self, text, base):
        domains = []
        for item in _items(text):
            domain = self._one(item)
            if domain not in domains:
                domains.append(domain)
        if not domains:
            raise _expected("a list of domains like example.com, .example.com or *", text)
        return tuple(domains)

    def _one(self, item):
        if item == "*":
            return item
        dot = "." if item.startswith(".") else ""
        try:
            return dot + _hostname(item[len(dot):])
        except ValueError:
            pass
        what = "a domain like example.com, .example.com (its subdomains) or * (any other)"
        if item.startswith("*."):
            raise ValueError("%s (did you mean %r?)" % (_expected(what, item), item[1:]))
        raise _expected(what, item)

    def render(self, value):
        return ", ".join(value)


@attr.s(frozen=True)
class Label:
    """One lower-case DNS label (a DKIM selector)."""

    optional = attr.ib(default=True)  # then an empty value means not set: None

    def parse(self, text, base):
        if not text and self.optional:
            return None
        if not _LABEL.fullmatch(text.lower()):
            raise _expected("a DNS label like mail2024 (letters, digits and '-')", text)
        return text.lower()

    def render(self, value):
        return "" if value is None else value


_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ':'


@attr.s(frozen=True)
class HeaderList:
    """A tuple of lower-case header field names, repeats kept (a repeat oversigns)."""

    def parse(self, text, base):
        names = _items(text)
        for name in names:
            if not _HEADER_NAME.fullmatch(name):
                raise _expected("a list of header names like from, to, subject", name)
        return tuple(name.lower() for name in names)

    def render(self, value):
        return ", ".join(value)


@attr.s(frozen=True)
class Text:
    """One line of text, kept as written (a username, a password); empty means not set: None."""

    def parse(self, text, base):
        if "\n" in text:
            raise ValueError("expected a single line, got a value continued on the next line")
        return text or None

    def render(self, value):
        return "" if value is None else value


@attr.s(frozen=True)
class SecretFile:
    """
    A path to a file whose first line (stripped) is a secret, read at load: the value is the
    secret, not the path (None when not set).
    """

    _MAX_LINE = 4096

    def parse(self, text, base):
        filename = Path().parse(text, base)
        if filename is None:
            return None
        problem = _file_problem(filename)
        if problem:
            raise ValueError(problem)
        try:
            with open(filename, "rb") as f:
                line = f.readline(self._MAX_LINE + 1)
        except OSError:
            raise ValueError("not readable: %s" % filename) from None
        if len(line) > self._MAX_LINE:
            raise ValueError("first line longer than %d bytes: %s" % (self._MAX_LINE, filename))
        try:
            secret = line.decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text: %s" % filename) from None
        if not secret:
            raise ValueError("empty first line, expected the password: %s" % filename)
        return secret

    def render(self, value):
        return ""  # the secret itself is rendered by the key it stands for


BUILTIN_FILTERS = ("spf", "dkim", "dmarc", "attachments")
DEFAULT_FILTERS = {"relay": BUILTIN_FILTERS, "submission": ("attachments",)}
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED_PATH = re.compile(r"%s(?:\.%s)+" % (_IDENTIFIER, _IDENTIFIER))


@attr.s(frozen=True)
class FilterList:
    """
    A tuple of filter names in order, each once: a built-in (any case, kept lower-case) or the
    dotted path of a class (package.module.ClassName, kept as written; not imported here).
    Empty: no filters.
    """

    def parse(self, text, base):
        names = []
        for item in _items(text):
            name = item.lower() if item.lower() in BUILTIN_FILTERS else item
            if name not in BUILTIN_FILTERS and not _DOTTED_PATH.fullmatch(name):
                what = "a filter name: %s, or a dotted path like package.module.ClassName"
                error = _expected(what % ", ".join(BUILTIN_FILTERS), item)
                if item.lower() == "none":
                    error = ValueError("%s (for no filters, leave the value empty)" % error)
                raise error
            if name in names:
                raise ValueError("%s is listed twice" % name)
            names.append(name)
        return tuple(names)

    def render(self, value):
        return ", ".join(value)


_EXTENSION = re.compile(r"[a-z0-9_+-]+")


@attr.s(frozen=True)
class ExtensionList:
    """
    A tuple of lower-case file name extensions without their dot (a leading dot is dropped),
    duplicates dropped, order kept.  Empty, or none alone: no extension.  In a list, none is a
    mistake; the extension is written .none.
    """

    def parse(self, text, base):
        if text.strip().lower() == "none":
            return ()
        extensions = []
        for item in _items(text):
            extension = item.lower()[1:] if item.startswith(".") else item.lower()
            if not _EXTENSION.fullmatch(extension) or item.lower() == "none":
                raise _expected("none, or a list of file name extensions like exe, .js, docm", item)
            if extension not in extensions:
                extensions.append(extension)
        return tuple(extensions)

    def render(self, value):
        return ", ".join(value) if value else "none"


_MIME_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"  # RFC 6838 restricted-name
_MIME_TYPE = re.compile(r"%s/(?:%s|\*)" % (_MIME_NAME, _MIME_NAME))


@attr.s(frozen=True)
class MimeTypeList:
    """A tuple of lower-case "type/subtype" or "type/*", duplicates dropped, order kept."""

    def parse(self, text, base):
        types = []
        for item in _items(text):
            if not _MIME_TYPE.fullmatch(item.lower()):
                what = "a list of MIME types like application/x-msdownload or application/*"
                raise _expected(what, item)
            if item.lower() not in types:
                types.append(item.lower())
        return tuple(types)

    def render(self, value):
        return ", ".join(value)


# ---------------------------------------------------------------------------------------------
# The schema: one table per section of key -> Key(kind, default).  A default is the text of a
# value, or a callable (values of this section so far, config values built so far) -> value.
# Sections are built in this order, so a default may come from an earlier section.
# ---------------------------------------------------------------------------------------------

REQUIRED = object()


@attr.s(frozen=True)
class Key:
    kind = attr.ib()
    default = attr.ib(default=REQUIRED)


@attr.s(frozen=True)
class Section:
    """
    How ini sections become one Config field.  A named section is written [KIND:NAME] any number
    of times and becomes a tuple; build(name, values) makes the value, flatten(value) undoes it
    (-> (name, values)) for render_config; check(values) -> (key, message) or None.  A section
    with any_keys takes keys that are not in keys (none is then): its values are the given str
    values, in file order.
    """

    field = attr.ib()
    keys = attr.ib()
    build = attr.ib()
    flatten = attr.ib()
    check = attr.ib(default=None)
    named = attr.ib(default=False)
    any_keys = attr.ib(default=False)


def _plain(field, cls, keys, check=None):
    """A section that is a single attrs value with one attribute per key."""
    return Section(
        field,
        keys,
        build=lambda name, values: cls(**values),
        flatten=lambda value: (None, attr.asdict(value, recurse=False)),
        check=check,
    )


def _inherit(field, key):
    return lambda values, built: getattr(built[field], key)


def _default_hostname(values, built):
    name = socket.getfqdn()
    try:
        return _hostname(name)
    except ValueError:
        raise ValueError("not set, and this machine's name %r is not a valid hostname" % name)


def _by_role(submission, relay):
    return lambda values, built: submission if values["role"] == "submission" else relay


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

QUEUE_KEYS = {
    "backend": Key(Choice(("spool",)), "spool"),
    "path": Key(Path(optional=False), "/var/spool/mailgate"),
}

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


DNS_KEYS = {
    "nameservers": Key(NameserverList(), ""),
    "timeout": Key(Duration(), "5s"),
}

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


FILTERS_KEYS = {
    "timeout": Key(Duration(), "30s"),
}


def _build_filter_section(name, values):
    return FilterSection(name=name, options=tuple(values.items()))


def _flatten_filter_section(section):
    return section.name, dict(section.options)


SPF_KEYS = {
    "reject_fail": Key(Bool(), "no"),
    "tempfail_on_error": Key(Bool(), "no"),
    "reject_permerror": Key(Bool(), "no"),
    "check_internal": Key(Bool(), "no"),
}

DMARC_KEYS = {
    "enforce": Key(Bool(), "no"),
    "quarantine_action": Key(Choice(("quarantine", "tag")), "quarantine"),
    "tempfail_on_error": Key(Bool(), "no"),
    "check_internal": Key(Bool(), "no"),
}

ATTACHMENTS_KEYS = {
    "blocked_extensions": Key(ExtensionList(), ", ".join(DEFAULT_BLOCKED_EXTENSIONS)),
    "blocked_mime_types": Key(MimeTypeList(), ""),
    "detect_executables": Key(Bool(), "yes"),
    "action": Key(Choice(("reject", "quarantine", "strip")), "reject"),
    "max_archive_depth": Key(Int(0, 10), "3"),
    "max_archive_members": Key(Int(1), "1000"),
    "max_expanded_size": Key(Size(), "100M"),
    "max_compression_ratio": Key(Int(2), "100"),
    "encrypted_archives": Key(Choice(("allow", "reject")), "reject"),
    "max_mime_depth": Key(Int(1), "20"),
    "max_parts": Key(Int(1), "500"),
    "malformed": Key(Choice(("reject", "accept")), "reject"),
}

@attr.s(frozen=True)
class OptionalEndpoint:
    """An Endpoint, or empty for "off"."""

    def parse(self, text, base):
        return Endpoint().parse(text, base) if text else None

    def render(self, value):
        return "" if value is None else value


@attr.s(frozen=True)
class Ratio:
    """A number from 0 to 1 (0 often meaning off)."""

    def parse(self, text, base):
        try:
            value = float(text)
        except ValueError:
            raise _expected("a number from 0 to 1", text) from None
        if not 0 <= value <= 1:
            raise _expected("a number from 0 to 1", text)
        return value

    def render(self, value):
        return repr(float(value))


@attr.s(frozen=True)
class Command:
    """A shell command line, kept as written; empty: none."""

    def parse(self, text, base):
        if "\n" in text or "\0" in text:
            raise _expected("a one-line command", text)
        return text or None

    def render(self, value):
        return value or ""


LOGGING_KEYS = {
    "dir": Key(Path(), ""),
    "max_size": Key(Size(), "100M"),
    "retention_days": Key(Int(1), "30"),
}

METRICS_KEYS = {
    "endpoint": Key(OptionalEndpoint(), ""),
}

ALERTS_KEYS = {
    "interval": Key(Duration(), "30s"),
    "queue_size": Key(Int(0), "0"),
    "oldest_message_age": Key(Duration(positive=False), "0"),
    "deferred_ratio": Key(Ratio(), "0"),
    "connection_timeouts_per_minute": Key(Int(0), "0"),
    "command": Key(Command(), ""),
}

ADMIN_KEYS = {
    "socket": Key(Path(), ""),
}

SECTIONS = {
    "gateway": _plain("gateway", GatewayConfig, GATEWAY_KEYS),
    "limits": _plain("limits", Limits, LIMITS_KEYS),
    "queue": _plain("queue", QueueConfig, QUEUE_KEYS),
    "tls": _plain("tls", TLSConfig, TLS_KEYS),
    "auth": _plain("auth", AuthConfig, AUTH_KEYS),
    "listener": Section(
        "listeners", LISTENER_KEYS, _build_listener, _flatten_listener, _check_listener, named=True
    ),
    "dns": _plain("dns", DNSConfig, DNS_KEYS),
    "delivery": _plain("delivery", DeliveryConfig, DELIVERY_KEYS),
    "route": Section("routes", ROUTE_KEYS, _build_route, _flatten_route, _check_route, named=True),
    "dkim": _plain("dkim", DKIMConfig, DKIM_KEYS, _check_dkim_section),
    "filters": _plain("filters", FiltersConfig, FILTERS_KEYS),
    "spf": _plain("spf", SPFConfig, SPF_KEYS),
    "dmarc": _plain("dmarc", DMARCConfig, DMARC_KEYS),
    "attachments": _plain("attachments", AttachmentsConfig, ATTACHMENTS_KEYS),
    "filter": Section(
        "filter_sections", {}, _build_filter_section, _flatten_filter_section, named=True,
        any_keys=True,
    ),
    "logging": _plain("logging", LoggingConfig, LOGGING_KEYS),
    "metrics": _plain("metrics", MetricsConfig, METRICS_KEYS),
    "alerts": _plain("alerts", AlertsConfig, ALERTS_KEYS),
    "admin": _plain("admin", AdminConfig, ADMIN_KEYS),
}

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_FILE_SIZE = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------


DEFAULT_CONFIG = "/etc/mailgate/mailgate.ini"


def config_file(option=None):
    """Which config the commands use: --config, else $MAILGATE_CONFIG, else DEFAULT_CONFIG."""
    return option or os.environ.get("MAILGATE_CONFIG") or DEFAULT_CONFIG


def load_config(path):
    """Read, parse and check the ini file at path; every problem is one ConfigError."""
    parser = _read(path)
    base = os.path.dirname(os.path.abspath(path))
    found = {kind: [] for kind in SECTIONS}
    for name in parser.sections():
        kind, instance = _classify(path, name)
        found[kind].append((name, instance))
    built = {}
    for kind, section in SECTIONS.items():
        if section.named:
            built[section.field] = tuple(
                section.build(instance, _values(path, base, parser, name, section, built))
                for name, instance in found[kind]
            )
        else:
            values = _values(path, base, parser, kind, section, built)
            built[section.field] = section.build(None, values)
    config = Config(path=os.path.abspath(path), **built)
    for check in CHECKS:
        check(path, config)
    return config


def _read(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read(_MAX_FILE_SIZE + 1)
    except OSError as e:
        raise ConfigError(path, None, None, "cannot read: %s" % (e.strerror or e,))
    except UnicodeDecodeError as e:
        message = "cannot read: not UTF-8 text (byte 0x%02x at offset %d)"
        message %= (e.object[e.start], e.start)
        raise ConfigError(path, None, None, message)
    except ValueError as e:
        raise ConfigError(path, None, None, "cannot read: %s" % (e,))
    if len(text) > _MAX_FILE_SIZE:
        raise ConfigError(path, None, None, "cannot read: larger than 1M, not a config file")
    return _parse(path, text)


def _parse(path, text):
    parser = configparser.ConfigParser(
        interpolation=None,
        strict=True,
        default_section="\0",  # so that [DEFAULT] is an unknown section, not a silent fallback
        inline_comment_prefixes=("#",),
        empty_lines_in_values=False,
    )
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None, "duplicate section (line %s)" % (e.lineno,))
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, "duplicate key (line %s)" % (e.lineno,))
    except configparser.MissingSectionHeaderError as e:
        message = "line %d: %r is not inside a [section]" % (e.lineno, e.line.strip())
        raise ConfigError(path, None, None, message)
    except configparser.ParsingError as e:
        lineno, line = e.errors[0]
        message = "line %d: expected 'key = value', got %r" % (lineno, _unrepr(line).strip())
        raise ConfigError(path, None, None, message)
    except configparser.Error as e:
        raise ConfigError(path, None, None, str(e).splitlines()[0])
    return parser


def _unrepr(line):
    """ParsingError keeps repr(line) in some Python versions and the line in others."""
    try:
        value = ast.literal_eval(line)
    except Exception:  # not a literal at all: the line itself
        return line
    return value if isinstance(value, str) else line


def _classify(path, name):
    """-> (SECTIONS key, instance name or None) for a section name as written."""
    if name in SECTIONS and not SECTIONS[name].named:
        return name, None
    kind, _, instance = name.partition(":")
    if kind not in SECTIONS or not SECTIONS[kind].named:
        raise ConfigError(path, name, None, "unknown section")
    if not _NAME.fullmatch(instance):
        message = "expected [%s:NAME], NAME made of letters, digits, '_', '.' and '-'" % kind
        raise ConfigError(path, name, None, message)
    return kind, instance


def _values(path, base, parser, name, section, built):
    """The typed values of one section (all defaults filled in), checked."""
    given = dict(parser.items(name, raw=True)) if parser.has_section(name) else {}
    if section.any_keys:
        return given  # keys lower-cased by configparser, in file order; values str as written
    for key in given:
        if key not in section.keys:
            raise ConfigError(path, name, key, "unknown key")
    values = {}
    for key, spec in section.keys.items():
        try:
            values[key] = _value(base, spec, key, given, values, built)
        except ValueError as e:
            raise ConfigError(path, name, key, str(e))
    problem = section.check(values) if section.check else None
    if problem:
        raise ConfigError(path, name, *problem)
    return values


def _value(base, spec, key, given, values, built):
    if key in given:
        return spec.kind.parse(given[key], base)
    if spec.default is REQUIRED:
        raise ValueError("required, but not set")
    if callable(spec.default):
        return spec.default(values, built)
    return spec.kind.parse(spec.default, base)


# ---------------------------------------------------------------------------------------------
# Checks across sections, run in order once every section is built: each is (file, config).
# ---------------------------------------------------------------------------------------------


def _check_listeners(path, config):
    if not config.listeners:
        raise ConfigError(path, None, None, "no [listener:NAME] section: at least one is required")
    seen = {}
    for listener in config.listeners:
        first = seen.setdefault(listener.endpoint, listener.name)
        if first != listener.name:
            message = "same endpoint as [listener:%s]" % first
            raise ConfigError(path, "listener:" + listener.name, "endpoint", message)


def _check_tls(path, config):
    users = [listener for listener in config.listeners if listener.tls != "none"]
    keys = ("certificate", "private_key")
    for key in keys:
        if getattr(config.tls, key) is None and users:
            message = "required, because [listener:%s] has tls = %s" % (users[0].name, users[0].tls)
            raise ConfigError(path, "tls", key, message)
    for key in keys:
        value = getattr(config.tls, key)
        if value is not None and not config.tls.generate_self_signed:
            _check_readable(path, "tls", key, value)
    if config.tls.ca_file is not None:
        _check_readable(path, "tls", "ca_file", config.tls.ca_file)


def _check_auth(path, config):
    users = [listener for listener in config.listeners if listener.auth != "none"]
    value = config.auth.users_file
    if value is None and users:
        message = "required, because [listener:%s] has auth = %s" % (users[0].name, users[0].auth)
        raise ConfigError(path, "auth", "users_file", message)
    if value is not None:
        _check_readable(path, "auth", "users_file", value)


def _check_routes(path, config):
    """A domain entry may be in one route only ("*" included)."""
    seen = {}
    for route in config.routes:
        for domain in route.domains:
            first = seen.setdefault(domain, route.name)
            if first != route.name:
                message = "%s is already in [route:%s]" % (domain, first)
                raise ConfigError(path, "route:" + route.name, "domains", message)


def _check_dkim(path, config):
    if config.dkim.private_key is not None:
        _check_readable(path, "dkim", "private_key", config.dkim.private_key)


def _check_readable(path, section, key, filename):
    problem = _file_problem(filename)
    if problem:
        raise ConfigError(path, section, key, problem)


def _file_problem(filename):
    """
    None if filename is a readable regular file, else what is wrong.  Stat first so that a FIFO
    or a directory is refused without blocking on open.
    """
    try:
        mode = os.stat(filename).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "file not found: %s" % filename
    except OSError:
        return "not readable: %s" % filename
    if not stat.S_ISREG(mode):
        return "not a file: %s" % filename
    try:
        open(filename, "rb").close()
    except OSError:
        return "not readable: %s" % filename
    return None


def _check_filter_sections(path, config):
    """A [filter:NAME] is for a filter some listener uses, and never for a built-in one."""
    used = {name for listener in config.listeners for name in listener.filters}
    for section in config.filter_sections:
        if section.name.lower() in BUILTIN_FILTERS:
            message = "built-in filters are configured in [spf], [dmarc], [attachments]"
            raise ConfigError(path, "filter:" + section.name, None, message)
        if section.name not in used:
            message = "not used by any listener's filters"
            raise ConfigError(path, "filter:" + section.name, None, message)


CHECKS = [
    _check_listeners, _check_tls, _check_auth, _check_routes, _check_dkim, _check_filter_sections,
]


# ---------------------------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------------------------


SECRET_KEYS = ("password",)
SECRET_OPTION_WORDS = ("password", "secret", "token")  # in a [filter:NAME] key: hidden
HIDDEN = "<hidden>"


def render_config(config, show_secrets=False):
    """
    The effective configuration as ini text, every default filled in.  Secrets are shown as
    <hidden> (this text ends up in tickets and chat) unless show_secrets; with them it loads back
    as is.
    """
    lines = [
        "# The effective configuration read from %s" % config.path,
        "# (every default filled in%s)" % ("" if show_secrets else "; secrets shown as " + HIDDEN),
    ]
    for kind, section in SECTIONS.items():
        value = getattr(config, section.field)
        for one in value if section.named else [value]:
            name, values = section.flatten(one)
            lines += ["", "[%s]" % (kind if name is None else "%s:%s" % (kind, name))]
            if section.any_keys:
                for key, text in values.items():
                    secret = any(word in key for word in SECRET_OPTION_WORDS)
                    lines.append(_line(key, HIDDEN if secret and not show_secrets else text))
                continue
            for key, spec in section.keys.items():
                text = spec.kind.render(values[key])
                if key in SECRET_KEYS and values[key] is not None and not show_secrets:
                    text = HIDDEN
                lines.append(_line(key, text))
    return "\n".join(lines) + "\n"


def _line(key, text):
    """key = text; a value of several lines continues on indented lines."""
    return ("%s = %s" % (key, text.replace("\n", "\n    "))).rstrip()
