"""
Recipient validation at RCPT time (a listener's `recipients = ldap`): is this address a
mailbox, an alias or a group the directory knows?

An address is known when [ldap] recipient_filter finds an entry for it (by default Active
Directory's proxyAddresses, primary "SMTP:" and secondary "smtp:" alike, and mail).  An
internationalised domain is asked for in both forms (A-label and U-label), since directories
store either.  Answers are cached ([ldap] cache_ttl, negative_cache_ttl); a directory that
cannot answer is a DirectoryError, which the listener answers 451 4.4.3: never a rejection (a
sender would bounce mail to a real user) and never an accept (it would be backscatter later).
"""

from twisted.logger import Logger
from zope.interface import implementer

from mailgate.directory.cache import TTLCache
from mailgate.directory.client import fill
from mailgate.envelope import Reply
from mailgate.idn import a_label, u_label
from mailgate.interfaces import IRecipientValidator

log = Logger()


def unknown_reply(address):
    return Reply(550, "5.1.1", "<%s>: Recipient address rejected: User unknown" % (address,))


def unavailable_reply(address):
    return Reply(451, "4.4.3", "<%s>: Recipient address rejected: Directory temporarily "
                               "unavailable, try again later" % (address,))


@implementer(IRecipientValidator)
class RecipientValidator:
    """
    known(address) -> Deferred[bool], through the cache; DirectoryError when unsure.  check() is
    the listener's IRecipientValidator: None, or the 550 5.1.1 refusal.
    """

    def __init__(self, client, config, clock):
        self.client = client
        self.template = config.recipient_filter
        self.cache = TTLCache(clock, config.cache_ttl, config.negative_cache_ttl,
                              config.cache_size)

    def known(self, address):
        return self.cache.get(_key(address), self._ask)

    def _ask(self, key):
        local, _, domain = key.rpartition("@")
        forms = {"%s@%s" % (local, a_label(domain)), "%s@%s" % (local, u_label(domain))}
        filters = [fill(self.template, form) for form in sorted(forms)]
        text = filters[0] if len(filters) == 1 else "(|%s)" % "".join(filters)
        d = self.client.search(text, attributes=("1.1",), size_limit=1)
        return d.addCallback(lambda entries: bool(entries))

    def check(self, address):
        d = self.known(str(address))
        return d.addCallback(lambda known: None if known else unknown_reply(address))


def _key(address):
    """Directories match addresses without regard to case: so does the cache."""
    local, _, domain = str(address).rpartition("@")
    return "%s@%s" % (local.lower(), a_label(domain))
