"""
Who may connect, send as whom, and relay to where: pure functions over the configuration.

The relay decision is the one that makes a gateway an open relay or not, so it is deliberately
narrow: unless the client may relay, a recipient is accepted only for an exact accepted domain, and
a local part carrying a routing trick ('%', '!', '@') is refused even there, since a downstream
MTA might act on it.
"""

import ipaddress

from mailgate.envelope import Reply
from mailgate.idn import a_label

_ROUTING_CHARACTERS = ("%", "!", "@")


def ip_in(networks, ip):
    """
    True when the address ip (str) is in one of networks (ipaddress networks).  An IPv4-mapped
    IPv6 address is the IPv4 address it carries (a dual-stack socket reports IPv4 clients that
    way), and a network inside ::ffff:0:0/96 is the IPv4 network it carries, so the answer does not
    depend on the socket family.  Anything that is not an address is in nothing.
    """
    try:
        address = _canonical(ipaddress.ip_address(ip))
    except (ValueError, TypeError):
        return False
    return any(
        address.version == network.version and address in network
        for network in map(_canonical_network, networks)
    )


def _canonical(address):
    """An IPv4-mapped IPv6 address as the IPv4 address; any other address unchanged."""
    mapped = address.ipv4_mapped if address.version == 6 else None
    return address if mapped is None else mapped


def _canonical_network(network):
    """A network inside ::ffff:0:0/96 as the IPv4 network; any other network unchanged."""
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def client_allowed(listener, ip):
    """May this client connect to listener at all?  An empty allowed_ips means everyone."""
    return not listener.allowed_ips or ip_in(listener.allowed_ips, ip)


def may_relay(listener, ip, authenticated):
    """May this client send to any domain?  Only when authenticated or listed in relay_ips."""
    return bool(authenticated) or ip_in(listener.relay_ips, ip)


def sender_reply(user, address):
    """
    None when the MAIL FROM address is acceptable, else the refusal.  An unauthenticated session
    is not checked here (there is no user to check it against); an authenticated one may only use
    the addresses its user owns, so a stolen password cannot impersonate anyone else.
    """
    if user is None or user.may_send_as(str(address)):
        return None
    return Reply(
        553, "5.7.1", "Sender address rejected: <%s> not owned by user %s" % (address, user.name)
    )


def recipient_reply(listener, gateway, ip, authenticated, address):
    """None when we take mail for address from this client, else the relay refusal."""
    if may_relay(listener, ip, authenticated) or is_local(gateway, address):
        return None
    return Reply(554, "5.7.1", "<%s>: Relay access denied" % (address,))


def is_local(gateway, address):
    """
    Is address ours to receive?  Exactly an accepted domain (no subdomains; an address literal is
    never ours; an internationalised domain compared in its A-label form) with no routing
    characters in the local part, or the bare <postmaster>.
    """
    domain = a_label(address.domain)
    if not domain:
        return address.local.lower() == "postmaster"
    if domain.startswith("[") or domain not in {d.lower() for d in gateway.accepted_domains}:
        return False
    return not any(char in address.local for char in _ROUTING_CHARACTERS)


def banner_reply(hostname):
    """The 220 greeting."""
    return Reply(220, "", "%s ESMTP" % (hostname,))


def denied_banner_reply(hostname):
    """The greeting for a client not in allowed_ips (RFC 5321 3.1: 554 instead of 220)."""
    return Reply(554, "5.7.1", "%s Access denied" % (hostname,))
