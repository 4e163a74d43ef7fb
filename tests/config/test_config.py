"""mailgate.config: the ini file to typed values, every mistake to one line naming the key."""

import ipaddress
import os
import re

import attr
import pytest

# The modules that look up socket.getfqdn and open, for the tests that patch them.
import mailgate.config.gateway as gateway_module
import mailgate.config.loader as loader_module
import mailgate.config.types as types_module
from mailgate.config import (
    DEFAULT_BLOCKED_EXTENSIONS,
    SECTIONS,
    AttachmentsConfig,
    AuthConfig,
    Config,
    DeliveryConfig,
    DKIMConfig,
    DMARCConfig,
    DNSConfig,
    FiltersConfig,
    FilterSection,
    GatewayConfig,
    Int,
    LDAPConfig,
    Limits,
    ListenerConfig,
    QueueConfig,
    RouteConfig,
    SPFConfig,
    TLSConfig,
    load_config,
    render_config,
)
from mailgate.config.delivery import EXCHANGE_HEADERS
from mailgate.errors import ConfigError

from tests import REPO

# A listener that needs neither certificate nor users file.
PLAIN = """\
[gateway]
hostname = mx.example.com

[listener:mx]
endpoint = tcp:2525
role = relay
tls = none
auth = none
"""


def write(tmp_path, text, name="mailgate.ini"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(tmp_path, text):
    return load_config(write(tmp_path, text))


def error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value).replace(path, "FILE")


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_match_the_config_classes(tmp_path):
    """The schema's defaults and the attrs defaults other modules may construct with agree."""
    config = load(tmp_path, PLAIN)
    assert config.gateway == GatewayConfig(hostname="mx.example.com")
    assert config.limits == Limits()
    assert config.queue == QueueConfig(path="/var/spool/mailgate")
    assert config.tls == TLSConfig()
    assert config.auth == AuthConfig()
    [listener] = config.listeners
    assert listener == ListenerConfig(
        name="mx", endpoint="tcp:2525", role="relay", tls="none", auth="none",
        filters=("spf", "dkim", "dmarc", "attachments"),  # the relay default; the attrs one is submission's
        header_firewall=True,  # a relay listener without relay_ips: mail from the internet
    )
    assert config.ldap == LDAPConfig()
    assert config.dns == DNSConfig()
    assert config.delivery == DeliveryConfig()
    assert config.routes == ()  # allowed: then every recipient bounces "no route"
    assert config.dkim == DKIMConfig()
    assert config.filters == FiltersConfig()
    assert config.filter_sections == ()
    assert config.spf == SPFConfig()
    assert config.dmarc == DMARCConfig()
    assert config.attachments == AttachmentsConfig()
    assert config.path == os.path.join(str(tmp_path), "mailgate.ini")


def test_types_of_values(tmp_path):
    config = load(tmp_path, PLAIN)
    assert isinstance(config.gateway.max_message_size, int)
    assert isinstance(config.limits.command_timeout, float)
    assert isinstance(config.listeners, tuple)
    assert isinstance(config.gateway.accepted_domains, tuple)


def test_hostname_defaults_to_the_fqdn(tmp_path, monkeypatch):
    monkeypatch.setattr(gateway_module.socket, "getfqdn", lambda: "Box.Example.NET")
    config = load(tmp_path, PLAIN.replace("hostname = mx.example.com\n", ""))
    assert config.gateway.hostname == "box.example.net"


def test_invalid_fqdn_needs_hostname(tmp_path, monkeypatch):
    monkeypatch.setattr(gateway_module.socket, "getfqdn", lambda: "my_box")
    message = error(tmp_path, PLAIN.replace("hostname = mx.example.com\n", ""))
    assert message == (
        "FILE: [gateway] hostname: not set, and this machine's name 'my_box' is not a valid hostname"
    )


def test_submission_defaults(tmp_path):
    (tmp_path / "users").write_text("")
    config = load(
        tmp_path,
        PLAIN
        + "[listener:sub]\nendpoint = tcp:2587\nrole = submission\n"
        + "[tls]\ncertificate = c.pem\nprivate_key = k.pem\ngenerate_self_signed = yes\n"
        + "[auth]\nusers_file = users\n",
    )
    sub = config.listeners[1]
    assert (sub.tls, sub.auth) == ("required", "required")


def test_relay_defaults(tmp_path):
    (tmp_path / "users").write_text("")
    config = load(
        tmp_path,
        "[listener:r]\nendpoint = tcp:25\nrole = relay\n"
        "[tls]\ncertificate = c.pem\nprivate_key = k.pem\ngenerate_self_signed = yes\n"
        "[auth]\nusers_file = users\n",
    )
    assert (config.listeners[0].tls, config.listeners[0].auth) == ("optional", "optional")


def test_listener_inherits_and_overrides(tmp_path):
    config = load(
        tmp_path,
        PLAIN
        + "max_errors = 2\ndata_timeout = 1h\n"
        + "[listener:other]\nendpoint = tcp:2526\nrole = relay\ntls = none\nauth = none\n"
        + "max_message_size = 1M\nmax_recipients = 5\n"
        + "[limits]\nmax_errors = 7\ncommand_timeout = 1m\n",
    )
    mx, other = config.listeners
    assert config.limits == Limits(max_errors=7, command_timeout=60.0)
    assert mx.limits == Limits(max_errors=2, command_timeout=60.0, data_timeout=3600.0)
    assert other.limits == config.limits
    assert other.max_message_size == 1024 * 1024
    assert other.max_recipients == 5
    assert mx.max_message_size == config.gateway.max_message_size


def test_limits_across_sessions(tmp_path):
    """Rates are COUNT/DURATION or empty; the exempt list keeps relay_ips as a word."""
    from mailgate.config import RELAY_IPS, Rate

    config = load(
        tmp_path,
        PLAIN
        + "message_rate_per_ip = 5/30s\nlimit_exempt_ips = 192.0.2.0/24\n"
        + "[limits]\nconnection_rate_per_ip =\nrecipient_rate_per_user = 1000 / 1d\n"
        + "limit_exempt_ips = relay_ips, 10.0.0.0/8, RELAY_IPS\ngreet_delay = 3s\n",
    )
    assert config.limits.connection_rate_per_ip is None
    assert config.limits.recipient_rate_per_user == Rate(1000, 86400.0)
    assert config.limits.limit_exempt_ips == (RELAY_IPS, ipaddress.ip_network("10.0.0.0/8"))
    assert config.limits.greet_delay == 3.0
    mx = config.listeners[0].limits
    assert mx.message_rate_per_ip == Rate(5, 30.0)
    assert mx.limit_exempt_ips == (ipaddress.ip_network("192.0.2.0/24"),)
    assert mx.recipient_rate_per_user == Rate(1000, 86400.0)  # inherited
    assert Limits().connection_rate_per_ip == Rate(60, 60.0)
    assert str(Rate(60, 60.0)) == "60/1m"


def test_listener_size_defaults_to_gateway(tmp_path):
    config = load(tmp_path, PLAIN.replace("[listener", "max_message_size = 10M\n\n[listener"))
    assert config.listeners[0].max_message_size == 10 * 1024 * 1024


def test_listeners_keep_file_order(tmp_path):
    text = "".join(
        "[listener:%s]\nendpoint = tcp:%d\nrole = relay\ntls = none\nauth = none\n" % (name, port)
        for name, port in [("zeta", 1), ("alpha", 2), ("m.i-d_1", 3)]
    )
    assert [l.name for l in load(tmp_path, text).listeners] == ["zeta", "alpha", "m.i-d_1"]


# --- units and lists ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("1048576", 1048576), ("512K", 524288), ("35M", 35 * 1024**2), ("1G", 1024**3), ("2m", 2 * 1024**2),
     ("10 M", 10 * 1024**2)],
)
def test_sizes(tmp_path, text, value):
    config = load(tmp_path, PLAIN.replace("[listener", "max_message_size = %s\n[listener" % text))
    assert config.gateway.max_message_size == value


@pytest.mark.parametrize(
    "text, value",
    [("30", 30.0), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0), ("1.5s", 1.5), ("2H", 7200.0)],
)
def test_durations(tmp_path, text, value):
    config = load(tmp_path, PLAIN + "[limits]\ncommand_timeout = %s\n" % text)
    assert config.limits.command_timeout == value


@pytest.mark.parametrize(
    "text, value",
    [("yes", True), ("no", False), ("true", True), ("false", False), ("on", True), ("off", False),
     ("1", True), ("0", False), ("YES", True)],
)
def test_booleans(tmp_path, text, value):
    config = load(tmp_path, PLAIN + "[tls]\ngenerate_self_signed = %s\n" % text)
    assert config.tls.generate_self_signed is value


def test_accepted_domains(tmp_path):
    text = PLAIN.replace("[listener", "accepted_domains = Example.COM ,example.org,, example.com\n[listener")
    assert load(tmp_path, text).gateway.accepted_domains == ("example.com", "example.org")


def test_lists_continue_on_indented_lines(tmp_path):
    text = PLAIN.replace("[listener", "accepted_domains = example.com,\n    example.org\n[listener")
    assert load(tmp_path, text).gateway.accepted_domains == ("example.com", "example.org")


def test_cidr_lists(tmp_path):
    config = load(tmp_path, PLAIN + "allowed_ips = 192.0.2.0/24, 2001:db8::/32\nrelay_ips = 127.0.0.1, ::1\n")
    listener = config.listeners[0]
    assert listener.allowed_ips == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert listener.relay_ips == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


def test_choices_are_canonical(tmp_path):
    config = load(tmp_path, PLAIN.replace("role = relay", "role = RELAY") + "[tls]\nmin_version = tlsv1.3\n")
    assert config.listeners[0].role == "relay"
    assert config.tls.min_version == "TLSv1.3"


def test_inline_comments_and_case_insensitive_keys(tmp_path):
    config = load(tmp_path, PLAIN.replace("[listener", "Max_Message_Size = 1M  # small\n[listener"))
    assert config.gateway.max_message_size == 1024 * 1024


def test_no_interpolation(tmp_path):
    message = error(tmp_path, PLAIN.replace("mx.example.com", "%(name)s"))
    assert message == "FILE: [gateway] hostname: expected a hostname like mail.example.com, got '%(name)s'"


def test_hostname_is_lower_cased_and_trailing_dot_dropped(tmp_path):
    assert load(tmp_path, PLAIN.replace("mx.example.com", "MX.Example.COM.")).gateway.hostname == "mx.example.com"


@pytest.mark.parametrize(
    "endpoint",
    ["tcp:25", "tcp:587:interface=192.0.2.1", "tcp6:25:interface=\\:\\:1", "unix:/run/mailgate.sock",
     "systemd:domain=INET:index=0", "systemd:domain=INET6:name=smtp"],
)
def test_endpoint_types(tmp_path, endpoint):
    config = load(tmp_path, PLAIN.replace("tcp:2525", endpoint))
    assert config.listeners[0].endpoint == endpoint


# --- paths -------------------------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "users").write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = PLAIN.replace("auth = none", "auth = optional") + (
        "[auth]\nusers_file = users\n[queue]\npath = ../var/spool\n"
        "[tls]\ncertificate = tls/c.pem\nprivate_key = /abs/k.pem\ngenerate_self_signed = yes\n"
    )
    config = load_config(os.path.relpath(write(etc, text), str(elsewhere)))
    assert config.auth.users_file == str(etc / "users")
    assert config.queue.path == str(tmp_path / "var" / "spool")
    assert config.tls.certificate == str(etc / "tls" / "c.pem")
    assert config.tls.private_key == "/abs/k.pem"
    assert config.path == str(etc / "mailgate.ini")


def test_error_names_the_file_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[smtp]\n")
    with pytest.raises(ConfigError) as info:
        load_config("mailgate.ini")
    assert str(info.value) == "mailgate.ini: [smtp]: unknown section"
    assert info.value.file == "mailgate.ini"


def test_tls_files_checked_when_not_generated(tmp_path):
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    text = PLAIN.replace("tls = none", "tls = required") + "[tls]\ncertificate = c.pem\nprivate_key = k.pem\n"
    assert load(tmp_path, text).tls.certificate == str(tmp_path / "c.pem")
    os.remove(str(tmp_path / "k.pem"))
    assert error(tmp_path, text) == "FILE: [tls] private_key: file not found: %s" % (tmp_path / "k.pem")


def _deny(target):
    """open() that refuses target as an unprivileged user would be refused (CI runs as root)."""
    real = open

    def fake_open(path, *args, **kwargs):
        if str(path) == str(target):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    return fake_open


def test_unreadable_users_file(tmp_path, monkeypatch):
    users = tmp_path / "users"
    users.write_text("")
    monkeypatch.setattr(types_module, "open", _deny(users), raising=False)
    text = PLAIN.replace("auth = none", "auth = optional") + "[auth]\nusers_file = users\n"
    assert error(tmp_path, text) == "FILE: [auth] users_file: not readable: %s" % users


# --- broken files: each one exact line -----------------------------------------------------------

LISTENER = "[listener:mx]\nendpoint = tcp:2525\nrole = relay\ntls = none\nauth = none\n"

BROKEN = [
    ("[smtp]\n" + LISTENER, "FILE: [smtp]: unknown section"),
    ("[Gateway]\n" + LISTENER, "FILE: [Gateway]: unknown section"),
    ("[DEFAULT]\nhostname = x\n" + LISTENER, "FILE: [DEFAULT]: unknown section"),
    ("[gateway:x]\n" + LISTENER, "FILE: [gateway:x]: unknown section"),
    ("[gateway]\ncolour = blue\n" + LISTENER, "FILE: [gateway] colour: unknown key"),
    (LISTENER + "colour = blue\n", "FILE: [listener:mx] colour: unknown key"),
    (
        "[gateway]\nmax_message_size = 35X\n" + LISTENER,
        "FILE: [gateway] max_message_size: expected a size like 35M, got '35X'",
    ),
    (
        "[gateway]\nmax_message_size = 35MB\n" + LISTENER,
        "FILE: [gateway] max_message_size: expected a size like 35M, got '35MB'",
    ),
    (
        "[gateway]\nmax_message_size = 0\n" + LISTENER,
        "FILE: [gateway] max_message_size: expected a size of at least 1 bytes, got '0'",
    ),
    (
        "[gateway]\nhostname = mail_gw.example.com\n" + LISTENER,
        "FILE: [gateway] hostname: expected a hostname like mail.example.com, got 'mail_gw.example.com'",
    ),
    (
        "[gateway]\nhostname = -mx.example.com\n" + LISTENER,
        "FILE: [gateway] hostname: expected a hostname like mail.example.com, got '-mx.example.com'",
    ),
    (
        "[gateway]\nhostname = %s.com\n" % ("a" * 64) + LISTENER,
        "FILE: [gateway] hostname: expected a hostname like mail.example.com, got '%s.com'" % ("a" * 64),
    ),
    (
        "[gateway]\naccepted_domains = example.com, exa mple.org\n" + LISTENER,
        "FILE: [gateway] accepted_domains: expected a comma-separated list of domains like example.com,"
        " got 'exa mple.org'",
    ),
    (
        "[limits]\ncommand_timeout = 5 minutes\n" + LISTENER,
        "FILE: [limits] command_timeout: expected a duration like 30s, 5m, 1h or 2d, got '5 minutes'",
    ),
    (
        "[limits]\nsession_timeout = 0\n" + LISTENER,
        "FILE: [limits] session_timeout: expected a duration greater than 0, got '0'",
    ),
    (
        "[limits]\nmax_errors = 0\n" + LISTENER,
        "FILE: [limits] max_errors: expected an integer >= 1, got '0'",
    ),
    (
        "[limits]\nmax_auth_failures = three\n" + LISTENER,
        "FILE: [limits] max_auth_failures: expected an integer, got 'three'",
    ),
    (
        "[limits]\nmessage_rate_per_ip = 60 per minute\n" + LISTENER,
        "FILE: [limits] message_rate_per_ip: expected a rate like 60/1m (count per duration), or"
        " empty for no limit, got '60 per minute'",
    ),
    (
        "[limits]\nconnection_rate_per_ip = 0/1m\n" + LISTENER,
        "FILE: [limits] connection_rate_per_ip: expected a rate like 60/1m (count per duration), or"
        " empty for no limit, got '0/1m'",
    ),
    (
        "[limits]\nlimit_exempt_ips = relay_ips, 10.0.0.1/8\n" + LISTENER,
        "FILE: [limits] limit_exempt_ips: expected an address or network like 192.0.2.0/24 or"
        " 2001:db8::/32, got '10.0.0.1/8' (host bits set: did you mean 10.0.0.0/8?)",
    ),
    (
        "[queue]\nbackend = redis\n" + LISTENER,
        "FILE: [queue] backend: expected one of spool, postgresql, got 'redis'",
    ),
    (
        "[tls]\nmin_version = TLSv1.1\n" + LISTENER,
        "FILE: [tls] min_version: expected one of TLSv1.2, TLSv1.3, got 'TLSv1.1'",
    ),
    ("[queue]\npath =\n" + LISTENER, "FILE: [queue] path: expected a path, got ''"),
    (
        "[tls]\ngenerate_self_signed = maybe\n" + LISTENER,
        "FILE: [tls] generate_self_signed: expected yes or no, got 'maybe'",
    ),
    ("[gateway]\nhostname = mx.example.com\n", "FILE: no [listener:NAME] section: at least one is required"),
    ("", "FILE: no [listener:NAME] section: at least one is required"),
    (
        "[listener:mx]\nrole = relay\n",
        "FILE: [listener:mx] endpoint: required, but not set",
    ),
    (
        "[listener:mx]\nendpoint = tcp:25\n",
        "FILE: [listener:mx] role: required, but not set",
    ),
    (
        "[listener:mx]\nendpoint = tcp:25\nrole = mx\n",
        "FILE: [listener:mx] role: expected one of submission, relay, got 'mx'",
    ),
    (
        LISTENER.replace("tcp:2525", "ssl:465"),
        "FILE: [listener:mx] endpoint: ssl endpoints are not used: write tcp:PORT and tls = implicit,"
        " got 'ssl:465'",
    ),
    (
        LISTENER.replace("tcp:2525", "stdio:"),
        "FILE: [listener:mx] endpoint: expected an endpoint like tcp:25 of type tcp, tcp6, unix, systemd"
        " (or haproxy: before one), got 'stdio:'",
    ),
    (
        LISTENER.replace("tcp:2525", "2525"),
        "FILE: [listener:mx] endpoint: expected an endpoint like tcp:25 of type tcp, tcp6, unix, systemd"
        " (or haproxy: before one), got '2525'",
    ),
    (
        LISTENER.replace("tcp:2525", "tcp:smtp"),
        "FILE: [listener:mx] endpoint: expected a valid tcp endpoint, got 'tcp:smtp'"
        " (invalid literal for int() with base 10: 'smtp')",
    ),
    (
        LISTENER.replace("tcp:2525", "tcp:70000"),
        "FILE: [listener:mx] endpoint: expected a port from 0 to 65535, got 'tcp:70000'",
    ),
    (
        LISTENER.replace("tcp:2525", "systemd:domain=INET"),
        "FILE: [listener:mx] endpoint: expected a valid systemd endpoint, got 'systemd:domain=INET'"
        " (Specify exactly one of descriptor index or name)",
    ),
    (
        LISTENER.replace("tls = none", "tls = never"),
        "FILE: [listener:mx] tls: expected one of none, optional, required, implicit, got 'never'",
    ),
    (
        LISTENER.replace("auth = none", "auth = required"),
        "FILE: [listener:mx] auth: auth = required needs tls",
    ),
    (
        LISTENER + "allowed_ips = 10.0.0.1/8\n",
        "FILE: [listener:mx] allowed_ips: expected an address or network like 192.0.2.0/24 or"
        " 2001:db8::/32, got '10.0.0.1/8' (host bits set: did you mean 10.0.0.0/8?)",
    ),
    (
        LISTENER + "relay_ips = 127.0.0.1, localhost\n",
        "FILE: [listener:mx] relay_ips: expected an address or network like 192.0.2.0/24 or"
        " 2001:db8::/32, got 'localhost'",
    ),
    (
        LISTENER + "max_recipients = 0\n",
        "FILE: [listener:mx] max_recipients: expected an integer >= 1, got '0'",
    ),
    (
        LISTENER + "data_timeout = soon\n",
        "FILE: [listener:mx] data_timeout: expected a duration like 30s, 5m, 1h or 2d, got 'soon'",
    ),
    (
        LISTENER + LISTENER.replace("mx]", "mx2]"),
        "FILE: [listener:mx2] endpoint: same endpoint as [listener:mx]",
    ),
    (
        LISTENER.replace("mx]", "my mx]"),
        "FILE: [listener:my mx]: expected [listener:NAME], NAME made of letters, digits, '_', '.' and '-'",
    ),
    (
        LISTENER.replace("mx]", "]"),
        "FILE: [listener:]: expected [listener:NAME], NAME made of letters, digits, '_', '.' and '-'",
    ),
    (
        LISTENER.replace(":mx]", "]"),
        "FILE: [listener]: expected [listener:NAME], NAME made of letters, digits, '_', '.' and '-'",
    ),
    (
        "[gateway]\n[gateway]\n" + LISTENER,
        "FILE: [gateway]: duplicate section (line 2)",
    ),
    (
        "[gateway]\nhostname = a.example\nhostname = b.example\n" + LISTENER,
        "FILE: [gateway] hostname: duplicate key (line 3)",
    ),
    (
        "[gateway]\nhostname = a.example\nHostName = b.example\n" + LISTENER,
        "FILE: [gateway] hostname: duplicate key (line 3)",
    ),
    (
        "hostname = mx.example.com\n" + LISTENER,
        "FILE: line 1: 'hostname = mx.example.com' is not inside a [section]",
    ),
    (
        "[gateway]\nhostname\n" + LISTENER,
        "FILE: line 2: expected 'key = value', got 'hostname'",
    ),
    (
        "[gateway\n" + LISTENER,
        "FILE: line 1: '[gateway' is not inside a [section]",
    ),
    (
        LISTENER.replace("tls = none", "tls = required"),
        "FILE: [tls] certificate: required, because [listener:mx] has tls = required",
    ),
    (
        LISTENER.replace("tls = none", "tls = optional") + "[tls]\ncertificate = /nonexistent/c.pem\n",
        "FILE: [tls] private_key: required, because [listener:mx] has tls = optional",
    ),
    (
        LISTENER.replace("tls = none", "tls = implicit")
        + "[tls]\ncertificate = /nonexistent/c.pem\nprivate_key = /nonexistent/k.pem\n",
        "FILE: [tls] certificate: file not found: /nonexistent/c.pem",
    ),
    (
        LISTENER.replace("auth = none", "auth = optional"),
        "FILE: [auth] users_file: required, because [listener:mx] has auth = optional",
    ),
    (
        LISTENER + "[auth]\nusers_file = /nonexistent/users\n",
        "FILE: [auth] users_file: file not found: /nonexistent/users",
    ),
    (
        LISTENER + "[auth]\nusers_file = /\n",
        "FILE: [auth] users_file: not a file: /",
    ),
]


@pytest.mark.parametrize("text, expected", BROKEN)
def test_broken(tmp_path, text, expected):
    assert error(tmp_path, text) == expected


def test_errors_are_one_line(tmp_path):
    message = error(tmp_path, "[gateway]\nhostname = a\n  b\n" + LISTENER)
    assert message == "FILE: [gateway] hostname: expected a hostname like mail.example.com, got 'a\\nb'"


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "%s: cannot read: No such file or directory" % path
    assert (info.value.section, info.value.key) == (None, None)


def test_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == "%s: cannot read: Is a directory" % tmp_path


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"[gateway]\nhostname = caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == "%s: cannot read: not UTF-8 text (byte 0xe9 at offset 24)" % path


def test_utf8_bom_is_fine(tmp_path):
    path = tmp_path / "bom.ini"
    path.write_bytes(b"\xef\xbb\xbf" + PLAIN.encode())
    assert load_config(str(path)).gateway.hostname == "mx.example.com"


def test_huge_file(tmp_path):
    path = tmp_path / "huge.ini"
    path.write_bytes(b"#" * (1024 * 1024 + 10))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == "%s: cannot read: larger than 1M, not a config file" % path


def test_null_byte_in_name():
    with pytest.raises(ConfigError) as info:
        load_config("a\0b")
    assert str(info.value) == "a\0b: cannot read: embedded null byte"


def test_unreadable(tmp_path, monkeypatch):
    path = write(tmp_path, PLAIN)
    monkeypatch.setattr(loader_module, "open", _deny(path), raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "%s: cannot read: Permission denied" % path


# --- delivery: [tls] ca_file, [dns], [delivery], [route:NAME], [dkim] ----------------------------

MX_ROUTE = "[route:out]\ndomains = *\nmx = yes\n"


def route(name="r", **keys):
    """A [route:NAME] section; keys in the order given, smarthost by default."""
    keys.setdefault("domains", "example.com")
    if "mx" not in keys:
        keys.setdefault("smarthost", "127.0.0.1")
    return "[route:%s]\n" % name + "".join("%s = %s\n" % item for item in keys.items())


def test_ca_file(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    config = load(tmp_path, PLAIN + "[tls]\nca_file = ca.pem\n")
    assert config.tls.ca_file == str(tmp_path / "ca.pem")
    assert config.tls.certificate is None


def test_ca_file_unreadable(tmp_path, monkeypatch):
    (tmp_path / "ca.pem").write_text("x")
    monkeypatch.setattr(types_module, "open", _deny(tmp_path / "ca.pem"), raising=False)
    message = error(tmp_path, PLAIN + "[tls]\nca_file = ca.pem\n")
    assert message == "FILE: [tls] ca_file: not readable: %s" % (tmp_path / "ca.pem")


def test_verify_without_ca_file_uses_the_system_store(tmp_path):
    config = load(tmp_path, PLAIN + route(tls="verify"))
    assert (config.routes[0].tls, config.tls.ca_file) == ("verify", None)


@pytest.mark.parametrize(
    "text, value",
    [
        ("", ()),
        ("192.0.2.53", (("192.0.2.53", 53),)),
        ("192.0.2.53:5353", (("192.0.2.53", 5353),)),
        ("::1", (("::1", 53),)),
        ("[::1]:5353", (("::1", 5353),)),
        ("[2001:DB8::53]", (("2001:db8::53", 53),)),
        ("2001:db8::53:1", (("2001:db8::53:1", 53),)),  # bare IPv6: all of it is the address
        ("127.0.0.1, [::1]:5353,\n  192.0.2.1:53", (("127.0.0.1", 53), ("::1", 5353), ("192.0.2.1", 53))),
        ("127.0.0.1, 127.0.0.1:53", (("127.0.0.1", 53),)),
    ],
)
def test_nameservers(tmp_path, text, value):
    config = load(tmp_path, PLAIN + "[dns]\nnameservers = %s\n" % text)
    assert config.dns.nameservers == value
    assert all(isinstance(port, int) for _, port in value)


def test_dns_timeout(tmp_path):
    assert load(tmp_path, PLAIN + "[dns]\ntimeout = 2.5s\n").dns.timeout == 2.5


def test_delivery_keys(tmp_path):
    config = load(
        tmp_path,
        PLAIN
        + "[delivery]\nmx_port = 2525\nconcurrency = 100\nper_destination_concurrency = 1\n"
        + "retry = 30s, 10m,\n  1h\nmax_lifetime = 5d\ndelay_warning = 0\nconnect_timeout = 10s\n"
        + "command_timeout = 1m\ndata_timeout = 2m\n",
    )
    assert config.delivery == DeliveryConfig(
        mx_port=2525,
        concurrency=100,
        per_destination_concurrency=1,
        retry=(30.0, 600.0, 3600.0),
        max_lifetime=5 * 86400.0,
        delay_warning=0.0,
        connect_timeout=10.0,
        command_timeout=60.0,
        data_timeout=120.0,
    )
    assert isinstance(config.delivery.retry, tuple)


def test_retry_of_one_wait(tmp_path):
    assert load(tmp_path, PLAIN + "[delivery]\nretry = 15m\n").delivery.retry == (900.0,)


def test_route_defaults(tmp_path):
    config = load(tmp_path, PLAIN + route("in", smarthost="exchange.corp.example") + MX_ROUTE)
    assert config.routes == (
        RouteConfig(name="in", domains=("example.com",), smarthosts=(("exchange.corp.example", 25),)),
        RouteConfig(name="out", domains=("*",), mx=True, dkim_sign=True,
                    strip_headers=EXCHANGE_HEADERS),
    )


def test_routes_keep_file_order(tmp_path):
    names = ["zeta", "alpha", "m.i-d_1"]
    text = PLAIN + "".join(route(name, domains="d%d.example" % i) for i, name in enumerate(names))
    assert [r.name for r in load(tmp_path, text).routes] == ["zeta", "alpha", "m.i-d_1"]


def test_route_keys(tmp_path):
    config = load(
        tmp_path,
        PLAIN
        + route(domains="Example.COM, .Example.com., example.org, example.com", smarthost="a.example",
                tls="Verify", username="gw@corp.example", password="s3cr=t;x", dkim_sign="yes")
        + route("o", domains="*", mx="yes", dkim_sign="no", tls="none"),
    )
    r, o = config.routes
    assert r.domains == ("example.com", ".example.com", "example.org")
    assert (r.tls, r.username, r.password, r.dkim_sign, r.mx) == ("verify", "gw@corp.example", "s3cr=t;x", True, False)
    assert (o.domains, o.mx, o.smarthosts, o.dkim_sign, o.tls) == (("*",), True, (), False, "none")


@pytest.mark.parametrize(
    "text, value",
    [
        ("mx.example.com", (("mx.example.com", 25),)),
        ("MX.Example.com.:587", (("mx.example.com", 587),)),
        ("192.0.2.25", (("192.0.2.25", 25),)),
        ("192.0.2.25:2526", (("192.0.2.25", 2526),)),
        ("[2001:db8::25]:26", (("2001:db8::25", 26),)),
        ("[2001:db8::25]", (("2001:db8::25", 25),)),
        ("2001:db8::25", (("2001:db8::25", 25),)),
        ("localhost", (("localhost", 25),)),
        (
            "exchange1.corp.example:25, exchange2.corp.example:25",
            (("exchange1.corp.example", 25), ("exchange2.corp.example", 25)),
        ),
        ("a.example, a.example:25, a.example:26", (("a.example", 25), ("a.example", 26))),
    ],
)
def test_smarthosts(tmp_path, text, value):
    assert load(tmp_path, PLAIN + route(smarthost=text)).routes[0].smarthosts == value


def test_password_file(tmp_path):
    (tmp_path / "pw").write_bytes(b"  s3cret #1 \r\nsecond line\n")
    config = load(tmp_path, PLAIN + route(username="u", password_file="pw"))
    assert config.routes[0].password == "s3cret #1"
    (tmp_path / "pw").write_bytes(b"\xef\xbb\xbfonly line")  # a BOM and no newline
    assert load(tmp_path, PLAIN + route(username="u", password_file="pw")).routes[0].password == "only line"


def test_password_file_unreadable(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("x\n")
    monkeypatch.setattr(types_module, "open", _deny(tmp_path / "pw"), raising=False)
    message = error(tmp_path, PLAIN + route(username="u", password_file="pw"))
    assert message == "FILE: [route:r] password_file: not readable: %s" % (tmp_path / "pw")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\n", "empty first line, expected the password: {}"),
        (b"  \nsecond\n", "empty first line, expected the password: {}"),
        (b"", "empty first line, expected the password: {}"),
        (b"caf\xe9\n", "not UTF-8 text: {}"),
        (b"x" * 5000, "first line longer than 4096 bytes: {}"),
    ],
)
def test_bad_password_file(tmp_path, content, message):
    (tmp_path / "pw").write_bytes(content)
    expected = "FILE: [route:r] password_file: " + message.format(tmp_path / "pw")
    assert error(tmp_path, PLAIN + route(username="u", password_file="pw")) == expected


def test_dkim(tmp_path):
    (tmp_path / "dkim.key").write_text("x")
    config = load(
        tmp_path,
        PLAIN
        + "[dkim]\nsign_domains = Example.com, example.org\nselector = Mail-2024\nprivate_key = dkim.key\n"
        + "headers = From, from, Subject, X-Custom.Header\n",
    )
    assert config.dkim == DKIMConfig(
        sign_domains=("example.com", "example.org"),
        selector="mail-2024",
        private_key=str(tmp_path / "dkim.key"),
        headers=("from", "from", "subject", "x-custom.header"),
    )


def test_dkim_default_headers_oversign_from(tmp_path):
    headers = load(tmp_path, PLAIN).dkim.headers
    assert headers[:2] == ("from", "from") and "content-transfer-encoding" in headers


def test_dkim_private_key_checked_when_set(tmp_path):
    message = error(tmp_path, PLAIN + "[dkim]\nprivate_key = nope.key\n")
    assert message == "FILE: [dkim] private_key: file not found: %s" % (tmp_path / "nope.key")


def test_dkim_private_key_unreadable(tmp_path, monkeypatch):
    (tmp_path / "dkim.key").write_text("x")
    monkeypatch.setattr(types_module, "open", _deny(tmp_path / "dkim.key"), raising=False)
    text = PLAIN + "[dkim]\nsign_domains = example.com\nselector = s\nprivate_key = dkim.key\n"
    assert error(tmp_path, text) == "FILE: [dkim] private_key: not readable: %s" % (tmp_path / "dkim.key")


BROKEN_DELIVERY = [
    # [tls] ca_file
    ("[tls]\nca_file = /nonexistent/ca.pem\n", "FILE: [tls] ca_file: file not found: /nonexistent/ca.pem"),
    ("[tls]\nca_file = /\n", "FILE: [tls] ca_file: not a file: /"),
    # [dns]
    (
        "[dns]\nnameservers = ns1.example.com\n",
        "FILE: [dns] nameservers: expected a nameserver address like 192.0.2.53, 192.0.2.53:5353,"
        " ::1 or [::1]:5353, got 'ns1.example.com'",
    ),
    (
        "[dns]\nnameservers = [192.0.2.53]:53\n",
        "FILE: [dns] nameservers: expected a nameserver address like 192.0.2.53, 192.0.2.53:5353,"
        " ::1 or [::1]:5353, got '[192.0.2.53]:53'",
    ),
    (
        "[dns]\nnameservers = 192.0.2.300\n",
        "FILE: [dns] nameservers: expected a nameserver address like 192.0.2.53, 192.0.2.53:5353,"
        " ::1 or [::1]:5353, got '192.0.2.300'",
    ),
    (
        "[dns]\nnameservers = 192.0.2.53:0\n",
        "FILE: [dns] nameservers: expected a port from 1 to 65535, got '192.0.2.53:0'",
    ),
    (
        "[dns]\nnameservers = [::1]:65536\n",
        "FILE: [dns] nameservers: expected a port from 1 to 65535, got '[::1]:65536'",
    ),
    (
        "[dns]\nnameservers = 127.0.0.1:\n",
        "FILE: [dns] nameservers: expected a port from 1 to 65535, got '127.0.0.1:'",
    ),
    ("[dns]\ntimeout = 0\n", "FILE: [dns] timeout: expected a duration greater than 0, got '0'"),
    ("[dns]\nretries = 3\n", "FILE: [dns] retries: unknown key"),
    # [delivery]
    ("[delivery]\nmx_port = 0\n", "FILE: [delivery] mx_port: expected a port from 1 to 65535, got '0'"),
    ("[delivery]\nmx_port = 65536\n", "FILE: [delivery] mx_port: expected a port from 1 to 65535, got '65536'"),
    ("[delivery]\nmx_port = smtp\n", "FILE: [delivery] mx_port: expected a port from 1 to 65535, got 'smtp'"),
    ("[delivery]\nconcurrency = 0\n", "FILE: [delivery] concurrency: expected an integer >= 1, got '0'"),
    (
        "[delivery]\nper_destination_concurrency = -1\n",
        "FILE: [delivery] per_destination_concurrency: expected an integer >= 1, got '-1'",
    ),
    ("[delivery]\nretry =\n", "FILE: [delivery] retry: expected at least one duration like 1m, 5m, 1h, got ''"),
    (
        "[delivery]\nretry = 1m, soon\n",
        "FILE: [delivery] retry: expected a duration like 30s, 5m, 1h or 2d, got 'soon'",
    ),
    ("[delivery]\nretry = 1m, 0\n", "FILE: [delivery] retry: expected a duration greater than 0, got '0'"),
    ("[delivery]\nmax_lifetime = 0\n", "FILE: [delivery] max_lifetime: expected a duration greater than 0, got '0'"),
    (
        "[delivery]\ndelay_warning = never\n",
        "FILE: [delivery] delay_warning: expected a duration like 30s, 5m, 1h or 2d, got 'never'",
    ),
    (
        "[delivery]\nconnect_timeout = 0s\n",
        "FILE: [delivery] connect_timeout: expected a duration greater than 0, got '0s'",
    ),
    # [route:NAME]
    ("[route:r]\nsmarthost = 127.0.0.1\n", "FILE: [route:r] domains: required, but not set"),
    (
        "[route:r]\ndomains =\nsmarthost = 127.0.0.1\n",
        "FILE: [route:r] domains: expected a list of domains like example.com, .example.com or *, got ''",
    ),
    (
        route(domains="*.example.com"),
        "FILE: [route:r] domains: expected a domain like example.com, .example.com (its subdomains) or *"
        " (any other), got '*.example.com' (did you mean '.example.com'?)",
    ),
    (
        route(domains="example.com, mail_hub.example"),
        "FILE: [route:r] domains: expected a domain like example.com, .example.com (its subdomains) or *"
        " (any other), got 'mail_hub.example'",
    ),
    (
        route(domains="..example.com"),
        "FILE: [route:r] domains: expected a domain like example.com, .example.com (its subdomains) or *"
        " (any other), got '..example.com'",
    ),
    (
        route("a", domains="example.com, .example.com") + route("b", domains="example.org, Example.COM"),
        "FILE: [route:b] domains: example.com is already in [route:a]",
    ),
    (
        route("a", domains="*", mx="yes") + route("b", domains="example.org") + route("c", domains="*", mx="yes"),
        "FILE: [route:c] domains: * is already in [route:a]",
    ),
    ("[route:r]\ndomains = *\n", "FILE: [route:r] smarthost: required, unless mx = yes"),
    (route(mx="no"), "FILE: [route:r] smarthost: required, unless mx = yes"),
    (
        route(smarthost="127.0.0.1", mx="yes"),
        "FILE: [route:r] smarthost: not allowed with mx = yes: a route delivers by MX or to smarthosts",
    ),
    (
        route(smarthost="mail_hub.corp.example"),
        "FILE: [route:r] smarthost: expected a host like mx.example.com, mx.example.com:587, 192.0.2.25"
        " or [2001:db8::25]:25, got 'mail_hub.corp.example'",
    ),
    (
        route(smarthost="192.0.2.300"),
        "FILE: [route:r] smarthost: expected a host like mx.example.com, mx.example.com:587, 192.0.2.25"
        " or [2001:db8::25]:25, got '192.0.2.300'",
    ),
    (
        route(smarthost="[mail.example.com]:25"),
        "FILE: [route:r] smarthost: expected a host like mx.example.com, mx.example.com:587, 192.0.2.25"
        " or [2001:db8::25]:25, got '[mail.example.com]:25'",
    ),
    (
        route(smarthost="a.example:25, b.example:0"),
        "FILE: [route:r] smarthost: expected a port from 1 to 65535, got 'b.example:0'",
    ),
    (
        route(smarthost="a.example:smtp"),
        "FILE: [route:r] smarthost: expected a port from 1 to 65535, got 'a.example:smtp'",
    ),
    (route(mx="maybe"), "FILE: [route:r] mx: expected yes or no, got 'maybe'"),
    (
        route(tls="optional"),
        "FILE: [route:r] tls: expected one of none, opportunistic, required, verify, got 'optional'",
    ),
    (route(username="u"), "FILE: [route:r] username: needs password or password_file"),
    (route(password="p"), "FILE: [route:r] password: needs username"),
    (route(password_file="/etc/hostname"), "FILE: [route:r] password_file: needs username"),
    (
        route(username="u", password="p", password_file="/etc/hostname"),
        "FILE: [route:r] password_file: not allowed with password: set one of them",
    ),
    (
        route(username="u", password="p", tls="none"),
        "FILE: [route:r] username: needs tls other than none: credentials are sent only over TLS",
    ),
    (
        route(username="u", password_file="/nonexistent/pw"),
        "FILE: [route:r] password_file: file not found: /nonexistent/pw",
    ),
    (route(username="u", password_file="/"), "FILE: [route:r] password_file: not a file: /"),
    (
        route(username="u", password="a\n  b"),
        "FILE: [route:r] password: expected a single line, got a value continued on the next line",
    ),
    (route(dkim_sign="sometimes"), "FILE: [route:r] dkim_sign: expected yes or no, got 'sometimes'"),
    (route(priority="1"), "FILE: [route:r] priority: unknown key"),
    (
        "[route:my route]\ndomains = *\nmx = yes\n",
        "FILE: [route:my route]: expected [route:NAME], NAME made of letters, digits, '_', '.' and '-'",
    ),
    ("[route]\ndomains = *\nmx = yes\n", "FILE: [route]: expected [route:NAME], NAME made of letters, digits, '_', '.' and '-'"),
    (route("a") + route("a"), "FILE: [route:a]: duplicate section (line 12)"),
    # [dkim]
    ("[dkim]\nsign_domains = example.com\n", "FILE: [dkim] selector: required, because sign_domains is set"),
    (
        "[dkim]\nsign_domains = example.com\nselector = s\n",
        "FILE: [dkim] private_key: required, because sign_domains is set",
    ),
    (
        "[dkim]\nsign_domains = example.com\nselector = s\nprivate_key = /nonexistent/dkim.key\n",
        "FILE: [dkim] private_key: file not found: /nonexistent/dkim.key",
    ),
    (
        "[dkim]\nsign_domains = *.example.com\n",
        "FILE: [dkim] sign_domains: expected a comma-separated list of domains like example.com,"
        " got '*.example.com'",
    ),
    (
        "[dkim]\nselector = mail.2024\n",
        "FILE: [dkim] selector: expected a DNS label like mail2024 (letters, digits and '-'), got 'mail.2024'",
    ),
    (
        "[dkim]\nselector = -s\n",
        "FILE: [dkim] selector: expected a DNS label like mail2024 (letters, digits and '-'), got '-s'",
    ),
    (
        "[dkim]\nheaders = to, subject\n",
        "FILE: [dkim] headers: must include from (RFC 6376 requires From to be signed)",
    ),
    ("[dkim]\nheaders =\n", "FILE: [dkim] headers: must include from (RFC 6376 requires From to be signed)"),
    (
        "[dkim]\nheaders = from, Subject:\n",
        "FILE: [dkim] headers: expected a list of header names like from, to, subject, got 'Subject:'",
    ),
    (
        "[dkim]\nheaders = from, reply to\n",
        "FILE: [dkim] headers: expected a list of header names like from, to, subject, got 'reply to'",
    ),
]


@pytest.mark.parametrize("text, expected", BROKEN_DELIVERY)
def test_broken_delivery(tmp_path, text, expected):
    assert error(tmp_path, PLAIN + text) == expected


def test_broken_delivery_in_check_config(tmp_path, capsys):
    from mailgate import cli

    path = write(tmp_path, PLAIN + route(username="u", password="p", tls="none"))
    assert cli.main(["check-config", path]) == 1
    expected = "[route:r] username: needs tls other than none: credentials are sent only over TLS"
    assert capsys.readouterr() == ("", "mailgate: %s: %s\n" % (path, expected))



# --- rendering ---------------------------------------------------------------------------------


def test_render_fills_every_default(tmp_path):
    text = render_config(load(tmp_path, PLAIN + "[route:out]\ndomains = *\nmx = yes\n"))
    for kind, section in SECTIONS.items():
        for key in section.keys:
            assert re.search(r"^%s =" % key, text, re.M), key
    assert "\n[listener:mx]\n" in text
    assert "\nmax_message_size = 35M\n" in text
    assert "\ncommand_timeout = 5m\n" in text
    assert "\npath = /var/spool/mailgate\n" in text
    assert "\ncertificate =\n" in text
    assert "\n[route:out]\n" in text
    assert "\nretry = 1m, 5m, 15m, 30m, 1h, 2h, 4h\n" in text
    assert "\ndelay_warning = 4h\n" in text
    assert "\nnameservers =\n" in text


def test_render_loads_back_the_same(tmp_path):
    (tmp_path / "users").write_text("")
    original = load(
        tmp_path,
        PLAIN.replace("[listener", "accepted_domains = example.com, example.org\n[listener")
        + "allowed_ips = 192.0.2.0/24, 2001:db8::/32\nrelay_ips = 127.0.0.1\nsession_timeout = 1.5s\n"
        + "max_message_size = 1000\n"
        + "[listener:sub]\nendpoint = tcp:2587\nrole = submission\ntls = implicit\n"
        + "[tls]\ncertificate = c.pem\nprivate_key = k.pem\ngenerate_self_signed = on\n"
        + "[auth]\nusers_file = users\n[limits]\ndata_timeout = 2d\n",
    )
    other = tmp_path / "other"
    other.mkdir()
    again = load_config(write(other, render_config(original, show_secrets=True)))
    assert attr.evolve(again, path=original.path) == original


def test_render_loads_back_the_delivery_sections(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "dkim.key").write_text("x")
    (tmp_path / "pw").write_text(" from a file \n")
    original = load(
        tmp_path,
        PLAIN
        + "[tls]\nca_file = ca.pem\n"
        + "[dns]\nnameservers = 127.0.0.1, [::1]:5353, 2001:db8::53\ntimeout = 1.5s\n"
        + "[delivery]\nmx_port = 2525\nconcurrency = 3\nper_destination_concurrency = 2\n"
        + "retry = 90s, 1h\nmax_lifetime = 36h\ndelay_warning = 0\nconnect_timeout = 7s\n"
        + route("in", domains="example.com, .example.com", smarthost="[2001:db8::25]:26, a.example",
                tls="required", username="u", password_file="pw")
        + route("partner", domains="partner.example", smarthost="192.0.2.1:587", tls="verify",
                username="p", password="inline", dkim_sign="yes")
        + route("out", domains="*", mx="yes", tls="none", dkim_sign="no")
        + "[dkim]\nsign_domains = example.com\nselector = s1\nprivate_key = dkim.key\nheaders = from, to\n",
    )
    assert original.routes[0].password == "from a file"
    other = tmp_path / "other"
    other.mkdir()
    hidden = render_config(original)
    assert "from a file" not in hidden and "inline" not in hidden
    assert hidden.count("\npassword = <hidden>\n") == 2
    text = render_config(original, show_secrets=True)
    assert "\n[route:in]\n" in text and "\npassword = from a file\n" in text
    assert "\nsmarthost = [2001:db8::25]:26, a.example:25\n" in text
    assert "\nnameservers = 127.0.0.1:53, [::1]:5353, [2001:db8::53]:53\n" in text
    assert "\ndelay_warning = 0s\n" in text
    again = load_config(write(other, text))
    assert attr.evolve(again, path=original.path) == original


# --- the shipped example -----------------------------------------------------------------------


def test_example_loads():
    config = load_config(os.path.join(REPO, "etc", "mailgate.ini"))
    assert config.gateway.hostname == "mailgate.localdomain"
    assert config.gateway.accepted_domains == ("example.com",)
    assert [(l.name, l.role, l.tls, l.auth) for l in config.listeners] == [
        ("relay", "relay", "optional", "optional"),
        ("submission", "submission", "required", "required"),
    ]
    assert config.queue.path == os.path.join(REPO, "var", "spool")
    assert config.tls.certificate == os.path.join(REPO, "var", "tls", "cert.pem")
    assert config.tls.generate_self_signed is True
    assert config.auth.users_file == os.path.join(REPO, "etc", "users")
    assert config.routes == (
        RouteConfig(name="internal", domains=("example.com",), smarthosts=(("127.0.0.1", 2526),)),
        RouteConfig(name="internet", domains=("*",), mx=True, dkim_sign=True,
                    strip_headers=EXCHANGE_HEADERS),
    )
    assert (config.dns, config.delivery, config.dkim) == (DNSConfig(), DeliveryConfig(), DKIMConfig())
    assert config.tls.ca_file is None
    assert [l.filters for l in config.listeners] == [("spf", "dkim", "dmarc", "attachments"), ("attachments",)]
    assert (config.filters, config.filter_sections) == (FiltersConfig(), ())
    assert (config.spf, config.dmarc, config.attachments) == (SPFConfig(), DMARCConfig(), AttachmentsConfig())


def test_example_shows_the_filters_default_of_each_listener():
    """Each example listener has a commented filters line with its role's default."""
    with open(os.path.join(REPO, "etc", "mailgate.ini"), encoding="utf-8") as f:
        example = f.read()
    config = load_config(os.path.join(REPO, "etc", "mailgate.ini"))
    for listener in config.listeners:
        section = example[example.index("[listener:%s]" % listener.name):]
        section = section[:section.index("\n[", 1)]
        assert "\n#filters = %s\n" % ", ".join(listener.filters) in section, listener.name
    # The default extension list (shown commented out) must not be frozen uncommented.
    assert not re.search(r"^blocked_extensions", example, re.M)


def test_config_has_a_field_per_section():
    assert {section.field for section in SECTIONS.values()} == {
        field.name for field in attr.fields(Config) if field.name != "path"
    }


def test_readme_exchange_example_loads(tmp_path):
    """The worked example in the README stays a valid configuration."""
    from tests.tlsutil import make_ca

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("### mailgate in front of Exchange"):]
    text = section[section.index("```ini\n") + 7:section.index("\n```", section.index("```ini"))]
    ca = make_ca(str(tmp_path))
    cert, key = ca.issue("mx1.contoso.example", str(tmp_path))
    from mailgate.delivery.dkimsign import generate_key, write_key

    pem, _ = generate_key("rsa", 2048)
    write_key(str(tmp_path / "dkim.key"), pem)
    (tmp_path / "users").write_text("")
    (tmp_path / "ldap.password").write_text("secret\n")
    text = (text.replace("/etc/mailgate/tls/mx1.contoso.example.pem", cert)
            .replace("/etc/mailgate/tls/mx1.contoso.example.key", key)
            .replace("/etc/mailgate/tls/corp-ca.pem", ca.ca_path)
            .replace("/etc/mailgate/tls/public-cas.pem", ca.ca_path)
            .replace("/etc/mailgate/ldap.password", str(tmp_path / "ldap.password"))
            .replace("/etc/mailgate/users", str(tmp_path / "users"))
            .replace("/etc/mailgate/dkim/mg2026.contoso.example.key", str(tmp_path / "dkim.key")))
    config = load(tmp_path, text)
    assert [l.name for l in config.listeners] == ["internet", "exchange", "partners", "submission"]
    assert [l.recipients for l in config.listeners] == ["ldap", "any", "any", "any"]
    assert [l.header_firewall for l in config.listeners] == [True, False, True, False]
    assert config.listeners[2].relay_client_certs == ("mail.protection.outlook.com",)
    assert config.auth.backend == ("ldap", "file")
    assert len(config.ldap.servers) == 2 and "userAccountControl" in config.ldap.user_filter
    assert [r.name for r in config.routes] == ["exchange", "internet"]
    assert config.routes[1].dkim_sign and not config.routes[0].dkim_sign
    assert config.routes[1].strip_headers and not config.routes[0].strip_headers


# --- filters: [listener:NAME] filters, [filters], [filter:NAME], [spf], [dmarc], [attachments] ---

SUBMISSION = "[listener:sub]\nendpoint = tcp:2587\nrole = submission\ntls = none\nauth = none\n"
GREYLIST = "mycompany.filters.Greylist"


def with_filters(filters, text=""):
    """PLAIN whose listener has filters = FILTERS, then TEXT."""
    return PLAIN + "filters = %s\n" % filters + text


def test_filters_default_by_role(tmp_path):
    config = load(tmp_path, PLAIN + SUBMISSION)
    relay, sub = config.listeners
    assert relay.filters == ("spf", "dkim", "dmarc", "attachments")
    assert sub.filters == ("attachments",) == ListenerConfig(name="s", endpoint="", role="", tls="", auth="").filters
    assert isinstance(relay.filters, tuple)


@pytest.mark.parametrize(
    "text, value",
    [
        ("", ()),
        ("attachments", ("attachments",)),
        ("SPF, Dkim,\n  DMARC", ("spf", "dkim", "dmarc")),
        ("dmarc", ("dmarc",)),  # without spf and dkim before it: allowed (it fails alignment)
        ("dmarc, spf, dkim", ("dmarc", "spf", "dkim")),  # order kept as written
        (GREYLIST + ", spf", (GREYLIST, "spf")),
        ("a.B, a.b, _x.y_2.Z3", ("a.B", "a.b", "_x.y_2.Z3")),  # dotted paths keep their case
        ("spf.Filter", ("spf.Filter",)),  # a dotted path, not the built-in
        (" spf ,, attachments, ", ("spf", "attachments")),
    ],
)
def test_filters(tmp_path, text, value):
    config = load(tmp_path, with_filters(text))
    assert config.listeners[0].filters == value


def test_submission_filters_may_be_set(tmp_path):
    config = load(tmp_path, PLAIN + SUBMISSION + "filters = spf, dkim, dmarc, attachments\n")
    assert config.listeners[1].filters == ("spf", "dkim", "dmarc", "attachments")


def test_filter_paths_are_not_imported(tmp_path):
    config = load(tmp_path, with_filters("no_such_package.nowhere.Nothing"))
    assert config.listeners[0].filters == ("no_such_package.nowhere.Nothing",)


def test_filters_timeout(tmp_path):
    assert load(tmp_path, PLAIN + "[filters]\ntimeout = 1m\n").filters == FiltersConfig(timeout=60.0)
    assert load(tmp_path, PLAIN + "[filters]\ntimeout = 2.5\n").filters.timeout == 2.5


def test_filter_section_options_in_file_order(tmp_path):
    config = load(
        tmp_path,
        with_filters(
            "spf, %s, other.Filter" % GREYLIST,
            "[filter:%s]\nZeta = 1\nalpha = two words  # a comment\nDelay = 5m\nempty =\n"
            "list = a,\n  b\nodd = %%(x)s;#x\n" % GREYLIST + "[filter:other.Filter]\n",
        ),
    )
    greylist, other = config.filter_sections
    assert greylist == FilterSection(
        name=GREYLIST,
        options=(
            ("zeta", "1"), ("alpha", "two words"), ("delay", "5m"), ("empty", ""), ("list", "a,\nb"),
            ("odd", "%(x)s;#x"),
        ),
    )
    assert other == FilterSection(name="other.Filter", options=())
    assert isinstance(greylist.options, tuple) and all(isinstance(pair, tuple) for pair in greylist.options)


def test_filter_sections_keep_file_order_and_may_serve_any_listener(tmp_path):
    text = (
        with_filters("b.B")
        + SUBMISSION + "filters = a.A, b.B\n"
        + "[filter:b.B]\nx = 1\n[filter:a.A]\ny = 2\n"
    )
    assert [s.name for s in load(tmp_path, text).filter_sections] == ["b.B", "a.A"]


def test_spf(tmp_path):
    text = PLAIN + "[spf]\nreject_fail = yes\ntempfail_on_error = on\nreject_permerror = true\ncheck_internal = 1\n"
    assert load(tmp_path, text).spf == SPFConfig(
        reject_fail=True, tempfail_on_error=True, reject_permerror=True, check_internal=True
    )


def test_dmarc(tmp_path):
    text = PLAIN + "[dmarc]\nenforce = yes\nquarantine_action = Tag\ntempfail_on_error = yes\ncheck_internal = yes\n"
    assert load(tmp_path, text).dmarc == DMARCConfig(
        enforce=True, quarantine_action="tag", tempfail_on_error=True, check_internal=True
    )


def test_dmarc_without_spf_and_dkim_is_allowed(tmp_path):
    config = load(tmp_path, with_filters("attachments, dmarc", "[dmarc]\nenforce = yes\n"))
    assert config.listeners[0].filters == ("attachments", "dmarc") and config.dmarc.enforce


def test_attachments(tmp_path):
    config = load(
        tmp_path,
        PLAIN
        + "[attachments]\nblocked_extensions = .EXE, js, .Js, ps1,\n  7z, c++, tar_x, a-b\n"
        + "blocked_mime_types = Application/X-MSDownload, image/*, application/vnd.ms-excel.sheet.macroEnabled.12,"
        + " image/*\n"
        + "detect_executables = no\naction = Strip\nmax_archive_depth = 0\nmax_archive_members = 1\n"
        + "max_expanded_size = 1G\nmax_compression_ratio = 2\nencrypted_archives = allow\n"
        + "max_mime_depth = 1\nmax_parts = 1\nmalformed = accept\n",
    )
    assert config.attachments == AttachmentsConfig(
        blocked_extensions=("exe", "js", "ps1", "7z", "c++", "tar_x", "a-b"),
        blocked_mime_types=("application/x-msdownload", "image/*", "application/vnd.ms-excel.sheet.macroenabled.12"),
        detect_executables=False,
        action="strip",
        max_archive_depth=0,
        max_archive_members=1,
        max_expanded_size=1024**3,
        max_compression_ratio=2,
        encrypted_archives="allow",
        max_mime_depth=1,
        max_parts=1,
        malformed="accept",
    )


def test_attachments_defaults(tmp_path):
    attachments = load(tmp_path, PLAIN).attachments
    assert attachments.blocked_extensions == DEFAULT_BLOCKED_EXTENSIONS
    assert "exe" in attachments.blocked_extensions and attachments.blocked_mime_types == ()
    assert attachments.max_expanded_size == 100 * 1024 * 1024


@pytest.mark.parametrize("text", ["none", "NONE", " None ", ""])
def test_no_blocked_extensions(tmp_path, text):
    config = load(tmp_path, PLAIN + "[attachments]\nblocked_extensions = %s\n" % text)
    assert config.attachments.blocked_extensions == ()


def test_the_extension_none_is_written_with_its_dot(tmp_path):
    config = load(tmp_path, PLAIN + "[attachments]\nblocked_extensions = .none, exe\n")
    assert config.attachments.blocked_extensions == ("none", "exe")


def test_max_archive_depth_bounds(tmp_path):
    for depth in (0, 10):
        config = load(tmp_path, PLAIN + "[attachments]\nmax_archive_depth = %d\n" % depth)
        assert config.attachments.max_archive_depth == depth


def test_int_bounds():
    assert Int(0, 10).parse("7", "/") == 7
    with pytest.raises(ValueError, match=r"^expected an integer <= 5, got '6'$"):
        Int(maximum=5).parse("6", "/")
    with pytest.raises(ValueError, match=r"^expected an integer >= 2, got '1'$"):
        Int(2).parse("1", "/")


BROKEN_FILTERS = [
    # [listener:NAME] filters
    (
        with_filters("greylist"),
        "FILE: [listener:mx] filters: expected a filter name: spf, dkim, dmarc, attachments, or a dotted path"
        " like package.module.ClassName, got 'greylist'",
    ),
    (
        with_filters("none"),
        "FILE: [listener:mx] filters: expected a filter name: spf, dkim, dmarc, attachments, or a dotted path"
        " like package.module.ClassName, got 'none' (for no filters, leave the value empty)",
    ),
    (
        with_filters("spf dkim"),
        "FILE: [listener:mx] filters: expected a filter name: spf, dkim, dmarc, attachments, or a dotted path"
        " like package.module.ClassName, got 'spf dkim'",
    ),
    *[
        (
            with_filters("spf, " + name),
            "FILE: [listener:mx] filters: expected a filter name: spf, dkim, dmarc, attachments, or a dotted"
            " path like package.module.ClassName, got %r" % name,
        )
        for name in ["mycompany..Greylist", ".filters.Greylist", "filters.Greylist.", "filters.1Greylist",
                     "my-company.Greylist", "filters:Greylist", "filters/Greylist", "filtres.Grey list",
                     "mycompany.filters.Greylist()", "spf.", "é.Filtre"]
    ],
    (with_filters("spf, dkim, SPF"), "FILE: [listener:mx] filters: spf is listed twice"),
    (with_filters("%s, spf, %s" % (GREYLIST, GREYLIST)), "FILE: [listener:mx] filters: %s is listed twice" % GREYLIST),
    (PLAIN + SUBMISSION + "filters = attachments, attachments\n", "FILE: [listener:sub] filters: attachments is listed twice"),
    # [filters]
    (PLAIN + "[filters]\ntimeout = 0\n", "FILE: [filters] timeout: expected a duration greater than 0, got '0'"),
    (PLAIN + "[filters]\ntimeout = soon\n", "FILE: [filters] timeout: expected a duration like 30s, 5m, 1h or 2d, got 'soon'"),
    (PLAIN + "[filters]\norder = spf\n", "FILE: [filters] order: unknown key"),
    (PLAIN + "[filters:x]\n", "FILE: [filters:x]: unknown section"),
    # [filter:NAME]
    (
        PLAIN + "[filter:%s]\ndelay = 5m\n" % GREYLIST,
        "FILE: [filter:mycompany.filters.Greylist]: not used by any listener's filters",
    ),
    (
        with_filters("spf, mycompany.filters.Greylist", "[filter:mycompany.filters.greylist]\n"),
        "FILE: [filter:mycompany.filters.greylist]: not used by any listener's filters",
    ),
    (with_filters("", "[filter:greylist]\nx = 1\n"), "FILE: [filter:greylist]: not used by any listener's filters"),
    *[
        (
            with_filters("spf, dkim, dmarc, attachments", "[filter:%s]\nx = 1\n" % name),
            "FILE: [filter:%s]: built-in filters are configured in [spf], [dmarc], [attachments]" % name,
        )
        for name in ["spf", "dkim", "dmarc", "attachments", "Attachments"]
    ],
    (with_filters("", "[filter:spf]\n"), "FILE: [filter:spf]: built-in filters are configured in [spf], [dmarc], [attachments]"),
    (PLAIN + "[filter]\nx = 1\n", "FILE: [filter]: expected [filter:NAME], NAME made of letters, digits, '_', '.' and '-'"),
    (
        PLAIN + "[filter:my filter]\nx = 1\n",
        "FILE: [filter:my filter]: expected [filter:NAME], NAME made of letters, digits, '_', '.' and '-'",
    ),
    (
        with_filters("a.B", "[filter:a.B]\nx = 1\n[filter:a.B]\ny = 2\n"),
        "FILE: [filter:a.B]: duplicate section (line 12)",
    ),
    (with_filters("a.B", "[filter:a.B]\nx = 1\nX = 2\n"), "FILE: [filter:a.B] x: duplicate key (line 12)"),
    # [spf]
    (PLAIN + "[spf]\nreject_fail = maybe\n", "FILE: [spf] reject_fail: expected yes or no, got 'maybe'"),
    (PLAIN + "[spf]\nreject_softfail = yes\n", "FILE: [spf] reject_softfail: unknown key"),
    # [dmarc]
    (
        PLAIN + "[dmarc]\nquarantine_action = reject\n",
        "FILE: [dmarc] quarantine_action: expected one of quarantine, tag, got 'reject'",
    ),
    (PLAIN + "[dmarc]\nenforce = always\n", "FILE: [dmarc] enforce: expected yes or no, got 'always'"),
    # [attachments]
    *[
        (
            PLAIN + "[attachments]\nblocked_extensions = exe, %s\n" % item,
            "FILE: [attachments] blocked_extensions: expected none, or a list of file name extensions like exe,"
            " .js, docm, got %r" % item,
        )
        for item in ["tar.gz", "..exe", ".", "*.exe", "ex e", "none", "exé"]
    ],
    *[
        (
            PLAIN + "[attachments]\nblocked_mime_types = image/*, %s\n" % item,
            "FILE: [attachments] blocked_mime_types: expected a list of MIME types like application/x-msdownload"
            " or application/*, got %r" % item,
        )
        for item in ["application", "*/*", "*/exe", "application/", "/x", "application/x-ms download",
                     "application/x/y", "none", "text/plain; charset=utf-8"]
    ],
    (
        PLAIN + "[attachments]\nblocked_mime_types = none\n",
        "FILE: [attachments] blocked_mime_types: expected a list of MIME types like application/x-msdownload"
        " or application/*, got 'none'",
    ),
    (PLAIN + "[attachments]\ndetect_executables = maybe\n", "FILE: [attachments] detect_executables: expected yes or no, got 'maybe'"),
    (
        PLAIN + "[attachments]\naction = delete\n",
        "FILE: [attachments] action: expected one of reject, quarantine, strip, got 'delete'",
    ),
    (
        PLAIN + "[attachments]\nmax_archive_depth = 11\n",
        "FILE: [attachments] max_archive_depth: expected an integer from 0 to 10, got '11'",
    ),
    (
        PLAIN + "[attachments]\nmax_archive_depth = -1\n",
        "FILE: [attachments] max_archive_depth: expected an integer from 0 to 10, got '-1'",
    ),
    (
        PLAIN + "[attachments]\nmax_archive_depth = deep\n",
        "FILE: [attachments] max_archive_depth: expected an integer, got 'deep'",
    ),
    (
        PLAIN + "[attachments]\nmax_archive_members = 0\n",
        "FILE: [attachments] max_archive_members: expected an integer >= 1, got '0'",
    ),
    (
        PLAIN + "[attachments]\nmax_expanded_size = 0\n",
        "FILE: [attachments] max_expanded_size: expected a size of at least 1 bytes, got '0'",
    ),
    (
        PLAIN + "[attachments]\nmax_expanded_size = 100MB\n",
        "FILE: [attachments] max_expanded_size: expected a size like 35M, got '100MB'",
    ),
    (
        PLAIN + "[attachments]\nmax_compression_ratio = 1\n",
        "FILE: [attachments] max_compression_ratio: expected an integer >= 2, got '1'",
    ),
    (
        PLAIN + "[attachments]\nencrypted_archives = scan\n",
        "FILE: [attachments] encrypted_archives: expected one of allow, reject, got 'scan'",
    ),
    (PLAIN + "[attachments]\nmax_mime_depth = 0\n", "FILE: [attachments] max_mime_depth: expected an integer >= 1, got '0'"),
    (PLAIN + "[attachments]\nmax_parts = 0\n", "FILE: [attachments] max_parts: expected an integer >= 1, got '0'"),
    (
        PLAIN + "[attachments]\nmalformed = quarantine\n",
        "FILE: [attachments] malformed: expected one of reject, accept, got 'quarantine'",
    ),
    (PLAIN + "[attachments]\nmax_size = 1M\n", "FILE: [attachments] max_size: unknown key"),
]


@pytest.mark.parametrize("text, expected", BROKEN_FILTERS)
def test_broken_filters(tmp_path, text, expected):
    assert error(tmp_path, text) == expected


def test_broken_filter_section_in_check_config(tmp_path, capsys):
    from mailgate import cli

    path = write(tmp_path, PLAIN + "[filter:%s]\ndelay = 5m\n" % GREYLIST)
    assert cli.main(["check-config", path]) == 1
    expected = "[filter:%s]: not used by any listener's filters" % GREYLIST
    assert capsys.readouterr() == ("", "mailgate: %s: %s\n" % (path, expected))


def test_render_loads_back_the_filter_sections(tmp_path):
    original = load(
        tmp_path,
        with_filters(
            "dmarc, %s, Attachments, other.Filter" % GREYLIST,
            "[filter:%s]\nZeta = 1\nalpha = two words\nempty =\nlist = a,\n  b,\n    [c]\nodd = %%(x)s;#x\n"
            % GREYLIST + "[filter:other.Filter]\n",
        )
        + SUBMISSION + "filters =\n"
        + "[filters]\ntimeout = 1.5s\n"
        + "[spf]\nreject_fail = yes\ncheck_internal = yes\n"
        + "[dmarc]\nenforce = yes\nquarantine_action = tag\n"
        + "[attachments]\nblocked_extensions = none\nblocked_mime_types = application/*, image/svg+xml\n"
        + "action = quarantine\nmax_archive_depth = 0\nmax_expanded_size = 1000\nmalformed = accept\n",
    )
    text = render_config(original)
    assert "\n[filter:%s]\nzeta = 1\nalpha = two words\nempty =\nlist = a,\n    b,\n    [c]\n" % GREYLIST in text
    assert "\n[filter:other.Filter]\n" in text
    assert "\nfilters = dmarc, %s, attachments, other.Filter\n" % GREYLIST in text
    assert "\nfilters =\n" in text
    assert "\nblocked_extensions = none\n" in text
    other = tmp_path / "other"
    other.mkdir()
    again = load_config(write(other, text))
    assert attr.evolve(again, path=original.path) == original
    assert again.filter_sections[0].options == original.filter_sections[0].options


def test_render_shows_the_default_extensions_and_loads_back(tmp_path):
    original = load(tmp_path, PLAIN)
    text = render_config(original)
    assert "\nblocked_extensions = %s\n" % ", ".join(DEFAULT_BLOCKED_EXTENSIONS) in text
    assert "\n[filters]\ntimeout = 30s\n" in text
    assert "\nfilters = spf, dkim, dmarc, attachments\n" in text
    other = tmp_path / "other"
    other.mkdir()
    assert attr.evolve(load_config(write(other, text)), path=original.path) == original


def test_render_hides_secret_filter_options(tmp_path):
    original = load(
        tmp_path,
        with_filters(
            GREYLIST,
            "[filter:%s]\npassword = p1\napi_token = t1\nclient_secret = s1\ndelay = 5m\n" % GREYLIST,
        ),
    )
    hidden = render_config(original)
    assert not re.search(r"= (p1|t1|s1)$", hidden, re.M)
    assert "\npassword = <hidden>\napi_token = <hidden>\nclient_secret = <hidden>\ndelay = 5m\n" in hidden
    text = render_config(original, show_secrets=True)
    assert "\npassword = p1\napi_token = t1\nclient_secret = s1\ndelay = 5m\n" in text
    other = tmp_path / "other"
    other.mkdir()
    assert attr.evolve(load_config(write(other, text)), path=original.path) == original


def test_config_file_precedence(monkeypatch):
    from mailgate.config import DEFAULT_CONFIG, config_file

    monkeypatch.delenv("MAILGATE_CONFIG", raising=False)
    assert config_file() == DEFAULT_CONFIG == "/etc/mailgate/mailgate.ini"
    monkeypatch.setenv("MAILGATE_CONFIG", "/srv/env.ini")
    assert config_file() == "/srv/env.ini"
    assert config_file("given.ini") == "given.ini"


# --- secrets readable by anyone (issue 9) ---------------------------------------------------------


def test_secret_files_readable_by_others_are_refused(tmp_path):
    """The TLS key, the DKIM key and a users file with users: owner and group only."""
    from mailgate.smtp.auth import hash_password

    users = tmp_path / "users"
    users.write_text("# no users yet: anyone may read this\n")
    users.chmod(0o644)
    text = PLAIN.replace("auth = none", "auth = optional").replace("tls = none", "tls = optional")
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    text += "[auth]\nusers_file = users\n[tls]\ncertificate = c.pem\nprivate_key = k.pem\n"
    load(tmp_path, text)  # no secret in the users file yet; the key is 0640 (the tests' umask)
    users.write_text("alice:%s\n" % hash_password("x"))
    message = "%s can be read or written by anyone (mode %s): allow its owner and group only (chmod o-rwx %s)"
    assert error(tmp_path, text) == "FILE: [auth] users_file: " + message % (users, "0644", users)
    users.chmod(0o640)
    (tmp_path / "k.pem").chmod(0o604)
    key = tmp_path / "k.pem"
    assert error(tmp_path, text) == "FILE: [tls] private_key: " + message % (key, "0604", key)
    key.chmod(0o602)
    assert error(tmp_path, text) == "FILE: [tls] private_key: " + message % (key, "0602", key)
    key.chmod(0o600)
    dkim = tmp_path / "dkim.key"
    dkim.write_text("x")
    dkim.chmod(0o644)
    dkim_text = text + "[dkim]\nsign_domains = example.com\nselector = s1\nprivate_key = dkim.key\n"
    assert error(tmp_path, dkim_text) == "FILE: [dkim] private_key: " + message % (dkim, "0644", dkim)


def test_passwd_takes_away_what_others_could_read(tmp_path):
    from mailgate.smtp.auth import set_user

    users = tmp_path / "users"
    users.write_text("# from a repository checkout\n")
    users.chmod(0o664)
    set_user(str(users), "alice@example.com", "secret")
    assert users.stat().st_mode & 0o777 == 0o660
