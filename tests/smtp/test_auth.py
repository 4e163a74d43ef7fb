"""Tests for mailgate.smtp.auth: password hashes, the users file format, set_user and UsersFile."""

import os
import stat

from twisted.internet.defer import succeed
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailgate.smtp import auth
from mailgate.interfaces import IAuthBackend, IUser

# One real hash, computed once: scrypt is deliberately slow.
SECRET = "correct horse"
SECRET_HASH = auth.hash_password(SECRET)


def run_now(f, *args):
    """A synchronous run_in_thread, so tests need neither threads nor a reactor."""
    return succeed(f(*args))


class FakeReactor:
    """UsersFile must not need a reactor when given run_in_thread."""


class PasswordTests(SynchronousTestCase):
    def test_round_trip(self):
        self.assertTrue(SECRET_HASH.startswith("scrypt$16384$8$1$"))
        self.assertTrue(auth.verify_password(SECRET, SECRET_HASH))
        self.assertTrue(auth.verify_password(SECRET.encode(), SECRET_HASH))

    def test_wrong_password(self):
        self.assertFalse(auth.verify_password("correct horsE", SECRET_HASH))
        self.assertFalse(auth.verify_password("", SECRET_HASH))

    def test_salted(self):
        self.assertNotEqual(auth.hash_password("x"), auth.hash_password("x"))

    def test_malformed_hash_is_false(self):
        scheme, n, r, p, salt, key = SECRET_HASH.split("$")
        for bad in [
            None, "", "plain", "scrypt$", SECRET_HASH + "$x",
            "bcrypt$%s$%s$%s$%s$%s" % (n, r, p, salt, key),
            "scrypt$x$%s$%s$%s$%s" % (r, p, salt, key),
            "scrypt$1000$%s$%s$%s$%s" % (r, p, salt, key),  # n not a power of two
            "scrypt$%d$%s$%s$%s$%s" % (2**40, r, p, salt, key),  # would need terabytes
            "scrypt$%s$%s$%s$!!!$%s" % (n, r, p, key),
            "scrypt$%s$%s$%s$%s$%s" % (n, r, p, salt, key[:-4]),
        ]:
            self.assertFalse(auth.verify_password(SECRET, bad), bad)

    def test_unencodable_password_is_false(self):
        self.assertFalse(auth.verify_password("\ud800", SECRET_HASH))


class ParseTests(SynchronousTestCase):
    def test_parse(self):
        text = (
            "# users\n"
            "\n"
            "alice@example.com:%s\n"
            "  # indented comment\n"
            "relay:%s:@example.com, bob@example.org\n"
            "carol:%s:\n" % (SECRET_HASH, SECRET_HASH, SECRET_HASH)
        )
        self.assertEqual(
            auth.parse_users(text),
            {
                "alice@example.com": (SECRET_HASH, ()),
                "relay": (SECRET_HASH, ("@example.com", "bob@example.org")),
                "carol": (SECRET_HASH, ()),
            },
        )

    def assertParseError(self, text, expected):
        e = self.assertRaises(ValueError, auth.parse_users, text, source="/etc/users")
        self.assertIn(expected, str(e))

    def test_errors_name_the_line(self):
        h = SECRET_HASH
        self.assertParseError("# c\n\nnohash\n", "/etc/users, line 3:")
        self.assertParseError("a:%s\nb:plain\n" % (h,), "/etc/users, line 2: user 'b'")
        self.assertParseError("a:%s\na:%s\n" % (h, h), "line 2: user 'a' is listed twice")
        self.assertParseError("a:%s:not-an-address\n" % (h,), "line 1: user 'a': sender 'not-an-address'")
        self.assertParseError("a:%s:x@y,,z@y\n" % (h,), "line 1: user 'a': empty sender")
        self.assertParseError(":%s\n" % (h,), "line 1: empty username")
        self.assertParseError("a\x01b:%s\n" % (h,), "line 1: username")

    def test_error_is_one_line(self):
        e = self.assertRaises(ValueError, auth.parse_users, "x\ny\n")
        self.assertEqual(str(e).count("\n"), 0)
        self.assertTrue(str(e).startswith("users file, line 1: "))


class SetUserTests(SynchronousTestCase):
    def setUp(self):
        os.mkdir(self.mktemp())
        self.path = os.path.join(os.path.dirname(self.mktemp()), "users")

    def read(self):
        with open(self.path) as f:
            return f.read()

    def test_creates_file_0600(self):
        auth.set_user(self.path, "alice@example.com", "pw")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        users = auth.parse_users(self.read())
        hashed, senders = users["alice@example.com"]
        self.assertTrue(auth.verify_password("pw", hashed))
        self.assertEqual(senders, ())

    def test_add_and_replace_keep_comments(self):
        with open(self.path, "w") as f:
            f.write("# the users\n\nbob:%s:@example.org\n# trailing comment" % (SECRET_HASH,))
        os.chmod(self.path, 0o640)
        auth.set_user(self.path, "alice", "one", ["alice@example.com", "@example.net"])
        auth.set_user(self.path, "alice", "two", ["alice@example.com"])
        lines = self.read().splitlines()
        self.assertEqual(lines[:4], ["# the users", "", "bob:%s:@example.org" % (SECRET_HASH,), "# trailing comment"])
        self.assertEqual(len(lines), 5)
        users = auth.parse_users(self.read())
        self.assertEqual(users["bob"], (SECRET_HASH, ("@example.org",)))
        hashed, senders = users["alice"]
        self.assertTrue(auth.verify_password("two", hashed))
        self.assertEqual(senders, ("alice@example.com",))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        # replacing bob keeps him in place
        auth.set_user(self.path, "bob", "three")
        lines = self.read().splitlines()
        self.assertTrue(lines[2].startswith("bob:scrypt$"))
        self.assertEqual(lines[2].count(":"), 1)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["users"])  # no temporary left

    def test_rejects_bad_input(self):
        for username, password, senders in [
            ("", "pw", ()),
            ("a:b", "pw", ()),
            ("a b", "pw", ()),
            ("a\nb", "pw", ()),
            ("#a", "pw", ()),
            ("alice", "", ()),
            ("alice", "pw", ["not an address"]),
            ("alice", "pw", ["a@b,c@d"]),
            ("alice", "pw", ["a@"]),
        ]:
            e = self.assertRaises(ValueError, auth.set_user, self.path, username, password, senders)
            self.assertNotIn("\n", str(e))
        self.assertFalse(os.path.exists(self.path))


class UserTests(SynchronousTestCase):
    def test_interface(self):
        verifyObject(IUser, auth.User("a", ()))

    def test_may_send_as(self):
        user = auth.User("relay", ("Alice@Example.com", "@Example.ORG"))
        self.assertTrue(user.may_send_as("alice@example.com"))
        self.assertTrue(user.may_send_as("ALICE@EXAMPLE.COM"))
        self.assertTrue(user.may_send_as("anyone@example.org"))
        self.assertFalse(user.may_send_as("anyone@sub.example.org"))
        self.assertFalse(user.may_send_as("anyone@evilexample.org"))
        self.assertFalse(user.may_send_as("@example.org"))
        self.assertFalse(user.may_send_as("bob@example.com"))
        self.assertFalse(user.may_send_as("xalice@example.com"))
        self.assertFalse(user.may_send_as(""))

    def test_no_senders(self):
        self.assertFalse(auth.User("relay", ()).may_send_as(""))
        self.assertFalse(auth.User("relay", ()).may_send_as("relay@example.com"))


class UsersFileTests(SynchronousTestCase):
    def setUp(self):
        os.mkdir(self.mktemp())
        self.path = os.path.join(os.path.dirname(self.mktemp()), "users")
        self.backend = auth.UsersFile(self.path, FakeReactor(), run_in_thread=self.run_in_thread)
        self.calls = []
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def run_in_thread(self, f, *args):
        self.calls.append(f)
        return run_now(f, *args)

    def write(self, text):
        """Write the file so that its stamp surely changes (new inode, new size or mtime)."""
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    def authenticate(self, username, password):
        return self.successResultOf(self.backend.authenticate(username, password))

    def errors(self):
        return [e for e in self.events if e.get("log_level") == LogLevel.error and e.get("log_namespace") == "mailgate.smtp.auth"]

    def test_interface(self):
        verifyObject(IAuthBackend, self.backend)

    def test_authenticate(self):
        self.write("alice@example.com:%s\nrelay:%s:@example.org\n" % (SECRET_HASH, SECRET_HASH))
        user = self.authenticate("alice@example.com", SECRET)
        self.assertEqual(user, auth.User("alice@example.com", ("alice@example.com",)))
        self.assertTrue(user.may_send_as("Alice@example.com"))
        self.assertEqual(self.authenticate("relay", SECRET).senders, ("@example.org",))
        self.assertIsNone(self.authenticate("relay", "wrong"))
        self.assertTrue(self.calls)  # everything went through run_in_thread

    def test_unknown_user_costs_a_hash(self):
        self.write("alice:%s\n" % (SECRET_HASH,))
        verified = []
        real = auth.verify_password
        self.patch(auth, "verify_password", lambda p, h: verified.append(h) or real(p, h))
        self.assertIsNone(self.authenticate("mallory", SECRET))
        self.assertEqual(verified, [auth._DUMMY_HASH])

    def test_rereads_after_change(self):
        self.write("alice:%s\n" % (SECRET_HASH,))
        self.assertIsNotNone(self.authenticate("alice", SECRET))
        self.assertIsNone(self.authenticate("bob", SECRET))
        self.write("# now bob\nbob:%s\n" % (SECRET_HASH,))
        self.assertIsNotNone(self.authenticate("bob", SECRET))
        self.assertIsNone(self.authenticate("alice", SECRET))

    def test_set_user_is_seen(self):
        auth.set_user(self.path, "alice", "one")
        self.assertIsNotNone(self.authenticate("alice", "one"))
        auth.set_user(self.path, "alice", "two")
        self.assertIsNone(self.authenticate("alice", "one"))
        self.assertIsNotNone(self.authenticate("alice", "two"))

    def test_keeps_last_good_copy(self):
        self.write("alice:%s\n" % (SECRET_HASH,))
        self.assertIsNotNone(self.authenticate("alice", SECRET))
        self.write("alice:%s\nthis line is wrong\n" % (SECRET_HASH,))
        self.assertIsNotNone(self.authenticate("alice", SECRET))
        self.assertIsNotNone(self.authenticate("alice", SECRET))
        [error] = self.errors()  # logged once, not on every attempt
        self.assertIn("line 2", error["error"])
        self.assertTrue(error["keeping_last_good"])
        os.unlink(self.path)
        self.assertIsNotNone(self.authenticate("alice", SECRET))
        self.assertEqual(len(self.errors()), 2)
        self.write("bob:%s\n" % (SECRET_HASH,))
        self.assertIsNone(self.authenticate("alice", SECRET))
        self.assertIsNotNone(self.authenticate("bob", SECRET))

    def test_users_readable_by_anyone_are_not_used(self):
        """A chmod o+r on a file with password hashes: refused, the last good copy kept."""
        self.write("alice:%s\n" % (SECRET_HASH,))
        self.assertIsNotNone(self.authenticate("alice", SECRET))
        os.chmod(self.path, 0o644)
        self.write("alice:%s\nbob:%s\n" % (SECRET_HASH, SECRET_HASH))
        os.chmod(self.path, 0o644)
        self.assertIsNone(self.authenticate("bob", SECRET))
        [error] = self.errors()
        self.assertIn("can be read or written by anyone (mode 0644)", error["error"])
        os.chmod(self.path, 0o640)  # noticed: a chmod changes the file's ctime
        self.assertIsNotNone(self.authenticate("bob", SECRET))

    def test_never_good(self):
        self.assertIsNone(self.authenticate("alice", SECRET))  # missing
        self.write("alice:plain\n")
        self.assertIsNone(self.authenticate("alice", SECRET))
        self.assertEqual(len(self.errors()), 2)
        self.assertFalse(self.errors()[-1]["keeping_last_good"])

    def test_default_runner_uses_threadpool(self):
        """Without run_in_thread, work goes to deferToThreadPool on the given reactor's pool."""
        calls = []

        class Reactor:
            def getThreadPool(self):
                return "pool"

        self.patch(auth, "deferToThreadPool", lambda r, p, f, *a: calls.append((r, p)) or run_now(f, *a))
        reactor = Reactor()
        backend = auth.UsersFile(self.path, reactor)
        self.write("alice:%s\n" % (SECRET_HASH,))
        self.assertIsNotNone(self.successResultOf(backend.authenticate("alice", SECRET)))
        self.assertEqual(calls, [(reactor, "pool")])
