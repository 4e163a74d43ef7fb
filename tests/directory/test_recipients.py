"""
Recipient validation against the real slapd: known, unknown, aliases in proxyAddresses, case,
an internationalised local part, the cache (found and not found) and a directory that is down.
"""

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailgate.config import LDAPServer
from mailgate.directory import DirectoryClient, DirectoryError, RecipientValidator
from mailgate.directory.recipients import unavailable_reply, unknown_reply
from tests.directory.helpers import closed_port, ldap_config
from tests.slapdserver import add_user, shared_slapd


class TestRecipients(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.slapd = shared_slapd()
        self.clock = Clock()

    def validator(self, **overrides):
        config = ldap_config(self.slapd, **overrides)
        client = DirectoryClient(config, reactor, bind_password=self.slapd.bind_password)
        self.addCleanup(client.close)
        return RecipientValidator(client, config, self.clock)

    async def test_known_unknown_alias_case(self):
        v = self.validator()
        self.assertTrue(await v.known("alice@contoso.test"))  # mail, and SMTP: primary
        self.assertTrue(await v.known("a.smith@contoso.test"))  # smtp: alias
        self.assertTrue(await v.known("alice@contoso-alias.test"))  # alias in another domain
        self.assertTrue(await v.known("Bob.Jones@CONTOSO.TEST"))  # case does not matter
        self.assertTrue(await v.known("bob.jones@contoso.test"))
        self.assertFalse(await v.known("nobody@contoso.test"))
        self.assertFalse(await v.known("alice@elsewhere.test"))
        # X500: and other proxyAddresses types are not mail addresses.
        self.assertFalse(await v.known("/o=Contoso/cn=alice"))

    async def test_an_internationalised_local_part(self):
        v = self.validator()
        self.assertTrue(await v.known("jörg@contoso.test"))
        self.assertTrue(await v.known("JÖRG@contoso.test"))

    async def test_a_filter_metacharacter_finds_nothing(self):
        v = self.validator()
        self.assertFalse(await v.known("*@contoso.test"))
        self.assertFalse(await v.known("alice)(mail=*@contoso.test"))

    def test_replies(self):
        self.assertEqual(str(unknown_reply("x@contoso.test")),
                         "550 5.1.1 <x@contoso.test>: Recipient address rejected: User unknown")
        self.assertTrue(str(unavailable_reply("x@contoso.test")).startswith("451 4.4.3 "))

    async def test_cache_positive_and_negative(self):
        v = self.validator(cache_ttl=300.0, negative_cache_ttl=60.0)
        self.assertFalse(await v.known("new.user@contoso.test"))
        add_user(self.slapd, "newuser", "pw", mail="new.user@contoso.test")
        self.assertFalse(await v.known("new.user@contoso.test"))  # still remembered as unknown
        self.assertEqual((v.cache.hits, v.cache.misses), (1, 1))
        self.clock.advance(61)
        self.assertTrue(await v.known("New.User@contoso.test"))  # asked again, and found
        self.slapd.delete(self.slapd.user_dn("newuser"))
        self.clock.advance(299)
        self.assertTrue(await v.known("new.user@contoso.test"))  # found, remembered for 5m
        self.clock.advance(2)
        self.assertFalse(await v.known("new.user@contoso.test"))

    async def test_cache_is_bounded(self):
        v = self.validator(cache_size=2)
        for address in ("a@contoso.test", "b@contoso.test", "alice@contoso.test"):
            await v.known(address)
        self.assertEqual(len(v.cache), 2)

    async def test_directory_down_is_an_error_never_an_answer(self):
        v = self.validator(servers=(LDAPServer("ldap", "127.0.0.1", closed_port()),))
        with self.assertRaises(DirectoryError):
            await v.known("alice@contoso.test")
        with self.assertRaises(DirectoryError):  # failures are not cached as "unknown"
            await v.known("alice@contoso.test")
        self.assertEqual(len(v.cache), 0)
