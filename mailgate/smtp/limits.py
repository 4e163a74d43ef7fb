"""
The limits across sessions as one session applies them: the checks and replies at connect, MAIL,
RCPT, AUTH and DATA, over the gateway's counters (mailgate.smtp.anvil).

A Guard is made for each connection before anything else is done for it.  It decides once, at
connect, what applies to this client (an exempt client, a limit turned off), so that a limit that
is off costs the protocol one attribute check: the server asks `guard.at_mail`, `guard.at_rcpt`,
`guard.at_auth` or `guard.min_data_rate` before calling in.  A refusal is (limit name, Reply);
the protocol answers it and reports it as a REJECT tracking event naming the limit, which
mailgate.ops.metrics counts in mailgate_limit_refusals_total{limit}.

The replies (mailgate.smtp.replies, as Postfix words them where it has them):
  connections  421 4.7.0 <hostname> Too many connections, then close
  conn. rate   421 4.7.0 <hostname> Too many connections from <ip>, try again later, then close
  MAIL rate    450 4.7.1 Too much mail from <who>, try again later
  RCPT rate    450 4.7.1 Too many recipients from <who>, try again later
  AUTH         454 4.7.0 Too many failed authentications, try later
  early talker 554 5.5.0 Protocol error, then close
  hops         554 5.4.6 Too many hops (mail loop)
  DATA rate    421 4.4.2 <hostname> Error: data rate below the minimum, then close
"""

from mailgate.config import RELAY_IPS
from mailgate.smtp import policy, replies

DATA_RATE_INTERVAL = 10.0  # seconds between checks of min_data_rate during DATA


def is_exempt(listener, ip):
    """Is ip in the listener's limit_exempt_ips (where relay_ips stands for its relay_ips)?"""
    networks = []
    for item in listener.limits.limit_exempt_ips:
        if item == RELAY_IPS:
            networks.extend(listener.relay_ips)
        else:
            networks.append(item)
    return bool(networks) and policy.ip_in(networks, ip)


def too_many_received(message, limit):
    """Does message (bytes, CRLF) carry more than limit Received: header fields?"""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    if len(head) < 10 * limit:  # each field is longer than "Received:\r\n"
        return False
    head = b"\n" + head.lower()
    return head.count(b"\nreceived:") > limit


class Guard:
    """One session's limits across sessions.  ip: the client's address; anvil: the counters."""

    def __init__(self, anvil, listener, hostname, ip):
        limits = self.limits = listener.limits
        self.anvil = anvil
        self.hostname = hostname
        self.ip = ip
        self.exempt = is_exempt(listener, ip)
        self.counted = False
        checked = not self.exempt
        self.greet_delay = limits.greet_delay if checked else 0.0
        self.at_mail = checked and (limits.message_rate_per_ip is not None
                                    or limits.message_rate_per_user is not None)
        self.at_rcpt = checked and (limits.recipient_rate_per_ip is not None
                                    or limits.recipient_rate_per_user is not None)
        self.at_auth = checked and bool(limits.max_auth_failures_per_ip
                                        or limits.max_auth_failures_per_user)
        self.min_data_rate = limits.min_data_rate
        self.max_received_headers = limits.max_received_headers

    # -- connect ---------------------------------------------------------------------------------

    def connect(self):
        """None when the connection may go on (it is then counted), else (limit, reply)."""
        limit = self.anvil.connect(self.ip, self.limits, self.exempt)
        if limit is None:
            self.counted = True
            return None
        if limit == "connection_rate_per_ip":
            return limit, replies.connection_rate(self.hostname, self.ip)
        return limit, replies.too_many_connections(self.hostname)

    def disconnect(self):
        if self.counted:
            self.counted = False
            self.anvil.disconnect(self.ip)

    # -- MAIL and RCPT -------------------------------------------------------------------------

    def _per_ip(self, user):
        return user is None or not self.limits.limit_exempt_authenticated

    def mail(self, user):
        """One message from this client (user: the authenticated name or None)."""
        return self._rates("message", user, replies.message_rate)

    def rcpt(self, user):
        """One recipient from this client, accepted or not."""
        return self._rates("recipient", user, replies.recipient_rate)

    def _rates(self, what, user, reply):
        """Spend one of what's (message, recipient) tokens per address and per user."""
        for name, who in (("%s_rate_per_ip" % what, self.ip if self._per_ip(user) else None),
                          ("%s_rate_per_user" % what, user)):
            if who is not None and not self.anvil.take(name, who, getattr(self.limits, name)):
                return name, reply(who)
        return None

    # -- AUTH ----------------------------------------------------------------------------------

    def auth_blocked(self, username=None):
        """(limit, 454) when this address (or username, when given) failed too often."""
        limit = self.anvil.auth_blocked(self.ip, username, self.limits)
        return None if limit is None else (limit, replies.AUTH_BLOCKED)

    def auth_failed(self, username):
        if self.at_auth:
            self.anvil.auth_failed(self.ip, username, self.limits)

    # -- DATA ----------------------------------------------------------------------------------

    def hops(self, message):
        """(limit, 554 5.4.6) for a message with too many Received: headers, else None."""
        if too_many_received(message, self.max_received_headers):
            return "max_received_headers", replies.TOO_MANY_HOPS
        return None

    def data_rate(self, received, elapsed):
        """(limit, 421 4.4.2) when received bytes in elapsed seconds are below min_data_rate."""
        if elapsed > 0 and received < self.min_data_rate * elapsed:
            return "min_data_rate", replies.data_too_slow(self.hostname)
        return None
