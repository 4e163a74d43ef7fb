"""
The embedded durable queue ("spool"): one file per message, in the directory named after its state.

Why this shape: a message is written once, to tmp/<id>, with a single writev and an fdatasync; it is
then renamed into its state directory and that directory is fsynced before anyone hears it is queued.
A crash therefore leaves either a complete entry or a leftover in tmp/, which recover() deletes.
The writes and renames (and moves and removals) of concurrent sessions are grouped into one thread
job so that a single directory fsync makes many of them durable, and a message costs a share of one
job rather than two thread hops of its own.

Entry format:  b"MGQ1 <json_len> <body_len> <crc32 hex of body>\\n" + envelope JSON + b"\\n" + body.

Delivery state (the scheduler's opaque bytes, per message) lives in state/<id>, one directory for all
queue states so that move() never touches it.  It is replaced the same way a message is written:
tmp/<id>.state-<random>, fdatasync, rename over state/<id> (through the group commit), fsync of state/.
A reader therefore sees the old bytes or the new ones, never a mixture.  remove() unlinks the message,
makes that durable, and only then unlinks the state: a crash in between leaves an orphan state file
(which recover() deletes), never a message that lost its delivery state.

Queue ids never contain a dot: names with one ("<id>.state") in the state directories are left alone,
and the tmp names of state writes can never collide with the tmp name of a message.

All disk I/O runs through run_in_thread; the functions prefixed with an underscore at module level are
the thread-side halves and never touch Deferreds, the reactor or the logger.
"""

import errno
import functools
import os
import re
import secrets
import stat
import zlib

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.envelope import Envelope
from mailgate.interfaces import IQueue, IWorkSource
from mailgate.queue.claims import DELIVERABLE, LeaseLost, LocalClaims, LocalWork
from mailgate.queue.ids import STATES, _ID_RE
from mailgate.queue.ids import check_queue_id as _check_id
from mailgate.queue.ids import check_state as _check_state

log = Logger()

TMP = "tmp"
CORRUPT = "corrupt"
STATE_DIR = "state"  # delivery state of every message, whatever queue state it is in
DIRECTORIES = (TMP,) + STATES + (CORRUPT, STATE_DIR)

MAGIC = b"MGQ1"
_HEADER_MAX = 64  # "MGQ1 " + two 20-digit lengths + 8 hex digits + separators fits easily
_FIRST_READ = 8192  # one read normally covers header and envelope JSON
_SIDECAR_RE = re.compile(r"\A[0-9A-Za-z_-]{1,64}\.[0-9A-Za-z_-]+\Z")
_HEX = frozenset(b"0123456789abcdef")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


# --- errors ----------------------------------------------------------------------------------------


class CorruptEntryError(KeyError):
    """
    load() found an entry it cannot trust and moved it to corrupt/.  A KeyError, because the queue no
    longer has a usable entry with that id: code that skips missing entries skips these too.
    """

    def __init__(self, queue_id, state, reason, moved_to):
        KeyError.__init__(self, queue_id)
        self.queue_id = queue_id
        self.state = state
        self.reason = reason
        self.moved_to = moved_to

    def __str__(self):
        return "queue entry %s in %s is corrupt (%s); moved to %s" % (
            self.queue_id,
            self.state,
            self.reason,
            self.moved_to,
        )


class _Corrupt(Exception):
    """Thread-side: what is wrong with an entry's bytes."""


# --- thread side: small file-system helpers --------------------------------------------------------


def _fsync_dir(path):
    """Make the directory entries of path (creations, renames, unlinks) durable."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _writev_all(fd, buffers):
    """writev until every byte is written: one syscall for the whole entry in the usual case."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if len(v)]
    while views:
        written = os.writev(fd, views)
        if written <= 0:
            raise OSError(errno.EIO, "writev wrote nothing")
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0


def _pread_exact(fd, length, offset):
    """Exactly length bytes at offset (one pread unless the kernel returns less)."""
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise _Corrupt("file ends early")
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _header(json_bytes, body):
    return b"%s %d %d %08x\n" % (MAGIC, len(json_bytes), len(body), zlib.crc32(body) & 0xFFFFFFFF)


def _parse_header(head):
    """(header_len, json_len, body_len, crc hex) from an entry's first bytes, or raise _Corrupt."""
    end = head.find(b"\n", 0, _HEADER_MAX)
    if end < 0:
        raise _Corrupt("no header line")
    parts = head[:end].split(b" ")
    if len(parts) != 4 or parts[0] != MAGIC:
        raise _Corrupt("bad magic")
    if not (parts[1].isdigit() and parts[2].isdigit()):
        raise _Corrupt("bad lengths in header")
    if len(parts[3]) != 8 or not _HEX.issuperset(parts[3]):
        raise _Corrupt("bad crc in header")
    return end + 1, int(parts[1]), int(parts[2]), parts[3].decode("ascii")


def _read_head(fd, name):
    """
    Check an open entry without reading its body: header, lengths against the file size, envelope.
    Returns (envelope, body_offset, body_len, crc hex).
    """
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _Corrupt("not a regular file")
    head = _pread_exact(fd, min(info.st_size, _FIRST_READ), 0) if info.st_size else b""
    header_len, json_len, body_len, crc = _parse_header(head)
    json_end = header_len + json_len
    if json_end + 1 + body_len != info.st_size:
        raise _Corrupt("header says %d bytes, file has %d" % (json_end + 1 + body_len, info.st_size))
    if json_end + 1 > len(head):
        head = _pread_exact(fd, json_end + 1, 0)
    if head[json_end : json_end + 1] != b"\n":
        raise _Corrupt("no newline after envelope")
    try:
        envelope = Envelope.from_json(head[header_len:json_end])
    except Exception as e:
        raise _Corrupt("bad envelope: %s" % (e,))
    if envelope.queue_id != name:
        raise _Corrupt("envelope is for %r" % (envelope.queue_id,))
    return envelope, json_end + 1, body_len, crc


def _move_aside(root, state, name):
    """Rename a bad entry into corrupt/ (never over an older one) and make that durable."""
    corrupt = os.path.join(root, CORRUPT)
    target = os.path.join(corrupt, name)
    n = 0
    while os.path.lexists(target):
        n += 1
        target = os.path.join(corrupt, "%s.%d" % (name, n))
    source_dir = os.path.join(root, state)
    os.rename(os.path.join(source_dir, name), target)
    _fsync_dir(corrupt)
    _fsync_dir(source_dir)
    return target


def _set_aside(root, state, name, reason):
    """Move a bad entry aside; the record of it is logged later, on the reactor thread."""
    try:
        moved_to = _move_aside(root, state, name)
    except OSError as e:
        moved_to = None
        reason = "%s; could not move it aside: %s" % (reason, e)
    return {"queue_id": name, "state": state, "reason": reason, "moved_to": moved_to}


# --- thread side: the jobs -------------------------------------------------------------------------


def _write_file(path, buffers):
    """Create path exclusively, write buffers with one writev, fdatasync; no leftovers on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            _writev_all(fd, buffers)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(path)
        raise


def _write_entry(path, json_bytes, data):
    """Write a whole entry (header, envelope, body) to path."""
    body = memoryview(data).cast("B")
    head = _header(json_bytes, body) + json_bytes + b"\n"
    _write_file(path, [head, body])


def _commit(ops):
    """
    The group commit: run every op, then fsync each directory they touched once.  An op returns
    (result, directories to fsync, undo or None).  Returns one (ok, result or Failure) per op; an op
    whose directory fsync failed is undone if it can be and reported as failed.
    """
    outcomes = []
    touched = {}  # directory -> indexes of the ops that need it; insertion order puts targets first
    undos = {}
    for i, op in enumerate(ops):
        try:
            result, directories, undo = op()
        except Exception:
            outcomes.append((False, Failure()))
            continue
        outcomes.append((True, result))
        undos[i] = undo
        for directory in directories:
            touched.setdefault(directory, []).append(i)
    for directory, users in touched.items():
        try:
            _fsync_dir(directory)
        except OSError:
            failure = Failure()
            for i in users:
                if outcomes[i][0]:
                    outcomes[i] = (False, failure)
                    if undos[i] is not None:
                        undos[i]()
    return outcomes


def _op_write_in(source, json_bytes, data, target_dir, target):
    """
    Commit op of enqueue: write and fdatasync tmp/<id>, then rename it into its state directory,
    so that the entry appears there complete or not at all.  The write is part of the op (not a
    thread job of its own) so that a message costs one share of one pool job, not two jobs: the
    thread hops, not the disk, were most of a receiver's cost per message.
    """
    _write_entry(source, json_bytes, data)
    try:
        os.rename(source, target)
    except OSError:
        _unlink_quietly(source)
        raise
    return None, [target_dir], functools.partial(_unlink_quietly, target)


def _op_move(root, queue_id, state, claimed=False):
    """
    Commit op of move: find the entry in another state and rename it into state.  The result says
    whether it moved (False: it was in state already).  claimed: the scheduler's move, only out of
    a deliverable state (LeaseLost when the entry was held or quarantined meanwhile).
    """
    target_dir = os.path.join(root, state)
    target = os.path.join(target_dir, queue_id)
    for source_state in STATES:
        if source_state == state:
            continue
        if claimed and source_state not in DELIVERABLE:
            if os.path.lexists(os.path.join(root, source_state, queue_id)):
                raise LeaseLost(queue_id, "it is in %s now" % (source_state,))
            continue
        source_dir = os.path.join(root, source_state)
        try:
            os.rename(os.path.join(source_dir, queue_id), target)
        except FileNotFoundError:
            continue
        return True, [target_dir, source_dir], None
    if os.path.lexists(target):
        return False, [], None
    raise KeyError(queue_id)


def _op_remove(root, queue_id):
    """
    Commit op of remove: unlink the message.  The result says whether it has a state file, which
    the next commit unlinks once this one is durable.  (No state file can appear after this op:
    _op_save_state, in a later commit, finds no message and fails.)
    """
    for state in STATES:
        directory = os.path.join(root, state)
        try:
            os.unlink(os.path.join(directory, queue_id))
        except FileNotFoundError:
            continue
        return os.path.lexists(os.path.join(root, STATE_DIR, queue_id)), [directory], None
    raise KeyError(queue_id)


def _message_exists(root, queue_id):
    return any(os.path.lexists(os.path.join(root, state, queue_id)) for state in STATES)


def _op_save_state(root, queue_id, source):
    """
    Commit op of save_state: rename the written tmp file over state/<id>.  Only while the message
    exists: commit ops run one at a time, so a save can never land after remove() and orphan a file.
    """
    try:
        if not _message_exists(root, queue_id):
            raise KeyError(queue_id)
        directory = os.path.join(root, STATE_DIR)
        os.rename(source, os.path.join(directory, queue_id))
    except BaseException:
        _unlink_quietly(source)
        raise
    return None, [directory], None  # the old bytes are gone: nothing to undo to


def _op_remove_state(root, queue_id):
    """Commit op of remove, second half: the message is durably gone, now its state file."""
    directory = os.path.join(root, STATE_DIR)
    try:
        os.unlink(os.path.join(directory, queue_id))
    except FileNotFoundError:
        return None, [], None
    return None, [directory], None


def _load_state(root, queue_id):
    """The bytes of state/<id>, or None.  Whole, because state files are only ever renamed in."""
    try:
        fd = os.open(os.path.join(root, STATE_DIR, queue_id), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _read_entry(fd, name):
    """(envelope, data) of an open entry, after checking the body against its crc."""
    envelope, offset, length, crc = _read_head(fd, name)
    data = _pread_exact(fd, length, offset) if length else b""
    if "%08x" % (zlib.crc32(data) & 0xFFFFFFFF) != crc:
        raise _Corrupt("crc mismatch")
    return envelope, data


def _load(root, queue_id):
    """(state, envelope, data), checking the crc; a bad entry is set aside and CorruptEntryError raised."""
    for state in STATES:
        try:
            fd = os.open(os.path.join(root, state, queue_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            envelope, data = _read_entry(fd, queue_id)
        except _Corrupt as e:
            reason = str(e)
        else:
            return state, envelope, data
        finally:
            os.close(fd)
        problem = _set_aside(root, state, queue_id, reason)
        raise CorruptEntryError(queue_id, state, problem["reason"], problem["moved_to"])
    raise KeyError(queue_id)


def _load_with_state(root, queue_id):
    """(state, envelope, data, state bytes or None): the scheduler's read for a round, one job."""
    state, envelope, data = _load(root, queue_id)
    return state, envelope, data, _load_state(root, queue_id)


def _scan(root, state):
    """([(state, envelope)], [problem]) for one state directory; bad entries are set aside."""
    directory = os.path.join(root, state)
    entries, problems = [], []
    for name in os.listdir(directory):
        if _SIDECAR_RE.match(name):
            continue
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # removed or moved since listdir
        try:
            entries.append((state, _read_head(fd, name)[0]))
        except _Corrupt as e:
            problems.append(_set_aside(root, state, name, str(e)))
        finally:
            os.close(fd)
    return entries, problems


def _list(root, states):
    entries, problems = [], []
    for state in states:
        found, bad = _scan(root, state)
        entries.extend(found)
        problems.extend(bad)
    entries.sort(key=lambda entry: entry[1].queue_id)
    return entries, problems


def _make_directories(root):
    """Create the spool directories that are missing; fsync the parents of new ones."""
    if not os.path.isdir(root):
        os.makedirs(root, 0o700, exist_ok=True)
        _fsync_dir(os.path.dirname(root) or ".")
    created = False
    for name in DIRECTORIES:
        try:
            os.mkdir(os.path.join(root, name), 0o700)
            created = True
        except FileExistsError:
            pass
    if created:
        _fsync_dir(root)


def _clear_tmp(root):
    """Delete every leftover of an interrupted write; returns how many."""
    directory = os.path.join(root, TMP)
    removed = 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            os.unlink(path)
        except IsADirectoryError:
            continue  # not ours to delete; it can never be mistaken for an entry
        except FileNotFoundError:
            continue
        removed += 1
    if removed:
        _fsync_dir(directory)
    return removed


def _clear_orphan_states(root, entries):
    """
    Delete the state files of messages that are gone (a crash between the two unlinks of remove(),
    or the message was set aside as corrupt); returns how many.  Names that are not queue ids, and
    directories, are not ours and are left alone.
    """
    directory = os.path.join(root, STATE_DIR)
    alive = {envelope.queue_id for _, envelope in entries}
    removed = 0
    for name in os.listdir(directory):
        if name in alive or not _ID_RE.match(name) or _message_exists(root, name):
            continue
        path = os.path.join(directory, name)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed += 1
    if removed:
        _fsync_dir(directory)
    return removed


def _recover(root):
    """(leftovers removed from tmp/, problems set aside, entries that are fine, orphan states removed)."""
    _make_directories(root)
    removed = _clear_tmp(root)
    entries, problems = _list(root, STATES)
    orphans = _clear_orphan_states(root, entries)
    return removed, problems, len(entries), orphans


def _probe(root):
    """Create, fsync and remove a small file in tmp/: can the spool still take messages?"""
    path = os.path.join(root, TMP, ".probe-" + secrets.token_hex(6))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        _unlink_quietly(path)
    return True


# --- reactor side ----------------------------------------------------------------------------------


class _GroupCommit:
    """
    Batches operations that change directories.  While one commit job runs in the thread pool new
    requests wait; the next job runs all of them and fsyncs each directory once.  Each request's
    Deferred fires only after the job (and so its directory fsync) is done.
    """

    def __init__(self, run_in_thread):
        self._run = run_in_thread
        self._pending = []
        self._busy = False
        self.jobs = 0  # how many commit jobs ran: for tests and the benchmark
        self.ops = 0

    def submit(self, op):
        d = defer.Deferred()
        self._pending.append((op, d))
        self._start()
        return d

    def _start(self):
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._busy = True
        self.jobs += 1
        self.ops += len(batch)
        d = self._run(_commit, [op for op, _ in batch])
        d.addBoth(self._finished, batch)

    def _finished(self, outcomes, batch):
        self._busy = False
        self._start()  # hand the next batch to the pool before running callbacks
        if isinstance(outcomes, Failure):
            outcomes = [(False, outcomes)] * len(batch)
        for (_, d), (ok, value) in zip(batch, outcomes):
            if ok:
                d.callback(value)
            else:
                d.errback(value)


@implementer(IQueue, IWorkSource)
class Spool(LocalWork):
    """
    The on-disk queue under path.  Call recover() once before the first enqueue.  One process
    uses it: claims on its messages (IWorkSource) live in memory (mailgate.queue.claims).

    run_in_thread(f, *args) -> Deferred is where all disk I/O goes; by default it is
    deferToThreadPool on threadpool (or the reactor's own pool).  It may also fire synchronously.
    """

    def __init__(self, path, reactor, threadpool=None, run_in_thread=None, owner=None):
        self.path = os.path.abspath(os.fspath(path))
        self._reactor = reactor
        self._threadpool = threadpool
        run = run_in_thread if run_in_thread is not None else self._in_pool
        # A runner that raises instead of returning a failed Deferred must not wedge the commits.
        self._run = functools.partial(defer.maybeDeferred, run)
        self._committer = _GroupCommit(self._run)
        self._subscribers = []
        self._state_locks = {}  # queue_id -> DeferredLock: saves of one message land in call order
        self.write_error = None  # why the last write failed, until a write succeeds again
        self._write_watchers = []
        self._claims = LocalClaims(self, owner)

    def _in_pool(self, f, *args):
        pool = self._threadpool if self._threadpool is not None else self._reactor.getThreadPool()
        return threads.deferToThreadPool(self._reactor, pool, f, *args)

    @property
    def commit_jobs(self):
        """How many group commits ran (each fsyncs every directory it touched once)."""
        return self._committer.jobs

    def _dir(self, name):
        return os.path.join(self.path, name)

    def recover(self):
        return self._run(_recover, self.path).addCallback(self._recovered)

    def _recovered(self, result):
        removed, problems, entries, orphans = result
        _log_problems(problems)
        log.info(
            "Queue {path} recovered: {entries} entries, {removed} leftovers removed, "
            "{corrupt} corrupt entries set aside, {orphans} orphan state files removed",
            path=self.path,
            entries=entries,
            removed=removed,
            corrupt=len(problems),
            orphans=orphans,
        )
        return removed + len(problems) + orphans

    def enqueue(self, envelope, data, state="active"):
        _check_state(state)
        queue_id = _check_id(envelope.queue_id)
        source = os.path.join(self._dir(TMP), queue_id)
        target_dir = self._dir(state)
        op = functools.partial(_op_write_in, source, envelope.to_json(), data, target_dir,
                               os.path.join(target_dir, queue_id))
        d = self._committer.submit(op)
        d.addCallbacks(
            self._enqueued,
            self._enqueue_failed,
            callbackArgs=(queue_id, state),
            errbackArgs=(queue_id, state),
        )
        return d

    def _enqueued(self, _, queue_id, state):
        self._wrote()
        self._notify(queue_id, state)
        return queue_id

    def _enqueue_failed(self, failure, queue_id, state):
        self._write_failed(failure)
        log.error(
            "Could not queue {queue_id} in {state}: {error}",
            queue_id=queue_id,
            state=state,
            error=failure.getErrorMessage(),
        )
        return failure

    def _write_failed(self, failure):
        """Remember a failed write (a full disk, an I/O error): /healthz says why while it lasts."""
        if failure.check(OSError):
            error = failure.value
            if self.write_error is None:
                log.error("Spool {path}: writes fail ({error}); every message gets 451 4.3.0 "
                          "until they work again", path=self.path, error=_why(error))
            self.write_error = _why(error)
            for watcher in self._write_watchers:
                watcher("spool %s: the last write failed: %s" % (self.path, self.write_error))
        return failure

    def _wrote(self, result=None):
        if self.write_error is not None:
            log.info("Spool {path}: writes work again", path=self.path)
            self.write_error = None
        return result

    def watch_writes(self, callback):
        """
        callback(why) on every failed write: a receiver process passes it to the main process,
        whose /healthz must say so (its own probe may find a page free that a message does not
        fit in) until a receiver commits a message again.
        """
        self._write_watchers.append(callback)

    def load(self, queue_id):
        _check_id(queue_id)
        return self._run(_load, self.path, queue_id).addErrback(self._load_failed)

    def load_with_state(self, queue_id):
        _check_id(queue_id)
        return self._run(_load_with_state, self.path, queue_id).addErrback(self._load_failed)

    def _load_failed(self, failure):
        if failure.check(CorruptEntryError):
            e = failure.value
            _log_problems(
                [{"queue_id": e.queue_id, "state": e.state, "reason": e.reason, "moved_to": e.moved_to}]
            )
        return failure

    def list(self, state=None):
        states = STATES if state is None else (_check_state(state),)
        return self._run(_list, self.path, states).addCallback(self._listed)

    def _listed(self, result):
        entries, problems = result
        _log_problems(problems)
        return entries

    def move(self, queue_id, state, claim=None):
        _check_state(state)
        _check_id(queue_id)
        try:
            self._claims.check(claim)
        except LeaseLost:
            return defer.fail()
        op = functools.partial(_op_move, self.path, queue_id, state, claim is not None)
        return self._committer.submit(op).addCallback(self._moved, queue_id, state)

    def _moved(self, moved, queue_id, state):
        if moved:  # a move to where the entry already is changes nothing and tells nobody
            self._notify(queue_id, state)
        return None

    def remove(self, queue_id, claim=None):
        _check_id(queue_id)
        try:
            self._claims.check(claim)
        except LeaseLost:
            return defer.fail()
        d = self._committer.submit(functools.partial(_op_remove, self.path, queue_id))
        return d.addCallback(self._remove_state, queue_id)

    def _remove_state(self, has_state, queue_id):
        """
        Second commit of remove, only once the message is durably gone.  Its failure is logged, not
        returned: the message is gone, and recover() deletes a state file left behind.
        """
        self._claims.forget(queue_id)
        if not has_state:
            return None
        d = self._committer.submit(functools.partial(_op_remove_state, self.path, queue_id))
        d.addErrback(self._state_not_removed, queue_id)
        return d

    def _state_not_removed(self, failure, queue_id):
        log.failure(
            "Could not remove the state file of {queue_id}; recover() will", failure, queue_id=queue_id
        )

    # -- delivery state ------------------------------------------------------------------------------

    def save_state(self, queue_id, data, claim=None):
        _check_id(queue_id)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("state must be bytes, not %s" % (type(data).__name__,))
        data = bytes(data)  # the caller may change a bytearray while the write waits for the pool
        lock = self._state_locks.get(queue_id)
        if lock is None:
            lock = self._state_locks[queue_id] = defer.DeferredLock()
        d = lock.run(self._save_state, queue_id, data, claim)
        d.addBoth(self._forget_lock, queue_id, lock)
        return d

    def _save_state(self, queue_id, data, claim):
        self._claims.check(claim)  # when its turn comes: a delete meanwhile ends the claim
        source = os.path.join(self._dir(TMP), "%s.state-%s" % (queue_id, secrets.token_hex(6)))
        op = functools.partial(_op_save_state, self.path, queue_id, source)
        d = self._run(_write_file, source, [data])
        d.addCallback(lambda _: self._committer.submit(op))
        return d.addCallbacks(self._wrote, self._write_failed)

    def _forget_lock(self, result, queue_id, lock):
        if not lock.locked and not lock.waiting and self._state_locks.get(queue_id) is lock:
            del self._state_locks[queue_id]
        return result

    def load_state(self, queue_id):
        _check_id(queue_id)
        return self._run(_load_state, self.path, queue_id)

    # -- notification --------------------------------------------------------------------------------

    def subscribe(self, callback):
        """
        Returns a function that unsubscribes callback again (for a service that stops; calling it
        twice is harmless).
        """
        self._subscribers.append(callback)

        def unsubscribe():
            try:
                self._subscribers.remove(callback)
            except ValueError:
                pass

        return unsubscribe

    def announce(self, queue_id, state):
        """
        Another process committed queue_id into state on this spool (a receiver process, which
        tells the main one): the subscribers hear of it as of our own commits.
        """
        _check_state(state)
        self._notify(_check_id(queue_id), state)

    def _notify(self, queue_id, state):
        for callback in list(self._subscribers):  # a callback may subscribe or unsubscribe
            try:
                result = callback(queue_id, state)
            except Exception:
                log.failure(
                    "Queue subscriber {subscriber!r} failed for {queue_id} in {state}",
                    subscriber=callback,
                    queue_id=queue_id,
                    state=state,
                )
                continue
            if isinstance(result, defer.Deferred):
                result.addErrback(
                    lambda f, s=callback: log.failure(
                        "Queue subscriber {subscriber!r} failed for {queue_id} in {state}",
                        f,
                        subscriber=s,
                        queue_id=queue_id,
                        state=state,
                    )
                )

    def check_writable(self):
        """
        Fires True when a probe file can be written and synced in tmp/ and the last message or
        state write did not fail; else with why not (str), for /healthz.
        """
        return self._run(_probe, self.path).addCallbacks(self._probed, self._not_writable)

    def _probed(self, _):
        if self.write_error is not None:
            return "spool %s: the last write failed: %s" % (self.path, self.write_error)
        return True

    def _not_writable(self, failure):
        error = failure.value
        why = _why(error) if isinstance(error, OSError) else failure.getErrorMessage()
        log.error("Queue {path} is not writable: {error}", path=self.path, error=why)
        return "spool %s not writable: %s" % (self.path, why)


def _why(error):
    """An OSError in words: 'No space left on device (ENOSPC)'."""
    name = errno.errorcode.get(error.errno, "")
    text = error.strerror or str(error)
    return "%s (%s)" % (text, name) if name else text


def _log_problems(problems):
    for problem in problems:
        log.warn(
            "Queue entry {queue_id} in {state} is corrupt ({reason}); moved to {moved_to}",
            **problem,
        )
