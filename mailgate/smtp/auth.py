"""
The users file behind SMTP AUTH.

One user a line, ``USERNAME:HASH[:SENDER,...]``; blank lines and ``#`` comments are allowed.
HASH is ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``.  Each SENDER is an address or ``@domain``
the user may put in MAIL FROM; with no senders listed, a username that is an address may send as
itself and any other username may send as nobody.

The file is the only state, so ``mailgate passwd`` (set_user) and a running gateway (UsersFile)
cooperate through it: set_user replaces it atomically and UsersFile re-reads it when it changes.
"""

import base64
import binascii
import functools
import hashlib
import hmac
import os
import tempfile
import threading

import attr
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from mailgate.config.types import private_file_problem
from mailgate.interfaces import IAuthBackend, IUser

log = Logger()

_N, _R, _P = 2**14, 8, 1
_SALT_BYTES, _KEY_BYTES = 16, 32
# Stored parameters are honoured up to these bounds, so a hand-edited hash cannot make one AUTH
# attempt eat gigabytes of memory or minutes of CPU.
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16


# --- password hashes ---------------------------------------------------------------------------


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(text):
    return base64.b64decode(text.encode("ascii"), validate=True)


def _as_bytes(password):
    return password if isinstance(password, bytes) else password.encode("utf-8")


def _scrypt(password, salt, n, r, p, dklen):
    # maxmem: scrypt needs about 128*r*(n+p) bytes; hashlib's default cap (32 MiB) is too low
    # for the bounds we accept.
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(_as_bytes(password), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def _parse_hash(hashed):
    """Split a stored hash into (n, r, p, salt, key); ValueError when it is not one we can use."""
    try:
        scheme, n, r, p, salt, key = hashed.split("$")
        n, r, p = int(n), int(r), int(p)
        salt, key = _unb64(salt), _unb64(key)
    except (AttributeError, ValueError, binascii.Error, UnicodeEncodeError):
        raise ValueError("not a scrypt$n$r$p$salt$hash password hash")
    if scheme != "scrypt":
        raise ValueError("unknown password hash scheme %r" % (scheme,))
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
        raise ValueError("unsupported scrypt parameters")
    if len(salt) < _SALT_BYTES or not _KEY_BYTES <= len(key) <= 64:
        raise ValueError("scrypt salt or hash is too short or too long")
    return n, r, p, salt, key


def hash_password(password):
    """A salted scrypt hash of password (str or bytes), in the users file's format."""
    salt = os.urandom(_SALT_BYTES)
    key = _scrypt(password, salt, _N, _R, _P, _KEY_BYTES)
    return "scrypt$%d$%d$%d$%s$%s" % (_N, _R, _P, _b64(salt), _b64(key))


def verify_password(password, hashed):
    """True when password matches hashed; False otherwise, including for any malformed hash."""
    try:
        n, r, p, salt, key = _parse_hash(hashed)
        return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(key)), key)
    except Exception:
        # Never let a bad hash (or a password that cannot be encoded) turn into an AUTH crash.
        return False


# A well-formed hash nothing matches in practice: unknown users are checked against it so that
# they cost the same scrypt computation as known ones (no user-enumeration timing oracle).
_DUMMY_HASH = "scrypt$%d$%d$%d$%s$%s" % (
    _N, _R, _P, _b64(os.urandom(_SALT_BYTES)), _b64(os.urandom(_KEY_BYTES)),
)


# --- names -------------------------------------------------------------------------------------


def _bad_chars(text):
    return any(c.isspace() or not c.isprintable() for c in text)


def _username_problem(username):
    """Why username cannot be in the users file, or None."""
    if not isinstance(username, str) or not username:
        return "empty username"
    if ":" in username or _bad_chars(username):
        return "username %r contains ':', whitespace or a control character" % (username,)
    if username.startswith("#"):
        return "username %r starts with '#' (it would read as a comment)" % (username,)
    return None


def _sender_problem(sender):
    """Why sender is neither an address nor @domain, or None."""
    if not isinstance(sender, str) or not sender:
        return "empty sender"
    local, at, domain = sender.rpartition("@")
    if (
        not at
        or not domain
        or _bad_chars(sender)
        or "," in sender
        or ":" in sender
        or "@" in local and not local.startswith('"')
        or domain.startswith(".")
        or domain.endswith(".")
    ):
        return "sender %r is neither an address nor @domain" % (sender,)
    return None


def _effective_senders(username, senders):
    """The senders a user may use: those listed, else the username when it is an address."""
    if senders:
        return tuple(senders)
    if "@" in username and _sender_problem(username) is None and not username.startswith("@"):
        return (username,)
    return ()


# --- the file format ---------------------------------------------------------------------------


def _is_entry(line):
    """True for a line holding a user (not blank, not a comment)."""
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _entry_name(line):
    return line.strip().split(":", 1)[0]


def _parse_line(line):
    """(name, hash, senders) of one entry line; ValueError saying what is wrong."""
    fields = line.strip().split(":", 2)
    if len(fields) < 2:
        raise ValueError("expected USERNAME:HASH[:SENDER,...]")
    name, hashed = fields[0], fields[1]
    problem = _username_problem(name)
    if problem:
        raise ValueError(problem)
    try:
        _parse_hash(hashed)
    except ValueError as e:
        raise ValueError("user %r: %s" % (name, e))
    senders = ()
    if len(fields) == 3 and fields[2].strip():
        senders = tuple(s.strip() for s in fields[2].split(","))
        for sender in senders:
            problem = _sender_problem(sender)
            if problem:
                raise ValueError("user %r: %s" % (name, problem))
    return name, hashed, senders


def parse_users(text, source="users file"):
    """
    Parse the users file's text into {username: (hash, senders)}, senders as listed (a tuple,
    maybe empty).  Raises ValueError("<source>, line N: what is wrong").
    """
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not _is_entry(line):
            continue
        try:
            name, hashed, senders = _parse_line(line)
            if name in users:
                raise ValueError("user %r is listed twice" % (name,))
        except ValueError as e:
            raise ValueError("%s, line %d: %s" % (source, number, e)) from None
        users[name] = (hashed, senders)
    return users


# --- writing -----------------------------------------------------------------------------------


def _read_lines(path):
    """The file's lines (with their endings), or [] when it does not exist yet."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _replace_entry(lines, username, new_line):
    """lines with username's entry replaced by new_line (appended when absent)."""
    out, done = [], False
    for line in lines:
        if _is_entry(line) and _entry_name(line) == username:
            if not done:
                ending = line[len(line.rstrip("\r\n")):] or "\n"
                out.append(new_line + ending)
                done = True
            continue  # a duplicate entry would make the file unusable: drop it
        out.append(line)
    if not done:
        if out and not out[-1].endswith(("\n", "\r")):
            out[-1] += "\n"
        out.append(new_line + "\n")
    return out


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, text):
    """
    Replace path with text so a reader sees the old file or the new one, never a mix, and the
    new one survives a crash.  Keeps an existing file's mode without the bits for others (it
    holds password hashes: owner and group only) and its owner, where permitted; a new file
    gets 0600.
    """
    directory = os.path.dirname(path) or "."
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    prefix = "." + os.path.basename(path) + "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            os.fchmod(f.fileno(), (st.st_mode & 0o7770) if st else 0o600)
            if st is not None:
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except OSError:
                    pass  # not root: the file stays ours, which is what we could write anyway
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def set_user(path, username, password, senders=()):
    """
    Add or replace username's line in the users file at path (created when missing), keeping
    every other line and comment as it was.  ValueError (one readable line) on a bad username,
    sender or an empty password.
    """
    problem = _username_problem(username)
    if problem:
        raise ValueError(problem)
    if not password:
        raise ValueError("empty password")
    senders = tuple(senders)
    for sender in senders:
        problem = _sender_problem(sender)
        if problem:
            raise ValueError(problem)
    line = "%s:%s" % (username, hash_password(password))
    if senders:
        line += ":" + ",".join(senders)
    path = os.path.realpath(path)  # through a symlink: replace the file, not the link
    _atomic_write(path, "".join(_replace_entry(_read_lines(path), username, line)))


# --- users and the backend ---------------------------------------------------------------------


@implementer(IUser)
@attr.s(frozen=True, slots=True)
class User:
    """An authenticated user and the MAIL FROM addresses it may use."""

    name = attr.ib()
    senders = attr.ib(default=(), converter=tuple)

    def may_send_as(self, address):
        """Whole-address match, or @domain matching any local part at exactly that domain."""
        if not address or "@" not in address:
            return False
        address = address.lower()
        local, _, domain = address.rpartition("@")
        for sender in self.senders:
            sender = sender.lower()
            if sender.startswith("@"):
                if local and domain == sender[1:]:
                    return True
            elif address == sender:
                return True
        return False


@implementer(IAuthBackend)
class UsersFile:
    """
    IAuthBackend over a users file.  Every file access and every scrypt computation runs via
    run_in_thread, so the reactor never blocks on the disk or on the deliberately slow hash.
    """

    def __init__(self, path, reactor, threadpool=None, run_in_thread=None):
        if run_in_thread is None:
            if threadpool is None:
                threadpool = reactor.getThreadPool()
            run_in_thread = functools.partial(deferToThreadPool, reactor, threadpool)
        self.path = path
        self._run = run_in_thread
        self._lock = threading.Lock()
        self._users = None  # the last good copy; None until one was read
        self._seen = None  # stamp (or error) of the last read attempt, so each change is read once

    def authenticate(self, username, password):
        d = self._run(self._check, username, password)
        d.addCallback(self._report)
        return d

    def user_grants(self, username):
        """
        Deferred[User or None]: the senders the file grants to username, without its password
        (for a user another backend authenticated, [auth] backend = ldap, file).
        """
        d = self._run(self._grants, username)
        d.addCallback(self._report)
        return d

    def _grants(self, username):
        events = self._refresh()
        entry = self._users.get(username) if self._users is not None else None
        if entry is None:
            return None, events
        return User(username, _effective_senders(username, entry[1])), events

    def _report(self, result):
        """Log (on the reactor thread) what the reload in the thread had to say."""
        user, events = result
        for level, fmt, fields in events:
            log.emit(level, fmt, **fields)
        return user

    def _check(self, username, password):
        """In a thread: reload when needed, then check the password."""
        events = self._refresh()
        entry = None
        if self._users is not None and isinstance(username, str):
            entry = self._users.get(username)
        if entry is None:
            verify_password(password, _DUMMY_HASH)
            return None, events
        hashed, senders = entry
        if not verify_password(password, hashed):
            return None, events
        return User(username, _effective_senders(username, senders)), events

    def _refresh(self):
        """Re-read the file if it changed; returns log events as (level, format, fields)."""
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
            except OSError as e:
                return self._failed(("stat", e.errno), e)
            if stamp == self._seen:
                return []
            try:
                with open(self.path, encoding="utf-8") as f:
                    st = os.fstat(f.fileno())  # the stamp of exactly what we read
                    users = parse_users(f.read(), source=self.path)
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)
                problem = private_file_problem(self.path) if users else None
                if problem:
                    raise ValueError(problem)
            except (OSError, ValueError) as e:
                return self._failed(stamp, e)
            self._users, self._seen = users, stamp
            fields = dict(count=len(users), path=self.path)
            return [(LogLevel.info, "Loaded {count} users from {path}", fields)]

    def _failed(self, seen, error):
        if seen == self._seen:
            return []  # already reported this very problem
        self._seen = seen
        keeping = self._users is not None
        return [(
            LogLevel.error,
            "Cannot use users file {path}: {error}; {consequence}",
            dict(
                path=self.path,
                error=str(error),
                consequence=(
                    "keeping the last good copy" if keeping else "AUTH fails until it is fixed"
                ),
                keeping_last_good=keeping,
            ),
        )]

