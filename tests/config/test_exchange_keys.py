"""
The keys for a gateway in front of Exchange (issue 12): [ldap], recipients, [auth] backend, header_firewall, strip_headers,
relay_client_certs and [tls] client_ca_file, [delivery] chunking; IDNA domains in A-label form.
"""

import pytest

from mailgate.config import LDAPServer, load_config, render_config
from mailgate.config.delivery import EXCHANGE_HEADERS
from tests.config.test_config import error, load

BASE = """\
[gateway]
hostname = mx.example.com
accepted_domains = example.com

[listener:mx]
endpoint = tcp:2525
role = relay
tls = none
auth = none
"""

LDAP = """\
[ldap]
uri = ldap://dc1.corp.example, ldaps://[2001:db8::10], ldap://192.0.2.10:3389
base_dn = DC=corp,DC=example
"""


def test_ldap_servers_in_order_with_default_ports(tmp_path):
    config = load(tmp_path, BASE + LDAP)
    assert config.ldap.servers == (
        LDAPServer("ldap", "dc1.corp.example", 389), LDAPServer("ldaps", "2001:db8::10", 636),
        LDAPServer("ldap", "192.0.2.10", 3389))
    assert config.ldap.timeout == 5.0
    assert (config.ldap.cache_ttl, config.ldap.negative_cache_ttl) == (300.0, 60.0)
    assert "uri = ldap://dc1.corp.example, ldaps://[2001:db8::10], ldap://192.0.2.10:3389" in \
        render_config(config)


@pytest.mark.parametrize("uri, message", [
    ("http://dc1", "expected a URI like ldap://dc1.example.com"),
    ("ldap://dc1.corp.example/dc=x", "expected a URI like"),
    ("ldap://dc1:99999", "expected a port from 1 to 65535"),
    ("ldaps://[dc1]", "expected an IPv6 address in brackets"),
])
def test_bad_ldap_uri(tmp_path, uri, message):
    text = BASE + "[ldap]\nuri = %s\nbase_dn = dc=x\n" % uri
    assert message in error(tmp_path, text)
    assert error(tmp_path, text).startswith("FILE: [ldap] uri: ")


def test_ldap_needed_by_recipients_and_auth(tmp_path):
    assert error(tmp_path, BASE + "recipients = ldap\n") == \
        "FILE: [ldap] uri: required, because [listener:mx] has recipients = ldap"
    assert error(tmp_path, BASE + "[auth]\nbackend = ldap\n") == \
        "FILE: [ldap] uri: required, because [auth] backend names ldap"
    assert error(tmp_path, BASE + "[ldap]\nuri = ldap://dc1\n") == \
        "FILE: [ldap] base_dn: required, because uri is set"
    config = load(tmp_path, BASE + "recipients = ldap\n" + LDAP)
    assert config.listeners[0].recipients == "ldap"


def test_bind_dn_and_password_file_go_together(tmp_path):
    assert error(tmp_path, BASE + LDAP + "bind_dn = cn=svc\n") == \
        "FILE: [ldap] bind_password_file: required, because bind_dn is set"
    assert error(tmp_path, BASE + LDAP + "bind_dn = cn=svc\nbind_password_file = nope\n") == \
        "FILE: [ldap] bind_password_file: file not found: %s" % (tmp_path / "nope")
    (tmp_path / "pw").write_text("secret\n")
    config = load(tmp_path, BASE + LDAP + "bind_dn = cn=svc\nbind_password_file = pw\n")
    assert config.ldap.bind_password_file == str(tmp_path / "pw")


@pytest.mark.parametrize("value, message", [
    ("(mail=x)", "expected an LDAP filter with %s"),
    ("(mail=%s", "expected a valid LDAP filter"),
    ("(mail=%d%s)", "expected %s as the only"),
])
def test_bad_filters(tmp_path, value, message):
    assert message in error(tmp_path, BASE + LDAP + "recipient_filter = %s\n" % value)


def test_auth_backends(tmp_path):
    assert load(tmp_path, BASE).auth.backend == ("file",)
    config = load(tmp_path, BASE + "[auth]\nbackend = LDAP, file\n" + LDAP)
    assert config.auth.backend == ("ldap", "file")
    assert error(tmp_path, BASE + "[auth]\nbackend = ldap, ldap\n" + LDAP) == \
        "FILE: [auth] backend: ldap is listed twice"
    # With ldap alone no users file is needed for an AUTH listener.
    text = BASE.replace("auth = none", "auth = optional") + "[auth]\nbackend = ldap\n" + LDAP
    assert load(tmp_path, text).auth.users_file is None


def test_header_firewall_defaults(tmp_path):
    text = BASE + "[listener:exchange]\nendpoint = tcp:2526\nrole = relay\ntls = none\n" \
        "auth = none\nrelay_ips = 10.0.0.0/8\n" \
        "[listener:sub]\nendpoint = tcp:2587\nrole = submission\ntls = none\nauth = none\n"
    firewall = {listener.name: listener.header_firewall for listener in load(tmp_path, text).listeners}
    assert firewall == {"mx": True, "exchange": False, "sub": False}


def test_strip_headers(tmp_path):
    text = BASE.replace("accepted_domains = example.com",
                        "accepted_domains = example.com\nstrip_headers = X-Secret, X-Corp-*") + \
        "[route:out]\ndomains = *\nmx = yes\n[route:in]\ndomains = example.com\n" \
        "smarthost = 10.0.0.25\n[route:partner]\ndomains = partner.example\nmx = yes\n" \
        "strip_headers = none\n"
    config = load(tmp_path, text)
    assert config.gateway.strip_headers == ("x-secret", "x-corp-*")
    assert [r.strip_headers for r in config.routes] == [EXCHANGE_HEADERS, (), ()]
    assert "FILE: [gateway] strip_headers: expected a list of header names" in error(
        tmp_path, BASE.replace("example.com\n", "example.com\nstrip_headers = X-*-Y\n", 1))


def test_relay_client_certs_need_a_client_ca(tmp_path):
    tls = BASE.replace("tls = none", "tls = optional")
    assert error(tmp_path, BASE + "relay_client_certs = mail.protection.outlook.com\n") == \
        "FILE: [listener:mx] relay_client_certs: needs tls other than none: certificates " \
        "come with TLS"
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    certs = "[tls]\ncertificate = c.pem\nprivate_key = k.pem\n"
    assert error(tmp_path, tls + "relay_client_certs = mail.protection.outlook.com\n" + certs) == \
        "FILE: [tls] client_ca_file: required, because [listener:mx] has relay_client_certs"
    (tmp_path / "ca.pem").write_text("x")
    config = load(tmp_path, tls + "relay_client_certs = Mail.Protection.Outlook.com\n" + certs +
                  "client_ca_file = ca.pem\n")
    assert config.listeners[0].relay_client_certs == ("mail.protection.outlook.com",)
    assert config.tls.client_ca_file == str(tmp_path / "ca.pem")


def test_chunking_default(tmp_path):
    assert load(tmp_path, BASE).delivery.chunking is True
    assert load(tmp_path, BASE + "[delivery]\nchunking = no\n").delivery.chunking is False


def test_idna_domains_become_a_labels(tmp_path):
    text = BASE.replace("accepted_domains = example.com", "accepted_domains = Bücher.example") + \
        "[route:in]\ndomains = bücher.example, .münchen.example\nsmarthost = 10.0.0.25\n"
    config = load(tmp_path, text)
    assert config.gateway.accepted_domains == ("xn--bcher-kva.example",)
    assert config.routes[0].domains == ("xn--bcher-kva.example", ".xn--mnchen-3ya.example")
