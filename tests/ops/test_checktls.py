"""
mailgate check-tls against threaded SMTP sinks on loopback with test-CA certificates, and the
local certificate checks of mailgate check-config.

Nothing here may ask the system's DNS resolver: the guard fixture makes any such attempt fail.
"""

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import threading

import dns.resolver
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailgate import cli

from mailgate.ops import checktls
from tests.dnsserver import TestDNS
from tests.sinks import Sink
from tests.tlsutil import make_ca

from tests import REPO
HOST = "mx.example.test"


# --- helpers shared with test_diagnose ---------------------------------------------------------


@pytest.fixture(autouse=True)
def no_system_resolver(monkeypatch):
    """Fail any test that would read /etc/resolv.conf or resolve a name through the system."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        text = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise AssertionError("a test asked the system resolver for %r" % (text,))
        return real(host, *args, **kwargs)

    def read_resolv_conf(self, *args, **kwargs):
        raise AssertionError("a test used the system's resolv.conf")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", read_resolv_conf)


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def write_cert(directory, name, hostname, issuer=None, days=90, start_days=-1, chain=None):
    """
    A certificate for hostname valid from now + start_days to now + days, signed by issuer (a
    tests.tlsutil.CA) or self-signed when issuer is None.  Writes NAME.pem (the leaf, then chain:
    a list of certificates, default the issuer's) and NAME.key; returns their paths.
    """
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=start_days))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    if chain is None:
        chain = [issuer.cert] if issuer else []
    cert_path = os.path.join(directory, name + ".pem")
    key_path = os.path.join(directory, name + ".key")
    with open(cert_path, "wb") as f:
        f.write(_pem(cert) + b"".join(_pem(c) for c in chain))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def make_intermediate(ca, directory, expired=False):
    """An intermediate CA under ca: an object with .key, .cert (like tests.tlsutil.CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgate test intermediate")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now + datetime.timedelta(days=-1 if expired else 300))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca.key, hashes.SHA256())
    )

    class Intermediate:
        pass

    intermediate = Intermediate()
    intermediate.key, intermediate.cert = key, cert
    return intermediate


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def findings(out):
    """{check: [(status, text)]} and the list of (status, check, text) of a command's output."""
    parsed = []
    for line in out.splitlines():
        status, rest = line.split(None, 1)
        assert status in ("OK", "WARN", "FAIL", "INFO"), line
        check, text = rest.split(": ", 1)
        parsed.append((status, check, text))
    by_check = {}
    for status, check, text in parsed:
        by_check.setdefault(check, []).append((status, text))
    return by_check, parsed


def statuses(by_check, check):
    return [status for status, _ in by_check.get(check, [])]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pki"))
    ca = make_ca(root)
    good = ca.issue(HOST, os.path.join(root, "good"))
    expired = ca.issue(HOST, os.path.join(root, "expired"), expired=True)
    soon = write_cert(os.path.join(root, "soon"), "server", HOST, ca, days=10)
    return dict(ca=ca, root=root, good=good, expired=expired, soon=soon)


@pytest.fixture
def sinks():
    started = []

    def start(**behaviour):
        sink = Sink(**behaviour)
        sink.start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()
        assert sink.errors == []


def tls_sink(sinks, pair, **behaviour):
    cert, key = pair
    return sinks(starttls=True, cert=cert, key=key, **behaviour)


def test_the_guard_blocks_the_system_resolver():
    with pytest.raises(AssertionError):
        socket.getaddrinfo("example.com", 25)
    with pytest.raises(AssertionError):
        dns.resolver.Resolver()


# --- check-tls ---------------------------------------------------------------------------------


def test_good_certificate(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["good"])
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--ca-file",
                         pki["ca"].ca_path, "--servername", HOST, "--timeout", 5)
    by_check, parsed = findings(out)
    assert (code, err) == (0, ""), out
    assert [check for _, check, _ in parsed] == [
        "connect", "banner", "starttls", "tls", "certificate 0", "certificate 1", "hostname",
        "expiry", "chain",
    ]
    assert all(status in ("OK", "INFO") for status, _, _ in parsed)
    assert statuses(by_check, "starttls") == ["OK"]
    assert by_check["tls"][0][1].startswith(("TLSv1.3", "TLSv1.2"))
    leaf = by_check["certificate 0"][0][1]
    assert "subject CN=%s" % HOST in leaf and "issuer CN=mailgate test CA" in leaf
    assert "names %s" % HOST in leaf and "valid until " in leaf
    assert by_check["hostname"] == [("OK", "the certificate covers %s" % HOST)]
    assert "days left" in by_check["expiry"][0][1]
    assert pki["ca"].ca_path in by_check["chain"][0][1]
    # The sink saw EHLO, STARTTLS, then QUIT inside TLS.
    assert [c.split(b" ")[0] for c in sink.commands_of(0)] == [b"EHLO", b"STARTTLS", b"QUIT"]


def test_line_format(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["good"])
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--ca-file",
                         pki["ca"].ca_path, "--servername", HOST)
    lines = out.splitlines()
    assert lines[1] == "OK    banner: 220 sink.test ESMTP"
    assert lines[0].startswith("INFO  connect: connected to 127.0.0.1 port %d" % sink.port)


def test_wrong_name(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["good"])
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--ca-file",
                         pki["ca"].ca_path, "--servername", "other.example.test")
    by_check, _ = findings(out)
    assert code == 1
    [(status, text)] = by_check["hostname"]
    assert status == "FAIL"
    assert "for %s, not other.example.test" % HOST in text
    assert statuses(by_check, "chain") == ["OK"]


def test_servername_defaults_to_host(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["good"])
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--ca-file",
                         pki["ca"].ca_path)
    by_check, _ = findings(out)
    assert code == 1
    assert "not 127.0.0.1" in by_check["hostname"][0][1]


def test_untrusted_without_ca_file(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["good"])
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--servername", HOST)
    by_check, _ = findings(out)
    assert code == 1
    [(status, text)] = by_check["chain"]
    assert status == "FAIL"
    assert "not trusted" in text and "system's trust store" in text
    assert "CN=mailgate test CA" in text
    assert statuses(by_check, "hostname") == ["OK"]


def test_untrusted_leaf_only(pki, sinks, capsys, tmp_path):
    """A server that sends only its leaf, from a CA the trust store lacks."""
    pair = write_cert(str(tmp_path), "leaf", HOST, pki["ca"], chain=[])
    sink = tls_sink(sinks, pair)
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--servername", HOST)
    by_check, _ = findings(out)
    assert code == 1
    assert "certificate 1" not in by_check
    assert by_check["chain"][0][0] == "FAIL"
    assert "issuer of the server's certificate is not in" in by_check["chain"][0][1]


def test_ca_file_from_config(pki, sinks, capsys, tmp_path):
    sink = tls_sink(sinks, pki["good"])
    config = write_config(tmp_path, "[tls]\nca_file = %s\n" % pki["ca"].ca_path)
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--config", config,
                         "--servername", HOST)
    assert code == 0, out
    # The EHLO name is [gateway] hostname.
    assert sink.commands_of(0)[0] == b"EHLO gw.example.test"


def test_ca_file_option_wins_over_config(pki, sinks, capsys, tmp_path):
    other = make_ca(str(tmp_path / "other"))
    sink = tls_sink(sinks, pki["good"])
    config = write_config(tmp_path, "[tls]\nca_file = %s\n" % pki["ca"].ca_path)
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--config", config,
                         "--servername", HOST, "--ca-file", other.ca_path)
    by_check, _ = findings(out)
    assert code == 1
    assert statuses(by_check, "chain") == ["FAIL"]


def test_expiring_soon(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["soon"])
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--ca-file",
                         pki["ca"].ca_path, "--servername", HOST)
    by_check, parsed = findings(out)
    assert code == 1
    [(status, text)] = by_check["expiry"]
    assert status == "WARN"
    assert "in 9 days" in text or "in 10 days" in text
    assert [s for s, c, _ in parsed if s not in ("OK", "INFO")] == ["WARN"]


def test_expired(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["expired"])
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--ca-file",
                         pki["ca"].ca_path, "--servername", HOST)
    by_check, _ = findings(out)
    assert code == 1
    [(status, text)] = by_check["expiry"]
    assert status == "FAIL" and "expired on" in text
    # The leaf's dates are the expiry check's: the chain itself is fine.
    assert statuses(by_check, "chain") == ["OK"]


def test_expired_intermediate(pki, sinks, capsys, tmp_path):
    intermediate = make_intermediate(pki["ca"], str(tmp_path), expired=True)
    pair = write_cert(str(tmp_path), "leaf", HOST, intermediate,
                      chain=[intermediate.cert, pki["ca"].cert])
    sink = tls_sink(sinks, pair)
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--ca-file",
                         pki["ca"].ca_path, "--servername", HOST)
    by_check, _ = findings(out)
    assert code == 1
    assert statuses(by_check, "expiry") == ["OK"]
    [(status, text)] = by_check["chain"]
    assert status == "FAIL" and "certificate 1 (CN=mailgate test intermediate) has expired" in text


def test_no_starttls(sinks, capsys):
    sink = sinks()
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port)
    by_check, parsed = findings(out)
    assert (code, err) == (1, "")
    assert parsed[-1][:2] == ("FAIL", "starttls")
    assert "not offered" in parsed[-1][2]
    assert "Traceback" not in out
    assert [c.split(b" ")[0] for c in sink.commands_of(0)] == [b"EHLO"]


def test_starttls_refused(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["good"], starttls_reply=(454, "4.7.0 TLS not available"))
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port)
    _, parsed = findings(out)
    assert code == 1
    assert parsed[-1][:2] == ("FAIL", "starttls")
    assert "454 4.7.0 TLS not available" in parsed[-1][2]


def test_starttls_response_injection(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["good"], inject_after_starttls=b"250 injected\r\n")
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--timeout", 2)
    _, parsed = findings(out)
    assert (code, err) == (1, "")
    assert parsed[-1][:2] == ("FAIL", "starttls")
    assert "sent 14 bytes after its 220 to STARTTLS" in parsed[-1][2]


def test_handshake_garbage(pki, sinks, capsys):
    sink = tls_sink(sinks, pki["good"], starttls_garbage=True)
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--timeout", 2)
    _, parsed = findings(out)
    assert (code, err) == (1, "")
    assert parsed[-1][:2] == ("FAIL", "tls")
    assert "handshake" in parsed[-1][2]


def test_connection_refused(capsys):
    port = free_port()
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % port)
    assert (code, err) == (1, "")
    assert out == ("FAIL  connect: connection to 127.0.0.1 port %d refused: no SMTP server"
                   " listens there\n" % port)


def test_banner_refused(sinks, capsys):
    sink = sinks(banner=(554, "5.7.1 go away"))
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port)
    _, parsed = findings(out)
    assert code == 1
    assert parsed[-1] == ("FAIL", "banner", "the server refuses mail: its greeting is 554 5.7.1"
                          " go away")


def test_timeout(sinks, capsys):
    sink = sinks(hang=True)
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--timeout", 0.3)
    _, parsed = findings(out)
    assert (code, err) == (1, "")
    assert parsed[-1][:2] == ("FAIL", "banner")
    assert "within 0.3 seconds" in parsed[-1][2]


def test_ipv6_target(pki, capsys):
    try:
        sink = Sink(host="::1", starttls=True, cert=pki["good"][0], key=pki["good"][1])
        sink.start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        code, out, err = run(capsys, "check-tls", "[::1]:%d" % sink.port, "--ca-file",
                             pki["ca"].ca_path, "--servername", HOST)
    finally:
        sink.stop()
    assert code == 0, out
    assert "connected to [::1] port %d" % sink.port in out


def test_host_name_resolved_with_config_nameservers(pki, sinks, capsys, tmp_path):
    zone = TestDNS()
    zone.add(HOST, "A", "127.0.0.1")
    zone.start_thread()
    try:
        sink = tls_sink(sinks, pki["good"])
        config = write_config(tmp_path, "[dns]\nnameservers = %s:%d\ntimeout = 2s\n"
                              % zone.address)
        code, out, err = run(capsys, "check-tls", "%s:%d" % (HOST, sink.port), "--config",
                             config, "--ca-file", pki["ca"].ca_path)
    finally:
        zone.stop_thread()
    assert code == 0, out
    assert zone.count(HOST, "A") == 1


def test_unknown_host_with_config_nameservers(capsys, tmp_path):
    zone = TestDNS()
    zone.start_thread()
    try:
        config = write_config(tmp_path, "[dns]\nnameservers = %s:%d\ntimeout = 2s\n"
                              % zone.address)
        code, out, err = run(capsys, "check-tls", "nowhere.example.test", "--config", config)
    finally:
        zone.stop_thread()
    assert (code, err) == (1, "")
    assert out == "FAIL  connect: nowhere.example.test has no A or AAAA records\n"


# --- implicit TLS (port 465 style) -------------------------------------------------------------


class ImplicitTLSServer:
    """A tiny SMTP server speaking TLS from the first byte, in a thread (one connection)."""

    def __init__(self, cert, key):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.commands = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        try:
            with self.context.wrap_socket(sock, server_side=True) as tls:
                tls.settimeout(10)
                tls.sendall(b"220 implicit.test ESMTP\r\n")
                f = tls.makefile("rb")
                for line in f:
                    self.commands.append(line.strip())
                    if line.upper().startswith(b"EHLO"):
                        tls.sendall(b"250-implicit.test\r\n250 AUTH PLAIN\r\n")
                    elif line.upper().startswith(b"QUIT"):
                        tls.sendall(b"221 bye\r\n")
                        break
                    else:
                        tls.sendall(b"502 no\r\n")
        except (OSError, ssl.SSLError):
            pass

    def stop(self):
        self.listener.close()
        self.thread.join(10)


def test_implicit_tls(pki, capsys):
    server = ImplicitTLSServer(*pki["good"])
    try:
        code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % server.port, "--implicit",
                             "--ca-file", pki["ca"].ca_path, "--servername", HOST)
    finally:
        server.stop()
    by_check, parsed = findings(out)
    assert (code, err) == (0, ""), out
    assert "implicit TLS" in by_check["connect"][0][1]
    assert "starttls" not in by_check
    assert [c for _, c, _ in parsed][:3] == ["connect", "banner", "tls"]
    assert server.commands[0].startswith(b"EHLO ") and server.commands[-1] == b"QUIT"


def test_port_465_means_implicit_tls(pki, capsys, monkeypatch):
    server = ImplicitTLSServer(*pki["good"])
    monkeypatch.setattr(checktls, "IMPLICIT_TLS_PORT", server.port)  # as if it were 465
    try:
        code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % server.port,
                             "--ca-file", pki["ca"].ca_path, "--servername", HOST)
    finally:
        server.stop()
    assert code == 0, out
    assert "implicit TLS" in out


def test_implicit_tls_against_plain_smtp(sinks, capsys):
    sink = sinks()
    code, out, err = run(capsys, "check-tls", "127.0.0.1:%d" % sink.port, "--implicit",
                         "--timeout", 2)
    _, parsed = findings(out)
    assert (code, err) == (1, "")
    assert parsed[-1][:2] == ("FAIL", "tls")


# --- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("mx.example.com", ("mx.example.com", 25)),
    ("mx.example.com:587", ("mx.example.com", 587)),
    ("192.0.2.1:465", ("192.0.2.1", 465)),
    ("[2001:db8::1]:26", ("2001:db8::1", 26)),
    ("[::1]", ("::1", 25)),
    ("2001:db8::1", ("2001:db8::1", 25)),
])
def test_parse_target(text, expected):
    assert checktls.parse_target(text) == expected


@pytest.mark.parametrize("text", ["", ":25", "host:0", "host:70000", "host:x", "[::1", "[::1]x"])
def test_parse_target_bad(text):
    with pytest.raises(ValueError):
        checktls.parse_target(text)


@pytest.mark.parametrize("argv, message", [
    (["check-tls", "host:99999"],
     "mailgate: expected a port number from 1 to 65535, got '99999'\n"),
    (["check-tls", "127.0.0.1", "--servername", "bad name"],
     "mailgate: expected a host name like mx.example.com, got 'bad name'\n"),
    (["check-tls", "127.0.0.1", "--ca-file", "/nonexistent/ca.pem"],
     "mailgate: --ca-file: cannot read /nonexistent/ca.pem: No such file or directory\n"),
    (["check-tls", "127.0.0.1", "--config", "/nonexistent/m.ini"],
     "mailgate: /nonexistent/m.ini: cannot read: No such file or directory\n"),
])
def test_bad_arguments(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert (code, out, err) == (1, "", message)


def test_ca_file_not_pem(capsys, tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")
    code, out, err = run(capsys, "check-tls", "127.0.0.1", "--ca-file", path)
    assert (code, out) == (1, "")
    assert err.startswith("mailgate: --ca-file: %s: no usable CA certificate" % path)
    assert len(err.splitlines()) == 1


def test_bad_timeout(capsys):
    code, out, err = run(capsys, "check-tls", "127.0.0.1", "--timeout", "0")
    assert code == 2 and "expected seconds" in err


def test_as_a_process(pki, sinks):
    sink = tls_sink(sinks, pki["good"])
    result = subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "check-tls", "127.0.0.1:%d" % sink.port,
         "--servername", HOST, "--timeout", "5"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == ""
    assert "FAIL  chain: not trusted" in result.stdout


# --- check-config: the local certificate -------------------------------------------------------


def write_config(tmp_path, extra="", tls_listener=False, hostname="gw.example.test"):
    text = "[gateway]\nhostname = %s\n\n[listener:mx]\nendpoint = tcp:%d:interface=127.0.0.1\n" \
           "role = relay\ntls = %s\nauth = none\n\n%s" % (
               hostname, 2525, "optional" if tls_listener else "none", extra)
    path = tmp_path / "mailgate.ini"
    path.write_text(text)
    return str(path)


def check_config(capsys, tmp_path, pair, hostname=HOST):
    cert, key = pair
    config = write_config(tmp_path, "[tls]\ncertificate = %s\nprivate_key = %s\n" % (cert, key),
                          tls_listener=True, hostname=hostname)
    code, out, err = run(capsys, "check-config", config)
    warnings = [line[len("mailgate: warning: "):] for line in err.splitlines()
                if line.startswith("mailgate: warning: ")]
    return code, out, err, warnings


def test_check_config_good_certificate(pki, capsys, tmp_path):
    code, out, err, warnings = check_config(capsys, tmp_path, pki["good"])
    assert (code, err) == (0, "")
    assert out.endswith(": configuration OK\n")


def test_check_config_leaf_without_chain_is_fine(pki, capsys, tmp_path):
    pair = write_cert(str(tmp_path), "leaf", HOST, pki["ca"], chain=[])
    code, out, err, warnings = check_config(capsys, tmp_path, pair)
    assert (code, err) == (0, "")


def test_check_config_self_signed(capsys, tmp_path):
    pair = write_cert(str(tmp_path), "self", HOST)
    code, out, err, warnings = check_config(capsys, tmp_path, pair)
    assert code == 0
    [warning] = warnings
    assert "is self-signed (CN=%s)" % HOST in warning
    assert out.endswith(": configuration OK\n")


def test_check_config_broken_chain(pki, capsys, tmp_path):
    other = make_ca(str(tmp_path / "other"))
    pair = write_cert(str(tmp_path), "leaf", HOST, pki["ca"], chain=[other.cert])
    code, out, err, warnings = check_config(capsys, tmp_path, pair)
    assert code == 0
    [warning] = warnings
    assert "certificate 1 (CN=%s) is not issued by the one after it" % HOST in warning


def test_check_config_chain_with_intermediate(pki, capsys, tmp_path):
    intermediate = make_intermediate(pki["ca"], str(tmp_path))
    pair = write_cert(str(tmp_path), "leaf", HOST, intermediate, chain=[intermediate.cert])
    code, out, err, warnings = check_config(capsys, tmp_path, pair)
    assert (code, err) == (0, "")
    # Out of order: the root before the intermediate.
    pair = write_cert(str(tmp_path), "leaf2", HOST, intermediate,
                      chain=[pki["ca"].cert, intermediate.cert])
    code, out, err, warnings = check_config(capsys, tmp_path, pair)
    assert code == 0
    assert len(warnings) == 2  # leaf -> root, and root -> intermediate, are both wrong
    assert all("is not issued by the one after it" in w for w in warnings)


def test_check_config_expired_intermediate(pki, capsys, tmp_path):
    intermediate = make_intermediate(pki["ca"], str(tmp_path), expired=True)
    pair = write_cert(str(tmp_path), "leaf", HOST, intermediate, chain=[intermediate.cert])
    code, out, err, warnings = check_config(capsys, tmp_path, pair)
    assert code == 0
    [warning] = warnings
    assert "chain certificate 2 (CN=mailgate test intermediate) expired on" in warning


def test_check_config_expiring_soon(pki, capsys, tmp_path):
    code, out, err, warnings = check_config(capsys, tmp_path, pki["soon"])
    assert code == 0
    [warning] = warnings
    assert "expires on" in warning


def test_check_config_expired(pki, capsys, tmp_path):
    code, out, err, warnings = check_config(capsys, tmp_path, pki["expired"])
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert "[tls] certificate: the certificate in %s expired on" % pki["expired"][0] in err


def test_check_config_name_not_covered(pki, capsys, tmp_path):
    code, out, err, warnings = check_config(capsys, tmp_path, pki["good"],
                                            hostname="mail.example.test")
    assert code == 0
    [warning] = warnings
    assert "do not cover [gateway] hostname mail.example.test" in warning


def test_check_config_key_mismatch(pki, capsys, tmp_path):
    cert = pki["good"][0]
    key = pki["expired"][1]
    code, out, err, warnings = check_config(capsys, tmp_path, (cert, key))
    assert (code, out) == (1, "")
    assert "does not match the certificate" in err and len(err.splitlines()) == 1


def test_check_config_several_warnings(capsys, tmp_path):
    pair = write_cert(str(tmp_path), "self", HOST, days=5)
    code, out, err, warnings = check_config(capsys, tmp_path, pair, hostname="other.test")
    assert code == 0
    assert len(warnings) == 3
    assert err == "".join("mailgate: warning: %s\n" % w for w in warnings)
