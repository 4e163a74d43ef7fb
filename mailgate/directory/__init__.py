"""
The directory ([ldap]): recipient validation at RCPT time and SMTP AUTH against Active Directory
or any LDAP server.

    client.py      the LDAP client: TLS always, failover across [ldap] uri, timeouts
    cache.py       answers remembered (found / not found), bounded
    recipients.py  RecipientValidator: is an address known?  (a listener's recipients = ldap)
    auth.py        LDAPAuth (an IAuthBackend) and Chain (several backends in order)

Directory(config, reactor, resolver) builds the client once for a configuration; the listeners'
validator and the AUTH backend share it (one connection for searches).
"""

from mailgate.directory.auth import Chain, DirectoryUser, LDAPAuth
from mailgate.directory.client import DirectoryClient, DirectoryError
from mailgate.directory.recipients import RecipientValidator
from mailgate.errors import ConfigError

__all__ = ["Directory", "DirectoryClient", "DirectoryError", "RecipientValidator", "LDAPAuth",
           "Chain", "DirectoryUser", "read_bind_password"]


def read_bind_password(config):
    """The service account's password from [ldap] bind_password_file (ConfigError if unusable)."""
    ldap = config.ldap
    if ldap.bind_password_file is None:
        return None
    try:
        with open(ldap.bind_password_file, encoding="utf-8-sig") as f:
            password = f.readline(4097).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(config.path, "ldap", "bind_password_file",
                          "cannot read %s: %s" % (ldap.bind_password_file,
                                                  getattr(e, "strerror", None) or e))
    if not password:
        raise ConfigError(config.path, "ldap", "bind_password_file",
                          "empty first line, expected the password: %s" % ldap.bind_password_file)
    return password


class Directory:
    """The directory of a configuration: its client, recipient validator and AUTH backend."""

    def __init__(self, config, reactor, resolver=None, tls_for=None):
        self.config = config.ldap
        self.client = DirectoryClient(config.ldap, reactor, resolver, read_bind_password(config),
                                      tls_for=tls_for)
        self.recipients = RecipientValidator(self.client, config.ldap, reactor)
        self.auth = LDAPAuth(self.client, config.ldap, reactor)

    def close(self):
        self.client.close()
