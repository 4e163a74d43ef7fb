"""
SMTP AUTH against the real slapd: by userPrincipalName, sAMAccountName and mail, wrong
password, sender addresses from the directory, the users file's grants on top, and a directory
that is down.
"""

import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailgate.config import LDAPServer
from mailgate.directory import Chain, DirectoryClient, DirectoryError, LDAPAuth
from mailgate.interfaces import IAuthBackend, IUser
from mailgate.smtp.auth import UsersFile, set_user
from tests.directory.helpers import closed_port, ldap_config
from tests.slapdserver import shared_slapd
from tests.syncrun import Runner


class TestLDAPAuth(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.slapd = shared_slapd()
        self.clock = Clock()

    def backend(self, **overrides):
        config = ldap_config(self.slapd, **overrides)
        client = DirectoryClient(config, reactor, bind_password=self.slapd.bind_password)
        self.addCleanup(client.close)
        return LDAPAuth(client, config, self.clock)

    async def test_by_upn_sam_and_mail(self):
        auth = self.backend()
        verifyObject(IAuthBackend, auth)
        for name in ("alice@corp.contoso.test", "alice", "ALICE", "alice@contoso.test"):
            user = await auth.authenticate(name, "alice-pw")
            self.assertIsNotNone(user, name)
            verifyObject(IUser, user)
            self.assertEqual(user.name, name)
            self.assertEqual(user.dn, self.slapd.user_dn("alice"))

    async def test_wrong_password_and_unknown_user(self):
        auth = self.backend()
        self.assertIsNone(await auth.authenticate("alice", "bob-pw"))
        self.assertIsNone(await auth.authenticate("alice", ""))
        self.assertIsNone(await auth.authenticate("nobody", "alice-pw"))
        self.assertIsNone(await auth.authenticate("*", "alice-pw"))

    async def test_senders_come_from_mail_and_smtp_proxy_addresses(self):
        auth = self.backend()
        alice = await auth.authenticate("alice", "alice-pw")
        for address in ("alice@contoso.test", "A.Smith@contoso.test", "alice@contoso-alias.test"):
            self.assertTrue(alice.may_send_as(address), address)
        for address in ("bob@contoso.test", "/o=Contoso/cn=alice", "", "alice@other.test"):
            self.assertFalse(alice.may_send_as(address), address)
        joerg = await auth.authenticate("joerg", "joerg-pw")
        self.assertTrue(joerg.may_send_as("jörg@contoso.test"))
        scanner = await auth.authenticate("svc-scanner", "scanner-pw")
        self.assertFalse(scanner.may_send_as("scanner@corp.contoso.test"))

    async def test_the_entry_is_cached_the_password_never(self):
        auth = self.backend()
        self.assertIsNotNone(await auth.authenticate("bob", "bob-pw"))
        self.assertIsNone(await auth.authenticate("bob", "wrong"))
        self.assertEqual((auth.cache.misses, auth.cache.hits), (1, 1))

    async def test_directory_down(self):
        auth = self.backend(servers=(LDAPServer("ldap", "127.0.0.1", closed_port()),))
        with self.assertRaises(DirectoryError):
            await auth.authenticate("alice", "alice-pw")


class TestChain(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.slapd = shared_slapd()
        path = os.path.join(self.mktemp())
        os.makedirs(path)
        self.users = os.path.join(path, "users")
        set_user(self.users, "alice", "file-pw", ["@partner.test", "shared@contoso.test"])
        set_user(self.users, "local-only", "local-pw")
        self.file = UsersFile(self.users, reactor, run_in_thread=Runner())

    def ldap(self, **overrides):
        config = ldap_config(self.slapd, **overrides)
        client = DirectoryClient(config, reactor, bind_password=self.slapd.bind_password)
        self.addCleanup(client.close)
        return LDAPAuth(client, config, Clock())

    async def test_ldap_user_gets_the_files_grants(self):
        chain = Chain([self.ldap(), self.file], grants=self.file)
        alice = await chain.authenticate("alice", "alice-pw")
        self.assertTrue(alice.may_send_as("alice@contoso.test"))
        self.assertTrue(alice.may_send_as("anyone@partner.test"))
        self.assertTrue(alice.may_send_as("shared@contoso.test"))
        self.assertFalse(alice.may_send_as("bob@contoso.test"))
        # The file's own password works too (the file is asked after the directory said no).
        self.assertIsNotNone(await chain.authenticate("alice", "file-pw"))
        self.assertIsNotNone(await chain.authenticate("local-only", "local-pw"))
        self.assertIsNone(await chain.authenticate("alice", "wrong"))

    async def test_directory_down_falls_back_to_the_file_then_fails_temporarily(self):
        chain = Chain([self.ldap(servers=(LDAPServer("ldap", "127.0.0.1", closed_port()),)),
                       self.file], grants=self.file)
        self.assertIsNotNone(await chain.authenticate("local-only", "local-pw"))
        with self.assertRaises(DirectoryError):
            await chain.authenticate("bob", "bob-pw")  # not in the file: unsure, not wrong

    async def test_grants_found_under_the_sam_account_name_whatever_the_login(self):
        chain = Chain([self.ldap(), self.file], grants=self.file)
        alice = await chain.authenticate("alice@corp.contoso.test", "alice-pw")
        self.assertEqual(alice.names, ("alice@corp.contoso.test", "alice"))
        self.assertTrue(alice.may_send_as("anyone@partner.test"))


class TestChainOrder(unittest.TestCase):
    def test_first_backend_that_knows_the_user_wins(self):
        calls = []

        class Backend:
            def __init__(self, name, user):
                self.name, self.user = name, user

            def authenticate(self, username, password):
                calls.append(self.name)
                return defer.succeed(self.user)

        chain = Chain([Backend("a", None), Backend("b", "B"), Backend("c", "C")])
        out = []
        chain.authenticate("u", "p").addCallback(out.append)
        self.assertEqual((out, calls), (["B"], ["a", "b"]))
