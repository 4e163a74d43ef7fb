"""What the directory tests share: the [ldap] configuration for the test slapd, dead servers."""

import socket

from mailgate.config import LDAPConfig, LDAPServer
from tests.slapdserver import shared_slapd


def ldap_config(slapd=None, servers=None, **overrides):
    """An LDAPConfig for the shared slapd (StartTLS on its ldap:// port) unless servers given."""
    slapd = slapd or shared_slapd()
    if servers is None:
        servers = (LDAPServer("ldap", "127.0.0.1", slapd.port),)
    values = dict(servers=tuple(servers), bind_dn=slapd.bind_dn, base_dn=slapd.base_dn,
                  ca_file=slapd.ca_path, timeout=5.0)
    values.update(overrides)
    return LDAPConfig(**values)


def closed_port():
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Silent:
    """A loopback port that takes connections (the kernel's backlog) and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()
