"""
Internationalised domain names (RFC 5890, UTS 46): the one place that turns a domain into the
form every comparison uses, its A-label form ("bücher.example" -> "xn--bcher-kva.example").

accepted_domains and route domains are kept as A-labels by the configuration; an address that
arrives with a U-label domain (SMTPUTF8, RFC 6531) is compared through a_label() here, so
"jörg@bücher.example" is ours exactly when "xn--bcher-kva.example" is accepted.  Pure functions,
no state.
"""

import idna


def a_label(domain):
    """
    The lower-case A-label form of domain; an ASCII domain (or an address literal) is only
    lower-cased, and a name that IDNA refuses is returned lower-cased as it is (it then matches
    nothing configured, which is the safe answer).
    """
    domain = domain.lower()
    if domain.isascii() or domain.startswith("["):
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain


def u_label(domain):
    """The Unicode form of an A-label domain (for display and for directories that store it)."""
    domain = domain.lower()
    if "xn--" not in domain:
        return domain
    try:
        return idna.decode(domain)
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain


def is_valid(domain):
    """Whether a non-ASCII domain is a valid IDNA name (ASCII ones are checked elsewhere)."""
    try:
        idna.encode(domain, uts46=True)
    except (idna.IDNAError, UnicodeError, ValueError):
        return False
    return True


def ascii_address(address):
    """
    address (str, "local@domain") with its domain as an A-label, or None when the local part is
    not ASCII (such an address can only travel with SMTPUTF8).
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return address if address.isascii() else None
    if not local.isascii():
        return None
    return "%s@%s" % (local, a_label(domain))


def canonical_address(address):
    """The form two addresses are compared in: the domain as an A-label, all lower case."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return "%s@%s" % (local.lower(), a_label(domain))
