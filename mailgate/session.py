"""
One SMTP session as filters see it (public API for third-party filters).

The listener owns the session; filters read its facts and may keep per-transaction results in
transaction (a dict cleared on RSET and after each message), e.g. the SPF result that DMARC
needs at end of data.
"""

from mailgate.smtp import policy


class Session:
    def __init__(self, server, session_id):
        self._server = server
        self.id = session_id
        self.transaction = {}

    @property
    def client_ip(self):
        return self._server.client_ip

    @property
    def client_port(self):
        return self._server.client_port

    @property
    def helo(self):
        return self._server.helo

    @property
    def tls(self):
        return self._server.tls

    @property
    def tls_version(self):
        return self._server.tls_info()[0]

    @property
    def tls_cipher(self):
        return self._server.tls_info()[1]

    @property
    def user(self):
        user = self._server.user
        return user.name if user is not None else None

    @property
    def listener(self):
        return self._server.listener.name

    @property
    def listener_config(self):
        return self._server.listener

    @property
    def relay_allowed(self):
        """
        Authenticated, a client certificate of relay_client_certs, or a client in relay_ips (e.g.
        the internal Exchange servers).
        """
        return policy.may_relay(self._server.listener, self.client_ip, self._server.trusted())

    @property
    def sender(self):
        return self._server.sender

    @property
    def recipients(self):
        return tuple(self._server.recipients)

    def __repr__(self):
        return "<Session %s %s on %s>" % (self.id, self.client_ip, self.listener)
