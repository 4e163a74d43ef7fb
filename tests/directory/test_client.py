"""
mailgate.directory.client against a real slapd (tests/slapdserver.py): TLS (StartTLS and
ldaps, the certificate verified), searches, password binds, escaping, failover and timeouts.
"""

from twisted.internet import reactor
from twisted.trial import unittest

from mailgate.config import LDAPServer
from mailgate.directory.client import DirectoryClient, DirectoryError, escape, fill
from tests.directory.helpers import Silent, closed_port, ldap_config
from tests.slapdserver import shared_slapd
from tests.tlsutil import make_ca


class TestFilterText(unittest.TestCase):
    def test_escape(self):
        self.assertEqual(escape("a*b(c)d\\e\0"), r"a\2ab\28c\29d\5ce\00")
        self.assertEqual(fill("(|(mail=%s)(x=smtp:%s))", "*)(cn=*"),
                         r"(|(mail=\2a\29\28cn=\2a)(x=smtp:\2a\29\28cn=\2a))")


class TestDirectoryClient(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.slapd = shared_slapd()

    def client(self, **overrides):
        client = DirectoryClient(ldap_config(self.slapd, **overrides), reactor,
                                 bind_password=self.slapd.bind_password)
        self.addCleanup(client.close)
        return client

    async def test_search_over_starttls_finds_a_secondary_proxy_address(self):
        client = self.client()
        entries = await client.search("(proxyAddresses=smtp:A.Smith@CONTOSO.test)",
                                      attributes=("mail",))
        self.assertEqual([e.dn for e in entries], ["cn=alice,ou=people,dc=contoso,dc=test"])
        self.assertEqual(entries[0].values("mail"), ("alice@contoso.test",))
        self.assertEqual(await client.search("(mail=nobody@contoso.test)"), [])

    async def test_search_over_ldaps(self):
        client = self.client(servers=(LDAPServer("ldaps", "127.0.0.1", self.slapd.ldaps_port),))
        entries = await client.search("(sAMAccountName=bob)", attributes=("proxyAddresses",))
        self.assertEqual(entries[0].values("proxyAddresses"),
                         ("SMTP:Bob.Jones@Contoso.test", "smtp:bob@contoso.test"))

    async def test_searches_share_one_connection(self):
        client = self.client()
        import twisted.internet.defer as defer

        results = await defer.gatherResults([
            defer.ensureDeferred(client.search("(sAMAccountName=%s)" % name))
            for name in ("alice", "bob", "joerg", "nobody")])
        self.assertEqual([len(r) for r in results], [1, 1, 1, 0])
        with open(self.slapd.log_path, errors="replace") as f:
            log = f.read()
        self.assertIn("STARTTLS", log)

    async def test_a_wildcard_in_the_value_is_a_literal(self):
        client = self.client()
        self.assertEqual(await client.search(fill("(mail=%s)", "*")), [])
        self.assertEqual(len(await client.search("(mail=*@contoso.test)", size_limit=10)), 3)

    async def test_an_untrusted_certificate_is_a_failure(self):
        other = make_ca(self.mktemp())
        client = self.client(ca_file=other.ca_path)
        with self.assertRaises(DirectoryError) as caught:
            await client.search("(sAMAccountName=alice)")
        self.assertIn("no directory server answered", str(caught.exception))

    async def test_a_wrong_service_password_is_a_failure_not_an_empty_answer(self):
        client = DirectoryClient(ldap_config(self.slapd), reactor, bind_password="wrong")
        self.addCleanup(client.close)
        with self.assertRaises(DirectoryError):
            await client.search("(sAMAccountName=alice)")

    async def test_failover_from_a_dead_and_a_silent_server(self):
        silent = Silent()
        self.addCleanup(silent.close)
        servers = (LDAPServer("ldap", "127.0.0.1", closed_port()),
                   LDAPServer("ldap", "127.0.0.1", silent.port),
                   LDAPServer("ldap", "127.0.0.1", self.slapd.port))
        client = self.client(servers=servers, timeout=1.0)
        start = reactor.seconds()
        entries = await client.search("(sAMAccountName=alice)")
        self.assertEqual(len(entries), 1)
        self.assertLess(reactor.seconds() - start, 4.0)
        # The failed ones are set aside: the next search goes straight to the good one.
        start = reactor.seconds()
        self.assertEqual(len(await client.search("(sAMAccountName=bob)")), 1)
        self.assertLess(reactor.seconds() - start, 0.9)

    async def test_nobody_answering_is_a_directory_error_within_the_timeout(self):
        silent = Silent()
        self.addCleanup(silent.close)
        servers = (LDAPServer("ldap", "127.0.0.1", closed_port()),
                   LDAPServer("ldap", "127.0.0.1", silent.port))
        client = self.client(servers=servers, timeout=0.5)
        start = reactor.seconds()
        with self.assertRaises(DirectoryError) as caught:
            await client.search("(sAMAccountName=alice)")
        self.assertLess(reactor.seconds() - start, 3.0)
        self.assertIn("connection refused", str(caught.exception))
        self.assertIn("no answer within 0.5s", str(caught.exception))

    async def test_wrong_base_dn_is_a_failure(self):
        client = self.client(base_dn="dc=elsewhere,dc=test")
        with self.assertRaises(DirectoryError) as caught:
            await client.search("(sAMAccountName=alice)")
        self.assertIn("result 32", str(caught.exception))

    async def test_password_checks(self):
        client = self.client()
        dn = self.slapd.user_dn("alice")
        self.assertTrue(await client.check_password(dn, "alice-pw"))
        self.assertFalse(await client.check_password(dn, "wrong"))
        # An empty password would be an unauthenticated bind that "succeeds": never sent.
        self.assertFalse(await client.check_password(dn, ""))
        self.assertFalse(await client.check_password(self.slapd.user_dn("nobody"), "x"))

    async def test_password_check_with_the_directory_down(self):
        client = self.client(servers=(LDAPServer("ldap", "127.0.0.1", closed_port()),))
        with self.assertRaises(DirectoryError):
            await client.check_password(self.slapd.user_dn("alice"), "alice-pw")
