"""
The value kinds: each turns the text of one ini value into a typed value (raising ValueError with
what was expected and what was given), back into text for render_config, and describes itself
for the README's reference (describe(): its Type column; EMPTY: an empty default in words).

Sizes are ints (bytes), durations are floats (seconds), CIDR lists are tuples of
ipaddress.ip_network objects, paths are absolute str.  The kinds know nothing of sections, so
every section module shares them.
"""

import configparser
import ipaddress
import os
import re
import stat

import attr
from twisted.internet import endpoints


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

    def describe(self):
        if None not in (self.minimum, self.maximum):
            return "integer from %d to %d" % (self.minimum, self.maximum)
        if self.minimum is not None:
            return "integer ≥ %d" % self.minimum
        if self.maximum is not None:
            return "integer ≤ %d" % self.maximum
        return "integer"

    def render(self, value):
        return str(value)


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}




@attr.s(frozen=True)
class ProcessCount:
    """`auto` (0: one a CPU) or an integer from 1 to 64."""

    def parse(self, text, base):
        if text.lower() == "auto":
            return 0
        return Int(1, 64).parse(text, base)

    def describe(self):
        return "`auto` or an integer from 1 to 64"

    def render(self, value):
        return "auto" if value == 0 else str(value)

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

    def describe(self):
        return "size"

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

    def describe(self):
        return "duration" if self.positive else "duration, `0` for off"

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

    def describe(self):
        return "boolean"

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

    def describe(self):
        return "choice: " + ", ".join("`%s`" % choice for choice in self.choices)

    def render(self, value):
        return value


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _hostname(text):
    """
    A lower-case DNS name (LDH labels); one trailing dot is dropped.  An internationalised name
    (U-labels, "bücher.example") becomes its A-label form ("xn--bcher-kva.example"), the form
    every comparison and DNS question uses.
    """
    name = text.lower()
    name = name[:-1] if name.endswith(".") else name
    if not name.isascii():
        name = _a_labels(name, text)
    if 1 <= len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split(".")):
        return name
    raise _expected("a hostname like mail.example.com", text)


def _a_labels(name, text):
    import idna

    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        raise _expected("a hostname like mail.example.com (or an IDNA name)", text) from None


@attr.s(frozen=True)
class Hostname:
    def parse(self, text, base):
        return _hostname(text)

    def describe(self):
        return "hostname"

    def render(self, value):
        return value


@attr.s(frozen=True)
class DomainList:
    """A tuple of lower-case domains, duplicates dropped, order kept."""

    EMPTY = "empty"  # what an empty default reads as in the reference

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

    def describe(self):
        return "list of domains"

    def render(self, value):
        return ", ".join(value)


@attr.s(frozen=True)
class NetworkList:
    """A tuple of ipaddress networks; a bare address is a single host."""

    EMPTY = "empty"  # what an empty default reads as in the reference

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

    def describe(self):
        return "CIDR list"

    def render(self, value):
        return ", ".join(str(network) for network in value)


@attr.s(frozen=True)
class Path:
    """An absolute path; relative ones are taken from the config file's directory."""

    optional = attr.ib(default=True)  # then an empty value means not set: None

    EMPTY = "not set"  # what an empty default reads as in the reference

    def parse(self, text, base):
        if not text and self.optional:
            return None
        if not text or "\n" in text or "\0" in text:
            raise _expected("a path", text)
        return os.path.normpath(os.path.join(base, text))

    def describe(self):
        return "path"

    def render(self, value):
        return "" if value is None else value


_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")
PROXY_PREFIX = "haproxy:"  # the PROXY protocol (v1 and v2) around any of _ENDPOINT_TYPES


def proxied_endpoint(text):
    """(whether text asks for the PROXY protocol, the endpoint string inside)."""
    if text.startswith(PROXY_PREFIX):
        return True, text[len(PROXY_PREFIX):]
    return False, text


@attr.s(frozen=True)
class Endpoint:
    """
    A Twisted server endpoint string of an allowed type, kept as written; `haproxy:` before one
    of them for listeners behind a load balancer that sends the PROXY protocol.
    """

    def parse(self, text, base):
        proxied, inner = proxied_endpoint(text)
        if proxied and inner.startswith(PROXY_PREFIX):
            raise _expected("haproxy: once, around a tcp, tcp6, unix or systemd endpoint", text)
        kind = inner.split(":", 1)[0]
        if kind == "ssl":
            message = "ssl endpoints are not used: write tcp:PORT and tls = implicit, got %r"
            raise ValueError(message % text)
        if kind not in _ENDPOINT_TYPES or ":" not in inner:
            what = "an endpoint like tcp:25 of type %s (or haproxy: before one)"
            raise _expected(what % ", ".join(_ENDPOINT_TYPES), text)
        try:
            endpoint = endpoints.serverFromString(None, inner)
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

    def describe(self):
        return "Twisted server endpoint"

    def render(self, value):
        return value


@attr.s(frozen=True)
class OptionalEndpoint:
    """An Endpoint, or empty for "off"."""

    EMPTY = "not set"  # what an empty default reads as in the reference

    def parse(self, text, base):
        return Endpoint().parse(text, base) if text else None

    def describe(self):
        return "Twisted server endpoint, empty for off"

    def render(self, value):
        return "" if value is None else value


@attr.s(frozen=True)
class Port:
    def parse(self, text, base):
        return _port(text, text)

    def describe(self):
        return "port"

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

    EMPTY = "empty"  # what an empty default reads as in the reference

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

    def describe(self):
        return "list of `ip[:port]`"

    def render(self, value):
        return ", ".join(_join_port(host, port) for host, port in value)


@attr.s(frozen=True)
class HostList:
    """A tuple of (host str, port int): a DNS name or an IP address, then :port (default 25)."""

    default_port = attr.ib(default=25)
    _WHAT = "a host like mx.example.com, mx.example.com:587, 192.0.2.25 or [2001:db8::25]:25"

    EMPTY = "not set"  # what an empty default reads as in the reference

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

    def describe(self):
        return "host list, default port %d" % self.default_port

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

    def describe(self):
        return "list of durations, at least one"

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

    def describe(self):
        return "list of domain patterns"

    def render(self, value):
        return ", ".join(value)


@attr.s(frozen=True)
class Label:
    """One lower-case DNS label (a DKIM selector)."""

    optional = attr.ib(default=True)  # then an empty value means not set: None

    EMPTY = "not set"  # what an empty default reads as in the reference

    def parse(self, text, base):
        if not text and self.optional:
            return None
        if not _LABEL.fullmatch(text.lower()):
            raise _expected("a DNS label like mail2024 (letters, digits and '-')", text)
        return text.lower()

    def describe(self):
        return "a DNS label (letters, digits, `-`); lower-cased"

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

    def describe(self):
        return "list of header names; lower-cased"

    def render(self, value):
        return ", ".join(value)


@attr.s(frozen=True)
class HeaderPatternList:
    """
    A tuple of lower-case header field names, each maybe ending in "*" (every name starting with
    what comes before it), duplicates dropped; empty or none: no header.
    """

    EMPTY = "none"

    def parse(self, text, base):
        if text.strip().lower() == "none":
            return ()
        patterns = []
        for item in _items(text):
            name = item[:-1] if item.endswith("*") else item
            if not _HEADER_NAME.fullmatch(name) or "*" in name:
                raise _expected("a list of header names like X-Originating-IP or prefixes like "
                                "X-MS-Exchange-Organization-*", item)
            if item.lower() not in patterns:
                patterns.append(item.lower())
        return tuple(patterns)

    def describe(self):
        return "list of header names, `Prefix-*` patterns, or `none`"

    def render(self, value):
        return ", ".join(value) if value else "none"


@attr.s(frozen=True)
class ChoiceList:
    """A tuple of words out of choices (any case), each at most once, at least one."""

    choices = attr.ib()

    def parse(self, text, base):
        chosen = []
        for item in _items(text):
            word = Choice(self.choices).parse(item, base)
            if word in chosen:
                raise ValueError("%s is listed twice" % word)
            chosen.append(word)
        if not chosen:
            raise _expected("one or more of %s" % ", ".join(self.choices), text)
        return tuple(chosen)

    def describe(self):
        return "list of " + ", ".join("`%s`" % choice for choice in self.choices)

    def render(self, value):
        return ", ".join(value)


@attr.s(frozen=True)
class Text:
    """One line of text, kept as written (a username, a password); empty means not set: None."""

    EMPTY = "not set"  # what an empty default reads as in the reference

    def parse(self, text, base):
        if "\n" in text:
            raise ValueError("expected a single line, got a value continued on the next line")
        return text or None

    def describe(self):
        return "text"

    def render(self, value):
        return "" if value is None else value


_DSN_URL = re.compile(r"postgres(?:ql)?://", re.IGNORECASE)
_DSN_PAIR = re.compile(r"""\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']+)""")
_DSN_URL_PASSWORD = re.compile(r"\A(postgres(?:ql)?://[^:@/?#]*:)([^@/?#]*)(@)", re.IGNORECASE)


def _dsn_pairs(text):
    """The (key, value) pairs of a libpq key=value connection string; ValueError when it is not one."""
    pairs, position = [], 0
    while text[position:].strip():
        match = _DSN_PAIR.match(text, position)
        if not match:
            raise _expected("a libpq connection string (key=value ...) or a postgresql:// URL", text)
        pairs.append((match.group(1).lower(), match.group(2)))
        position = match.end()
    return pairs


@attr.s(frozen=True)
class Dsn:
    """
    A libpq connection string (key=value pairs) or postgresql:// URL, kept as written; checked
    for its shape only (libpq itself judges the keys).  render_hidden() masks a password in it.
    """

    EMPTY = "not set"

    def parse(self, text, base):
        if not text:
            return None
        if "\n" in text:
            raise ValueError("expected a single line, got a value continued on the next line")
        if not _DSN_URL.match(text):
            if not _dsn_pairs(text):
                raise _expected("a libpq connection string or a postgresql:// URL", text)
        return text

    def describe(self):
        return "libpq connection string or URL"

    def render(self, value):
        return "" if value is None else value

    def render_hidden(self, value, hidden):
        """value with any password in it replaced by hidden (for check-config)."""
        if value is None:
            return ""
        if _DSN_URL.match(value):
            value = _DSN_URL_PASSWORD.sub(lambda m: m.group(1) + hidden + m.group(3), value)
            return re.sub(r"([?&]password=)[^&]*", lambda m: m.group(1) + hidden, value)
        return _DSN_PAIR.sub(
            lambda m: m.group(0) if m.group(1).lower() != "password"
            else m.group(0)[: m.start(2) - m.start(0)] + hidden, value)


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


def has_entries(filename):
    """Does a users file hold any entry (a line that is neither blank nor a # comment)?"""
    try:
        with open(filename, "rb") as f:
            text = f.read(1024 * 1024)
    except OSError:
        return True
    return any(line.strip() and not line.strip().startswith(b"#") for line in text.splitlines())


def private_file_problem(filename, holds_secret=None):
    """
    None if filename (a readable file holding a secret) can be read by its owner and group only,
    else what is wrong: a private key or password hashes must not be readable by everyone.
    holds_secret(filename), when given, says whether there is a secret in it at all (a users file
    with no users, like the repository's example, may be anyone's).
    """
    try:
        mode = os.stat(filename).st_mode
    except OSError:
        return None  # _file_problem says what is wrong with it
    if mode & (stat.S_IROTH | stat.S_IWOTH) and (holds_secret is None or holds_secret(filename)):
        return ("%s can be read or written by anyone (mode %04o): allow its owner and group only "
                "(chmod o-rwx %s)" % (filename, stat.S_IMODE(mode), filename))
    return None


@attr.s(frozen=True)
class SecretFile:
    """
    A path to a file whose first line (stripped) is a secret, read at load: the value is the
    secret, not the path (None when not set).
    """

    _MAX_LINE = 4096

    EMPTY = "not set"  # what an empty default reads as in the reference

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

    def describe(self):
        return "path"

    def render(self, value):
        return ""  # the secret itself is rendered by the key it stands for


BUILTIN_FILTERS = ("spf", "dkim", "dmarc", "attachments")
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

    def describe(self):
        return "list of filter names; empty for none"

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

    def describe(self):
        return "list of file name extensions, or `none`"

    def render(self, value):
        return ", ".join(value) if value else "none"


_MIME_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"  # RFC 6838 restricted-name
_MIME_TYPE = re.compile(r"%s/(?:%s|\*)" % (_MIME_NAME, _MIME_NAME))


@attr.s(frozen=True)
class MimeTypeList:
    """A tuple of lower-case "type/subtype" or "type/*", duplicates dropped, order kept."""

    EMPTY = "empty"  # what an empty default reads as in the reference

    def parse(self, text, base):
        types = []
        for item in _items(text):
            if not _MIME_TYPE.fullmatch(item.lower()):
                what = "a list of MIME types like application/x-msdownload or application/*"
                raise _expected(what, item)
            if item.lower() not in types:
                types.append(item.lower())
        return tuple(types)

    def describe(self):
        return "list of `type/subtype` or `type/*`"

    def render(self, value):
        return ", ".join(value)


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

    def describe(self):
        return "number from 0 to 1"

    def render(self, value):
        return repr(float(value))


@attr.s(frozen=True)
class Command:
    """A shell command line, kept as written; empty: none."""

    EMPTY = "not set"  # what an empty default reads as in the reference

    def parse(self, text, base):
        if "\n" in text or "\0" in text:
            raise _expected("a one-line command", text)
        return text or None

    def describe(self):
        return "shell command line"

    def render(self, value):
        return value or ""


@attr.s(frozen=True, slots=True)
class Rate:
    """count events per seconds: "60/1m" is Rate(60, 60.0)."""

    count = attr.ib()
    seconds = attr.ib()

    def __str__(self):
        return "%d/%s" % (self.count, Duration().render(self.seconds))


@attr.s(frozen=True)
class RateLimit:
    """COUNT/DURATION (60/1m, 1000/1h, 5/30s; a bare 1m means 1m); empty: no limit (None)."""

    EMPTY = "no limit"  # what an empty default reads as in the reference

    def parse(self, text, base):
        if not text:
            return None
        match = re.fullmatch(r"([0-9]+) */ *(.+)", text)
        if not match or int(match.group(1)) < 1:
            raise _expected("a rate like 60/1m (count per duration), or empty for no limit", text)
        try:
            seconds = Duration().parse(match.group(2).strip(), base)
        except ValueError:
            raise _expected("a rate like 60/1m (count per duration), or empty for no limit", text)
        return Rate(int(match.group(1)), seconds)

    def describe(self):
        return "rate `COUNT/DURATION`, empty for no limit"

    def render(self, value):
        return "" if value is None else str(value)


RELAY_IPS = "relay_ips"  # in a limit_exempt_ips list: the listener's relay_ips


@attr.s(frozen=True)
class ExemptList:
    """
    A NetworkList in which the word relay_ips stands for the listener's relay_ips: a tuple of
    ipaddress networks, with the str "relay_ips" where it was written.
    """

    EMPTY = "empty"

    def parse(self, text, base):
        out = []
        for item in _items(text):
            if item.lower() == RELAY_IPS:
                if RELAY_IPS not in out:
                    out.append(RELAY_IPS)
            else:
                out.append(NetworkList()._network(item))
        return tuple(out)

    def describe(self):
        return "CIDR list; `relay_ips` for the listener's `relay_ips`"

    def render(self, value):
        return ", ".join(str(item) for item in value)
