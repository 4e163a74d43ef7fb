"""
End to end: what an operator sees when the configuration is wrong (twistd and check-config), and
the example configuration shipped in etc/ working from a copy of the repository layout.

Contract: exit status 1, and the only meaningful output on stderr is ONE line
``mailgate: FILE: [SECTION] KEY: message``; no traceback anywhere.
"""

import os
import shutil
import ssl

import pytest
from cryptography import x509

from mailgate.smtp.auth import set_user
from tests.dnsserver import TestDNS
from tests.e2e import harness as h
from tests.tlsutil import make_ca


@pytest.fixture(scope="module")
def test_dns():
    """A loopback DNS server for [dns] nameservers: no gateway here may ask the system resolver."""
    zone = TestDNS()
    zone.start_thread()
    yield zone
    zone.stop_thread()


@pytest.fixture(scope="module")
def pki(tmp_path_factory, test_dns):
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(str(root / "ca"))
    cert, key = h.issue_server_cert(ca, str(root / "tls"))
    _, other_key = h.issue_server_cert(ca, str(root / "tls"), name="other")
    users = str(root / "users")
    set_user(users, "alice@example.com", "secret")
    return {"ca": ca, "cert": cert, "key": key, "other_key": other_key, "users": users,
            "dns": "%s:%d" % test_dns.address}


def good_config(pki, relay_port=None):
    return {
        "gateway": {"hostname": h.HOSTNAME, "accepted_domains": "example.com", "max_message_size": "1M"},
        "queue": {"path": "spool"},
        "tls": {"certificate": pki["cert"], "private_key": pki["key"]},
        "auth": {"users_file": pki["users"]},
        "dns": {"nameservers": pki["dns"]},
        "listener:relay": {"endpoint": "tcp:%s:interface=127.0.0.1" % (relay_port or h.free_port()),
                           "role": "relay"},
        "listener:submission": {"endpoint": "tcp:%d:interface=127.0.0.1" % h.free_port(),
                                "role": "submission"},
    }


def _unknown_key(c, pki):
    c["gateway"]["colour"] = "blue"


def _bad_size(c, pki):
    c["gateway"]["max_message_size"] = "10X"


def _missing_certificate(c, pki):
    c["tls"]["certificate"] = "missing.pem"
    c["tls"]["generate_self_signed"] = "no"


def _auth_without_tls(c, pki):
    c["listener:submission"]["tls"] = "none"  # auth stays at the submission default: required


def _unknown_section(c, pki):
    c["bogus"] = {"answer": "42"}


def _bad_relay_ips(c, pki):
    c["listener:relay"]["relay_ips"] = "10.0.0.1/8"


def _ssl_endpoint(c, pki):
    c["listener:relay"]["endpoint"] = "ssl:465"


def _missing_role(c, pki):
    del c["listener:relay"]["role"]


def _missing_users_file(c, pki):
    c["auth"]["users_file"] = "no-such-users"


def _key_does_not_match(c, pki):
    c["tls"]["private_key"] = pki["other_key"]


BROKEN = [
    # (id, change, section, key, words the message must contain)
    ("unknown-key", _unknown_key, "gateway", "colour", "unknown key"),
    ("bad-size", _bad_size, "gateway", "max_message_size", "10X"),
    ("missing-certificate", _missing_certificate, "tls", "certificate", "missing.pem"),
    ("auth-required-tls-none", _auth_without_tls, "listener:submission", "auth", "tls"),
    ("unknown-section", _unknown_section, "bogus", None, "unknown section"),
    ("relay-ips-host-bits", _bad_relay_ips, "listener:relay", "relay_ips", "10.0.0.1/8"),
    ("ssl-endpoint", _ssl_endpoint, "listener:relay", "endpoint", "ssl:465"),
    ("missing-role", _missing_role, "listener:relay", "role", "required"),
    ("missing-users-file", _missing_users_file, "auth", "users_file", "no-such-users"),
    ("key-does-not-match", _key_does_not_match, "tls", "private_key", "does not match"),
]


def expected_prefix(path, section, key):
    where = "[%s]" % section + (" %s" % key if key else "")
    return "mailgate: %s: %s: " % (path, where)


def assert_one_line(result, path, section, key, words):
    output = "--- exit %s\n--- stdout\n%s\n--- stderr\n%s" % (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, output
    assert result.returncode == 1, output
    lines = h.meaningful_lines(result.stderr)
    assert len(lines) == 1, output
    assert lines[0].startswith(expected_prefix(path, section, key)), (expected_prefix(path, section, key), output)
    assert words in lines[0], output
    return lines[0]


@pytest.mark.parametrize("name,change,section,key,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_twistd(tmp_path, pki, name, change, section, key, words):
    config = good_config(pki)
    change(config, pki)
    path = h.write_config(str(tmp_path / "mailgate.ini"), config)
    result = h.run_twistd(path)
    assert_one_line(result, path, section, key, words)


@pytest.mark.parametrize("name,change,section,key,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_check_config(tmp_path, pki, name, change, section, key, words):
    config = good_config(pki)
    change(config, pki)
    path = h.write_config(str(tmp_path / "mailgate.ini"), config)
    result = h.run_cli("check-config", path)
    assert_one_line(result, path, section, key, words)
    assert result.stdout == ""


def test_port_already_in_use(tmp_path, pki):
    holder = h.listen_socket()
    try:
        port = holder.getsockname()[1]
        path = h.write_config(str(tmp_path / "mailgate.ini"), good_config(pki, relay_port=port))
        result = h.run_twistd(path)
    finally:
        holder.close()
    line = assert_one_line(result, path, "listener:relay", "endpoint", "address already in use")
    assert str(port) in line
    # Said once: not also as a log event on stdout.
    assert (result.stdout + result.stderr).count("address already in use") == 1, result.stdout


def test_check_config_good(tmp_path, pki):
    path = h.write_config(str(tmp_path / "mailgate.ini"), good_config(pki))
    result = h.run_cli("check-config", path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert h.meaningful_lines(result.stdout)[-1] == "%s: configuration OK" % path, result.stdout
    assert "[listener:submission]" in result.stdout and "tls = required" in result.stdout
    # Nothing to warn about: the certificate names mx.test.example and is valid.
    assert h.meaningful_lines(result.stderr) == [], result.stderr


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.ini")
    result = h.run_twistd(path)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    lines = h.meaningful_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("mailgate: %s: " % path), output


# --- the example configuration in etc/ ---------------------------------------------------------


EXAMPLE_PORTS = (2525, 2587)
EXAMPLE_SMARTHOST = 2526  # [route:internal] smarthost = 127.0.0.1:2526
EXAMPLE_NAMESERVERS = "#nameservers = 127.0.0.1, [::1]:5353"


@pytest.fixture
def example_copy(tmp_path, test_dns):
    """
    The repository's etc/ copied so that its ../var/... paths land in tmp_path/var.  One change:
    the commented-out [dns] nameservers line becomes the loopback test DNS server, so that the
    gateway never asks the system resolver (its routes would otherwise use /etc/resolv.conf).
    """
    shutil.copytree(os.path.join(h.REPO, "etc"), str(tmp_path / "etc"))
    path = tmp_path / "etc" / "mailgate.ini"
    text = path.read_text()
    assert text.count(EXAMPLE_NAMESERVERS) == 1, "etc/mailgate.ini changed: update this test"
    path.write_text(text.replace(EXAMPLE_NAMESERVERS, "nameservers = %s:%d" % test_dns.address))
    return tmp_path


def test_example_config(example_copy):
    busy = [port for port in EXAMPLE_PORTS + (EXAMPLE_SMARTHOST,) if not h.port_is_free(port)]
    if busy:
        pytest.skip("etc/mailgate.ini uses fixed ports %s, busy on this machine: %s"
                    % (EXAMPLE_PORTS + (EXAMPLE_SMARTHOST,), busy))
    root = example_copy
    config_path = str(root / "etc" / "mailgate.ini")
    var = root / "var"
    assert not var.exists()
    # The example's smarthost for example.com: a sink holding the mail (451), so that it stays queued.
    smarthost = h.PortSink(h.LOOPBACK, EXAMPLE_SMARTHOST, rcpt_default=h.HOLD_REPLY)
    smarthost.start()
    try:
        _run_example(root, config_path, var, smarthost)
    finally:
        smarthost.stop()


def _run_example(root, config_path, var, smarthost):
    checked = h.run_cli("check-config", config_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Traceback" not in checked.stdout + checked.stderr

    gw = h.Gateway(str(root / "etc"))
    try:
        gw.start()  # the file as shipped (but for [dns] nameservers)
        assert gw.ports == {"relay": 2525, "submission": 2587}, gw.ports
        assert gw.roles == {"relay": "relay", "submission": "submission"}

        # A self-signed certificate was generated for [gateway] hostname, where the file says.
        cert_path, key_path = var / "tls" / "cert.pem", var / "tls" / "key.pem"
        assert cert_path.is_file() and key_path.is_file()
        assert oct(key_path.stat().st_mode & 0o777) == "0o600"
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert cert.issuer == cert.subject
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["mailgate.localdomain"]

        # Plain mail for an accepted domain of that file, on the relay listener.
        client = h.smtp(2525)
        try:
            assert client.banner == (220, b"mailgate.localdomain ESMTP")
            message = h.make_message("example config")
            queue_id = h.transaction(client, "someone@elsewhere.test", ["postmaster@example.com"], message)
        finally:
            h.close(client)
        entry = h.spool_entry(str(var / "spool"), queue_id)  # in active/ or deferred/
        assert entry.envelope["listener"] == "relay"
        assert entry.envelope["recipients"] == ["postmaster@example.com"]
        assert entry.body.endswith(message)
        assert entry.body.startswith(b"Received: from %s ([127.0.0.1])" % h.CLIENT_HELO.encode())

        # The generated certificate is the one served, and it verifies as itself.
        client = h.smtp(2587)
        try:
            client._host = "mailgate.localdomain"  # server_hostname for starttls
            ctx = ssl.create_default_context(cafile=str(cert_path))
            assert client.starttls(context=ctx)[0] == 220
            assert client.sock.version() == "TLSv1.3"
            client.ehlo()
            assert client.has_extn("auth")
        finally:
            h.close(client)

        gw.stop()
        assert gw.stopped_cleanly(), gw.describe()

        # The shipped route for example.com took it to its smarthost, which held it (451).
        h.wait_until(lambda: b"RCPT TO:<postmaster@example.com>" in smarthost.commands_of(0), 10,
                     lambda: "the smarthost to see the RCPT: %r" % (smarthost.commands,))
        assert smarthost.messages == []

        # Started again: the certificate it generated is kept, and the message is still queued.
        gw.start()
        assert x509.load_pem_x509_certificate(cert_path.read_bytes()) == cert
        assert h.queued_ids(str(var / "spool")) == {queue_id}
        gw.stop()
        assert gw.stopped_cleanly(), gw.describe()
        assert "Traceback" not in gw.all_output(), gw.describe()
    finally:
        gw.cleanup()
