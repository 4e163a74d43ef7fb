"""
``mailgate check-tls``: connect to an SMTP server, STARTTLS (or implicit TLS), and check what it
presents: protocol, cipher, the certificate chain, the host name, expiry, and trust.

Blocking code (socket + pyOpenSSL), for a command line tool; every network step has a timeout.
The result is a list of Finding(status, check, text), status one of OK, WARN, FAIL, INFO; a
command prints one line per finding (Finding.line()) and exits with exit_status(findings).

pyOpenSSL rather than the ssl module: ssl (before Python 3.13) neither shows the chain the server
sent nor tells why verification failed without aborting the handshake.  Here the handshake always
completes (the verify callback notes each problem and goes on), so one connection reports every
problem at once.  Expiry of the server's own certificate and the host name are checked here with
cryptography and service_identity, not by OpenSSL.
"""

import datetime
import ipaddress
import select
import socket
import time

import attr
from cryptography import x509
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"
DEFAULT_PORT = 25
IMPLICIT_TLS_PORT = 465
DEFAULT_TIMEOUT = 10.0
EXPIRY_WARNING = datetime.timedelta(days=30)
_MAX_REPLY_LINES = 100
_MAX_LINE = 4096


@attr.s(frozen=True, slots=True)
class Finding:
    status = attr.ib()  # OK | WARN | FAIL | INFO
    check = attr.ib()  # a short name: "banner", "chain", "mx1.example.com[192.0.2.1] expiry", ...
    text = attr.ib()  # one line, for a newcomer

    def line(self):
        text = " ".join(str(self.text).split())  # one line whatever a server sent us
        return "%-4s  %s: %s" % (self.status, self.check, text)

    def prefixed(self, prefix):
        return attr.evolve(self, check="%s %s" % (prefix, self.check))


def exit_status(findings):
    """0 when every finding is OK or INFO, else 1."""
    return 0 if all(f.status in (OK, INFO) for f in findings) else 1


class TrustStoreError(Exception):
    """The CA file cannot be used (a usage problem: one line, exit 1)."""


def now():
    return datetime.datetime.now(datetime.timezone.utc)


# --- HOST[:PORT] -------------------------------------------------------------------------------


def parse_target(text, default_port=DEFAULT_PORT):
    """
    (host, port) of "host", "host:port", "192.0.2.1:25", "[2001:db8::1]:25", "[::1]" or a bare
    IPv6 address; ValueError for anything else.
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("expected HOST, HOST:PORT or [IPv6]:PORT, got %r" % (text,))
        port = rest[1:] if rest else None
    elif text.count(":") > 1:  # a bare IPv6 address: no port
        host, port = text, None
    else:
        host, _, port = text.partition(":")
        port = port if _ else None
    if not host:
        raise ValueError("expected HOST, HOST:PORT or [IPv6]:PORT, got %r" % (text,))
    if port is None:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected a port number from 1 to 65535, got %r" % (port,))
    return host, int(port)


def _ip(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def resolve_host(host, port, lookups=None):
    """
    The IP addresses (str) to connect to for host: an IP literal is its own; else lookups (a
    mailgate.ops.diagnose.Lookups, when a config names nameservers) or the system's getaddrinfo.
    Raises LookupError with a one-line reason.
    """
    if _ip(host) is not None:
        return [str(_ip(host))]
    if lookups is not None:
        addresses = lookups.addresses(host)
        if not addresses:
            raise LookupError("%s has no A or AAAA records" % (host,))
        return addresses
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LookupError("cannot resolve %s: %s" % (host, e.strerror or e))
    except UnicodeError as e:
        raise LookupError("%r is not a valid host name: %s" % (host, e))
    addresses = []
    for info in infos:
        if info[4][0] not in addresses:
            addresses.append(info[4][0])
    return addresses


# --- the trust store ---------------------------------------------------------------------------


def trust_store_name(cafile):
    return cafile if cafile else "the system's trust store"


def _context(cafile, errors):
    """A client context that completes every handshake, noting verification errors in errors."""

    def verify(connection, cert, errnum, depth, ok):
        if errnum:
            errors.append((depth, errnum, _name(cert)))
        return True

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_PEER, verify)
    if cafile:
        try:
            with open(cafile, "rb"):
                pass
            context.load_verify_locations(cafile)
        except OSError as e:
            raise TrustStoreError("cannot read %s: %s" % (cafile, e.strerror or e))
        except SSL.Error as e:
            raise TrustStoreError("%s: no usable CA certificate (%s)" % (cafile, _ssl_reason(e)))
    else:
        context.set_default_verify_paths()
    return context


def check_trust_store(cafile):
    """Raise TrustStoreError now when cafile cannot be used."""
    _context(cafile, [])


def _name(cert):
    """A certificate subject as text (RFC 4514), from a pyOpenSSL X509."""
    try:
        return cert.to_cryptography().subject.rfc4514_string()
    except Exception:
        return "(unreadable name)"


# X509_V_ERR_* codes, explained.
_VERIFY_ERRORS = {
    2: "the issuer of %(who)s is missing from the chain and the trust store",
    4: "the signature of %(who)s cannot be decrypted",
    7: "the signature of %(who)s does not verify: the chain is broken or forged",
    9: "%(who)s is not valid yet",
    10: "%(who)s has expired",
    18: "the certificate is self-signed: nobody vouches for it",
    19: "the chain ends at a self-signed root (%(name)s) that %(store)s does not trust",
    20: "the issuer of %(who)s is not in %(store)s: the server may be missing an intermediate"
        " certificate, or it uses a private CA (use --ca-file)",
    21: "%(who)s cannot be verified: no issuer certificate found (missing intermediate?)",
    24: "%(who)s is used as a CA but is not allowed to be one",
    26: "%(who)s is not meant for TLS servers (its key usage / extended key usage)",
    27: "the root (%(name)s) is not trusted for this purpose",
    28: "the root (%(name)s) is explicitly rejected by %(store)s",
}


def _explain_verify_error(depth, errnum, name, store):
    who = "the server's certificate" if depth == 0 else "certificate %d (%s)" % (depth, name)
    default = "OpenSSL verification error %d at %%(who)s" % (errnum,)
    template = _VERIFY_ERRORS.get(errnum, default)
    return template % dict(who=who, name=name, store=store)


def _ssl_reason(error):
    """The OpenSSL reasons in an SSL.Error, as one short text."""
    if isinstance(error, SSL.SysCallError):
        code, text = (error.args + (None, None))[:2]
        if code == -1 or text in ("Unexpected EOF", None):
            return "the server closed the connection"
        return str(text)
    parts = []
    for item in (error.args[0] if error.args and isinstance(error.args[0], list) else []):
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return ", ".join(parts) or str(error) or error.__class__.__name__


# --- the SMTP dialogue -------------------------------------------------------------------------


class _Failed(Exception):
    """A step failed: its finding is finding."""

    def __init__(self, status, check, text):
        Exception.__init__(self, text)
        self.finding = Finding(status, check, text)


class _Wire:
    """One connection: a plain socket, later a pyOpenSSL Connection over it; timeouts throughout."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.tls = None
        self.timeout = timeout
        self.buffer = b""
        sock.settimeout(0)  # non-blocking: every wait is a select() with a deadline

    def _wait(self, deadline, read=True):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("no answer within %g seconds" % (self.timeout,))
        readable, writable, _ = select.select(
            [self.sock] if read else [], [] if read else [self.sock], [], left
        )
        if not readable and not writable:
            raise socket.timeout("no answer within %g seconds" % (self.timeout,))

    def _io(self, operation, deadline, reading=True):
        while True:
            try:
                return operation()
            except SSL.WantReadError:
                self._wait(deadline, read=True)
            except SSL.WantWriteError:
                self._wait(deadline, read=False)
            except BlockingIOError:  # the plain socket: it waits the way it was going
                self._wait(deadline, read=reading)

    def send(self, data):
        deadline = time.monotonic() + self.timeout
        target = self.tls if self.tls is not None else self.sock
        while data:
            sent = self._io(lambda: target.send(data), deadline, reading=False)
            data = data[sent:]

    def _recv(self, deadline):
        target = self.tls if self.tls is not None else self.sock
        try:
            data = self._io(lambda: target.recv(65536), deadline)
        except SSL.ZeroReturnError:
            data = b""
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def readline(self, deadline):
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                raise ValueError("a reply line longer than %d bytes" % (_MAX_LINE,))
            self.buffer += self._recv(deadline)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode("utf-8", "replace")

    def reply(self):
        """(code int, [text lines]) of one SMTP reply, multi-line ones included."""
        deadline = time.monotonic() + self.timeout
        lines = []
        while True:
            line = self.readline(deadline)
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                raise ValueError("not an SMTP reply: %r" % (line[:80],))
            lines.append(line)
            if line[3:4] != "-" or len(lines) >= _MAX_REPLY_LINES:
                return int(line[:3]), [l[4:] for l in lines]

    def command(self, line):
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def start_tls(self, context, servername):
        connection = SSL.Connection(context, self.sock)
        connection.set_connect_state()
        if servername and _ip(servername) is None:
            try:
                connection.set_tlsext_host_name(servername.encode("idna"))
            except UnicodeError:
                pass
        self.tls = connection
        self.buffer = b""
        deadline = time.monotonic() + self.timeout
        self._io(connection.do_handshake, deadline)

    def close(self):
        try:
            if self.tls is not None:
                self.tls.shutdown()
        except Exception:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _quote(lines):
    return " / ".join(lines)[:200]


def probe(address, port, servername, cafile=None, implicit=None, timeout=DEFAULT_TIMEOUT,
          ehlo_name="localhost"):
    """
    Check the SMTP server at address (an IP) and port: the findings, in order.  servername is the
    name expected in its certificate (and sent as SNI); cafile the trust store (None: the
    system's); implicit TLS from the first byte when implicit, or (None) when port is 465.
    Never raises for what the server does (TrustStoreError for an unusable cafile).
    """
    if implicit is None:
        implicit = port == IMPLICIT_TLS_PORT
    errors = []
    context = _context(cafile, errors)
    findings = []
    where = "%s port %d" % (address if ":" not in address else "[%s]" % address, port)
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except socket.timeout:
        return [Finding(FAIL, "connect", "no answer from %s within %g seconds (a firewall drops"
                        " the connection, or the host is down)" % (where, timeout))]
    except ConnectionRefusedError:
        return [Finding(FAIL, "connect", "connection to %s refused: no SMTP server listens"
                        " there" % (where,))]
    except OSError as e:
        return [Finding(FAIL, "connect", "cannot connect to %s: %s" % (where, e.strerror or e))]
    wire = _Wire(sock, timeout)
    try:
        findings.append(Finding(INFO, "connect", "connected to %s%s" % (
            where, ", implicit TLS (TLS from the first byte, as on port 465)" if implicit else "")))
        if implicit:
            _handshake(wire, context, servername, "tls")
        _dialogue(wire, findings, ehlo_name, implicit)
        if not implicit:
            _starttls(wire, context, servername, findings)
        try:
            findings += _session_findings(wire.tls, servername, errors, cafile)
        except Exception as e:  # a certificate cryptography cannot parse, ...
            findings.append(Finding(FAIL, "certificate", "cannot read the server's certificate:"
                                    " %s: %s" % (e.__class__.__name__, e)))
        try:
            wire.command("QUIT")
        except Exception:
            pass  # we are done; a server that drops us here is not our problem
    except _Failed as e:
        findings.append(e.finding)
    finally:
        wire.close()
    return findings


def _step(wire, check, what, action):
    """Run action (a wire operation); a timeout, a closed connection or garbage is a FAIL."""
    try:
        return action()
    except socket.timeout:
        raise _Failed(FAIL, check, "no answer to %s within %g seconds" % (what, wire.timeout))
    except (ConnectionError, SSL.ZeroReturnError):
        raise _Failed(FAIL, check, "the server closed the connection after %s" % (what,))
    except SSL.Error as e:
        raise _Failed(FAIL, check, "TLS error after %s: %s" % (what, _ssl_reason(e)))
    except OSError as e:
        raise _Failed(FAIL, check, "network error after %s: %s" % (what, e.strerror or e))
    except ValueError as e:
        raise _Failed(FAIL, check, "the server's answer to %s is not SMTP: %s" % (what, e))


def _dialogue(wire, findings, ehlo_name, implicit):
    """Banner and EHLO; for STARTTLS, whether it is offered (a FAIL ends the probe)."""
    code, lines = _step(wire, "banner", "connecting", wire.reply)
    if code != 220:
        raise _Failed(FAIL, "banner", "the server refuses mail: its greeting is %d %s"
                      % (code, _quote(lines)))
    findings.append(Finding(OK, "banner", "220 %s" % (_quote(lines),)))
    code, lines = _step(wire, "ehlo", "EHLO", lambda: wire.command("EHLO " + ehlo_name))
    if code != 250:
        raise _Failed(FAIL, "ehlo", "EHLO %s answered %d %s: the server does not speak ESMTP, so"
                      " it cannot offer STARTTLS" % (ehlo_name, code, _quote(lines)))
    extensions = [line.split(" ", 1)[0].upper() for line in lines[1:]]
    if not implicit:
        if "STARTTLS" not in extensions:
            raise _Failed(FAIL, "starttls", "STARTTLS is not offered in the EHLO reply: mail to"
                          " this server travels unencrypted")
        findings.append(Finding(OK, "starttls", "offered in the EHLO reply"))


def _starttls(wire, context, servername, findings):
    code, lines = _step(wire, "starttls", "STARTTLS", lambda: wire.command("STARTTLS"))
    if code != 220:
        raise _Failed(FAIL, "starttls", "STARTTLS was offered but refused: %d %s"
                      % (code, _quote(lines)))
    if wire.buffer:
        raise _Failed(FAIL, "starttls", "the server sent %d bytes after its 220 to STARTTLS,"
                      " before the TLS handshake (a STARTTLS response injection flaw)"
                      % (len(wire.buffer),))
    _handshake(wire, context, servername, "tls")


def _handshake(wire, context, servername, check):
    try:
        wire.start_tls(context, servername)
    except socket.timeout:
        raise _Failed(FAIL, check, "the TLS handshake did not finish within %g seconds"
                      % (wire.timeout,))
    except SSL.Error as e:
        raise _Failed(FAIL, check, "the TLS handshake failed: %s" % (_ssl_reason(e),))
    except (ConnectionError, OSError) as e:
        raise _Failed(FAIL, check, "the TLS handshake failed: %s" % (
            getattr(e, "strerror", None) or e,))


# --- what the TLS session shows ----------------------------------------------------------------


def _chain(connection):
    try:
        chain = connection.get_peer_cert_chain(as_cryptography=True)
    except TypeError:  # pyOpenSSL < 24.3
        chain = [c.to_cryptography() for c in connection.get_peer_cert_chain() or []]
    return list(chain or [])


def _validity(cert):
    try:
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        utc = datetime.timezone.utc
        return cert.not_valid_before.replace(tzinfo=utc), cert.not_valid_after.replace(tzinfo=utc)


def san_names(cert):
    """The subjectAltName entries as text: DNS names as is, IP addresses as IP:..."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError:  # a malformed extension
        return ["(unreadable subjectAltName)"]
    names = list(san.get_values_for_type(x509.DNSName))
    names += ["IP:%s" % (ip,) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def describe_certificate(cert):
    _, not_after = _validity(cert)
    names = san_names(cert)
    return "subject %s; issuer %s; names %s; valid until %s" % (
        cert.subject.rfc4514_string() or "(empty)",
        cert.issuer.rfc4514_string() or "(empty)",
        ", ".join(names) if names else "(no subjectAltName)",
        not_after.strftime("%Y-%m-%d %H:%M UTC"),
    )


def hostname_finding(cert, servername):
    """Whether cert covers servername (RFC 6125, via service_identity)."""
    names = ", ".join(san_names(cert)) or "none"
    ip = _ip(servername)
    try:
        if ip is not None:
            verify_certificate_ip_address(cert, str(ip))
        else:
            verify_certificate_hostname(cert, servername)
    except CertificateError:
        return Finding(FAIL, "hostname", "the certificate has no subjectAltName, so it names no"
                       " host at all (clients ignore the CN); expected %s" % (servername,))
    except VerificationError:
        return Finding(FAIL, "hostname", "the certificate is for %s, not %s: senders that check"
                       " names will refuse it" % (names, servername))
    except Exception as e:  # a name service_identity cannot handle (bad IDNA, ...)
        return Finding(FAIL, "hostname", "cannot match %r against the certificate (%s): %s"
                       % (servername, names, e))
    return Finding(OK, "hostname", "the certificate covers %s" % (servername,))


def expiry_finding(cert, when=None):
    when = now() if when is None else when
    not_before, not_after = _validity(cert)
    if not_after <= when:
        return Finding(FAIL, "expiry", "the certificate expired on %s: senders that check"
                       " certificates refuse it; renew it" % (not_after.strftime("%Y-%m-%d"),))
    if not_before > when:
        return Finding(FAIL, "expiry", "the certificate is not valid before %s: check the"
                       " server's clock or the certificate" % (not_before.strftime("%Y-%m-%d"),))
    left = not_after - when
    if left < EXPIRY_WARNING:
        return Finding(WARN, "expiry", "the certificate expires on %s, in %d days: renew it soon"
                       % (not_after.strftime("%Y-%m-%d"), left.days))
    return Finding(OK, "expiry", "valid until %s (%d days left)"
                   % (not_after.strftime("%Y-%m-%d"), left.days))


def _session_findings(connection, servername, errors, cafile):
    findings = []
    version = connection.get_protocol_version_name()
    cipher = connection.get_cipher_name()
    bits = connection.get_cipher_bits()
    session = "%s, cipher %s (%s bits)" % (version, cipher, bits)
    if version in ("TLSv1.2", "TLSv1.3"):
        findings.append(Finding(OK, "tls", session))
    else:
        findings.append(Finding(WARN, "tls", "%s: an obsolete TLS version; the server should"
                                " offer TLS 1.2 or 1.3" % (session,)))
    chain = _chain(connection)
    if not chain:
        findings.append(Finding(FAIL, "certificate", "the server sent no certificate"))
        return findings
    for index, cert in enumerate(chain):
        findings.append(Finding(INFO, "certificate %d" % (index,), describe_certificate(cert)))
    findings.append(hostname_finding(chain[0], servername))
    findings.append(expiry_finding(chain[0]))
    store = trust_store_name(cafile)
    # The leaf's own dates are the expiry check's business; everything else is the chain's.
    problems = []
    for depth, errnum, name in errors:
        if depth == 0 and errnum in (9, 10):
            continue
        text = _explain_verify_error(depth, errnum, name, store)
        if text not in problems:
            problems.append(text)
    if problems:
        findings.append(Finding(FAIL, "chain", "not trusted: %s" % ("; ".join(problems),)))
    else:
        findings.append(Finding(OK, "chain", "trusted: it leads to a CA in %s" % (store,)))
    return findings


def check_host(host, port, servername=None, cafile=None, implicit=None,
               timeout=DEFAULT_TIMEOUT, ehlo_name="localhost", lookups=None):
    """
    ``mailgate check-tls``: resolve host (see resolve_host), probe the first address that
    accepts a connection.  The findings.
    """
    servername = servername or host
    try:
        addresses = resolve_host(host, port, lookups)
    except LookupError as e:
        return [Finding(FAIL, "connect", str(e.args[0] if e.args else e))]
    findings = []
    for index, address in enumerate(addresses):
        result = probe(address, port, servername, cafile, implicit, timeout, ehlo_name)
        connected = not (result and result[0].check == "connect" and result[0].status == FAIL)
        if connected or index == len(addresses) - 1:
            return findings + result
        findings += result  # this address did not answer: say so, try the next
    return findings


def default_ehlo_name():
    """This machine's name for EHLO, without asking DNS (socket.getfqdn() would)."""
    name = socket.gethostname() or "localhost"
    return name if all(c.isalnum() or c in "-." for c in name) else "localhost"


__all__ = [
    "Finding", "OK", "WARN", "FAIL", "INFO", "TrustStoreError", "check_host", "check_trust_store",
    "exit_status", "parse_target", "probe", "resolve_host", "hostname_finding", "expiry_finding",
    "describe_certificate", "default_ehlo_name",
]
