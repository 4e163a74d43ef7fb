"""
Tests for the durable spool.  Most run its thread-side jobs synchronously (or when the test says so)
so that the order of writes, renames and fsyncs, and the moment a Deferred fires, can be checked.
"""

import errno
import json
import os
import re
import threading
import zlib

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.logger import Logger, LogLevel
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from mailgate.envelope import Envelope
from mailgate.interfaces import IQueue
from mailgate.queue import CorruptEntryError, Spool, new_queue_id
from mailgate.queue import spool as spool_module

STATE_DIRS = ("active", "deferred", "hold", "quarantine")


def sync_runner(f, *args):
    """Runs a thread job at once, on this thread."""
    return defer.maybeDeferred(f, *args)


class QueuedRunner:
    """Holds thread jobs until the test runs them, as a busy thread pool would."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_one(self, index=0):
        f, args, d = self.jobs.pop(index)
        defer.maybeDeferred(f, *args).chainDeferred(d)

    def run_all(self):
        while self.jobs:
            self.run_one()


def make_envelope(queue_id=None, **kwargs):
    fields = dict(
        queue_id=new_queue_id() if queue_id is None else queue_id,
        sender="alice@example.org",
        recipients=["bob@example.com", "carol@example.com"],
        client_ip="192.0.2.1",
        client_port=40000,
        helo="client.example.org",
        received_at=1700000000.25,
        size=100,
    )
    fields.update(kwargs)
    return Envelope(**fields)


BODY = b"Subject: hi\r\n\r\nbinary \x00\xff\xfe and a dot line\r\n.\r\n" * 3


class SpoolTestMixin:
    runner = staticmethod(sync_runner)

    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.spool = self.make_spool()
        self.assertEqual(self.successResultOf(self.spool.recover()), 0)

    def make_spool(self, runner=None):
        return Spool(self.path, global_reactor, run_in_thread=runner or self.runner)

    def names(self, directory):
        return sorted(os.listdir(os.path.join(self.path, directory)))

    def enqueue(self, envelope=None, data=BODY, state="active"):
        envelope = envelope or make_envelope()
        return envelope, self.successResultOf(self.spool.enqueue(envelope, data, state))

    def entry_path(self, queue_id, state="active"):
        return os.path.join(self.path, state, queue_id)


class SpoolTests(SpoolTestMixin, TestCase):
    def test_interface(self):
        self.assertTrue(verifyObject(IQueue, self.spool))

    def test_recover_creates_layout(self):
        for name in ("tmp", "corrupt", "state") + STATE_DIRS:
            self.assertTrue(os.path.isdir(os.path.join(self.path, name)), name)

    def test_recover_creates_missing_parents(self):
        spool = Spool(os.path.join(self.path, "a", "b"), global_reactor, run_in_thread=sync_runner)
        self.assertEqual(self.successResultOf(spool.recover()), 0)
        self.assertTrue(os.path.isdir(os.path.join(self.path, "a", "b", "active")))

    def test_round_trip(self):
        envelope, queue_id = self.enqueue()
        self.assertEqual(queue_id, envelope.queue_id)
        state, loaded, data = self.successResultOf(self.spool.load(queue_id))
        self.assertEqual((state, loaded, data), ("active", envelope, BODY))
        self.assertEqual(self.successResultOf(self.spool.list()), [("active", envelope)])
        self.assertEqual(self.names("tmp"), [])
        mode = os.stat(self.entry_path(queue_id)).st_mode & 0o777
        self.assertEqual(mode, 0o600)

    def test_empty_and_large_bodies(self):
        big = os.urandom(3 * 1024 * 1024 + 7)
        for data in (b"", big, bytearray(b"bytearray body")):
            _, queue_id = self.enqueue(data=data)
            self.assertEqual(self.successResultOf(self.spool.load(queue_id))[2], bytes(data))

    def test_enqueue_in_another_state(self):
        envelope, queue_id = self.enqueue(state="hold")
        self.assertEqual(self.successResultOf(self.spool.load(queue_id))[0], "hold")
        self.assertEqual(self.successResultOf(self.spool.list("hold")), [("hold", envelope)])
        self.assertEqual(self.successResultOf(self.spool.list("active")), [])

    def test_list_is_sorted_by_id_and_filters_by_state(self):
        entries = [self.enqueue(state=s)[0] for s in ("deferred", "active", "quarantine", "active")]
        listed = self.successResultOf(self.spool.list())
        self.assertEqual([e for _, e in listed], entries)
        self.assertEqual([s for s, _ in listed], ["deferred", "active", "quarantine", "active"])
        self.assertEqual(len(self.successResultOf(self.spool.list("active"))), 2)

    def test_list_reads_headers_only(self):
        """list() must not read message bodies: a large queue is listed at start-up."""
        self.enqueue(data=b"x" * 1_000_000)
        read = []
        real_pread = os.pread
        self.patch(spool_module.os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
        self.assertEqual(len(self.successResultOf(self.spool.list())), 1)
        self.assertLessEqual(sum(read), 8192)

    def test_file_format_is_readable(self):
        """The envelope is plain JSON on the second line: readable by humans and other tools."""
        envelope, queue_id = self.enqueue()
        with open(self.entry_path(queue_id), "rb") as f:
            raw = f.read()
        header, rest = raw.split(b"\n", 1)
        match = re.match(rb"\AMGQ1 (\d+) (\d+) ([0-9a-f]{8})\Z", header)
        self.assertIsNotNone(match)
        json_len, body_len = int(match.group(1)), int(match.group(2))
        self.assertEqual(json.loads(rest[:json_len]), json.loads(envelope.to_json()))
        self.assertEqual(json.loads(rest[:json_len])["recipients"], list(envelope.recipients))
        self.assertEqual(rest[json_len : json_len + 1], b"\n")
        self.assertEqual(rest[json_len + 1 :], BODY)
        self.assertEqual(body_len, len(BODY))
        self.assertEqual(int(match.group(3), 16), zlib.crc32(BODY))

    def test_unknown_state(self):
        _, queue_id = self.enqueue()
        self.assertRaises(ValueError, self.spool.enqueue, make_envelope(), BODY, "bogus")
        self.assertRaises(ValueError, self.spool.list, "tmp")
        self.assertRaises(ValueError, self.spool.move, queue_id, "corrupt")

    def test_unsafe_queue_id(self):
        for bad in ("../etc/passwd", "a/b", "", ".hidden", "x.state"):
            self.assertRaises(ValueError, self.spool.enqueue, make_envelope(bad), BODY)
            self.assertRaises(ValueError, self.spool.load, bad)
        self.assertEqual(self.names("tmp"), [])

    def test_move(self):
        envelope, queue_id = self.enqueue()
        self.assertIsNone(self.successResultOf(self.spool.move(queue_id, "deferred")))
        self.assertEqual(self.names("active"), [])
        self.assertEqual(self.names("deferred"), [queue_id])
        self.assertEqual(self.successResultOf(self.spool.load(queue_id))[:2], ("deferred", envelope))
        self.successResultOf(self.spool.move(queue_id, "deferred"))  # already there: nothing to do
        self.assertEqual(self.names("deferred"), [queue_id])
        self.failureResultOf(self.spool.move(new_queue_id(), "hold"), KeyError)

    def test_remove(self):
        _, queue_id = self.enqueue(state="quarantine")
        self.successResultOf(self.spool.remove(queue_id))
        self.assertEqual(self.names("quarantine"), [])
        self.failureResultOf(self.spool.load(queue_id), KeyError)
        self.failureResultOf(self.spool.remove(queue_id), KeyError)

    def test_load_missing(self):
        failure = self.failureResultOf(self.spool.load(new_queue_id()), KeyError)
        self.assertNotIsInstance(failure.value, CorruptEntryError)

    def test_check_writable(self):
        self.assertIs(self.successResultOf(self.spool.check_writable()), True)
        self.assertEqual(self.names("tmp"), [])

    def test_check_writable_fails(self):
        os.rmdir(os.path.join(self.path, "tmp"))
        with open(os.path.join(self.path, "tmp"), "w"):
            pass  # a file where the directory should be: fails for root too
        why = self.successResultOf(self.spool.check_writable())
        self.assertEqual(why, "spool %s not writable: Not a directory (ENOTDIR)" % self.path)
        self.flushLoggedErrors()


class DiskFullRunner:
    """A synchronous runner whose writes fail with ENOSPC (or EIO) while full is set."""

    WRITES = ("_write_entry", "_write_file", "_probe", "_commit")

    def __init__(self):
        self.full = None  # None, or the errno to fail writes with

    def __call__(self, f, *args):
        if self.full is not None and f.__name__ in self.WRITES:
            return defer.fail(OSError(self.full, os.strerror(self.full)))
        return sync_runner(f, *args)


class DiskFullTests(SpoolTestMixin, TestCase):
    """Writes failing like a full disk: every enqueue fails (never a commit), then recovery."""

    def setUp(self):
        self.runner = DiskFullRunner()
        SpoolTestMixin.setUp(self)

    def test_full_disk_fails_every_write_and_says_why_until_space_returns(self):
        _, kept = self.enqueue()
        self.runner.full = errno.ENOSPC
        failure = self.failureResultOf(self.spool.enqueue(make_envelope(), BODY), OSError)
        self.assertEqual(failure.value.errno, errno.ENOSPC)
        self.assertEqual(self.successResultOf(self.spool.check_writable()),
                         "spool %s not writable: No space left on device (ENOSPC)" % self.path)
        self.failureResultOf(self.spool.save_state(kept, b"x"), OSError)
        self.assertEqual(self.names("active"), [kept])  # nothing half-written appeared
        self.assertEqual(self.names("tmp"), [])
        self.runner.full = None  # space is back
        self.assertEqual(self.successResultOf(self.spool.check_writable()),
                         "spool %s: the last write failed: No space left on device (ENOSPC)" % self.path)
        _, second = self.enqueue()
        self.assertIs(self.successResultOf(self.spool.check_writable()), True)
        self.assertEqual(sorted(self.names("active")), sorted([kept, second]))
        self.flushLoggedErrors()

    def test_watchers_hear_every_failure(self):
        heard = []
        self.spool.watch_writes(heard.append)
        self.enqueue()
        self.runner.full = errno.ENOSPC
        for _ in range(2):
            self.failureResultOf(self.spool.enqueue(make_envelope(), BODY), OSError)
        self.runner.full = None
        self.enqueue()
        self.enqueue()
        why = "spool %s: the last write failed: No space left on device (ENOSPC)" % self.path
        self.assertEqual(heard, [why, why])
        self.flushLoggedErrors()

    def test_io_error_too(self):
        self.runner.full = errno.EIO
        self.failureResultOf(self.spool.enqueue(make_envelope(), BODY), OSError)
        self.assertIn("Input/output error (EIO)", self.spool.write_error)
        self.flushLoggedErrors()


class DurabilityOrderTests(SpoolTestMixin, TestCase):
    """The Deferred of enqueue fires only after data fdatasync, rename and directory fsync."""

    def record_syscalls(self, unlink=False):
        calls, paths = [], {}
        names = ("open", "fdatasync", "fsync", "rename", "close", "unlink")
        real = {name: getattr(os, name) for name in names}

        def fake_open(path, flags, *args, **kwargs):
            fd = real["open"](path, flags, *args, **kwargs)
            paths[fd] = os.path.relpath(path, self.path)
            return fd

        def fake_close(fd):
            paths.pop(fd, None)
            real["close"](fd)

        def fake_sync(name):
            def sync(fd):
                calls.append((name, paths.get(fd)))
                real[name](fd)

            return sync

        def fake_rename(src, dst):
            calls.append(("rename", os.path.relpath(src, self.path), os.path.relpath(dst, self.path)))
            real["rename"](src, dst)

        self.patch(spool_module.os, "open", fake_open)
        self.patch(spool_module.os, "close", fake_close)
        self.patch(spool_module.os, "fdatasync", fake_sync("fdatasync"))
        self.patch(spool_module.os, "fsync", fake_sync("fsync"))
        def fake_unlink(path):
            calls.append(("unlink", os.path.relpath(path, self.path)))
            real["unlink"](path)

        self.patch(spool_module.os, "rename", fake_rename)
        if unlink:
            self.patch(spool_module.os, "unlink", fake_unlink)
        return calls

    def test_enqueue_order(self):
        calls = self.record_syscalls()
        envelope = make_envelope()
        queue_id = envelope.queue_id
        d = self.spool.enqueue(envelope, BODY)
        d.addCallback(lambda _: calls.append(("fired",)))
        self.successResultOf(d)
        self.assertEqual(
            calls,
            [
                ("fdatasync", "tmp/" + queue_id),
                ("rename", "tmp/" + queue_id, "active/" + queue_id),
                ("fsync", "active"),
                ("fired",),
            ],
        )

    def test_move_and_remove_fsync_directories(self):
        _, queue_id = self.enqueue()
        calls = self.record_syscalls()
        d = self.spool.move(queue_id, "hold")
        d.addCallback(lambda _: calls.append(("fired",)))
        self.successResultOf(d)
        self.assertEqual(
            calls,
            [
                ("rename", "active/" + queue_id, "hold/" + queue_id),
                ("fsync", "hold"),
                ("fsync", "active"),
                ("fired",),
            ],
        )
        del calls[:]
        d = self.spool.remove(queue_id)
        d.addCallback(lambda _: calls.append(("fired",)))
        self.successResultOf(d)
        self.assertEqual(calls, [("fsync", "hold"), ("fired",)])

    def test_save_state_order(self):
        """fdatasync of the tmp file, rename over state/<id>, fsync of state/, only then the Deferred."""
        _, queue_id = self.enqueue()
        for data in (b'{"attempts": 1}', b'{"attempts": 2}'):  # the first creates, the second replaces
            calls = self.record_syscalls()
            d = self.spool.save_state(queue_id, data)
            d.addCallback(lambda _: calls.append(("fired",)))
            self.assertIsNone(self.successResultOf(d))
            self.assertEqual(len(calls), 4, calls)
            self.assertEqual(calls[0][0], "fdatasync")
            self.assertRegex(calls[0][1], r"\Atmp/%s\.state-[0-9a-f]{12}\Z" % queue_id)
            self.assertEqual(
                calls[1:], [("rename", calls[0][1], "state/" + queue_id), ("fsync", "state"), ("fired",)]
            )
            self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), data)

    def test_remove_makes_message_gone_durable_before_unlinking_state(self):
        """A crash in between must leave a state without a message (recover deletes it), never the reverse."""
        _, queue_id = self.enqueue()
        self.successResultOf(self.spool.save_state(queue_id, b"{}"))
        jobs = self.spool.commit_jobs
        calls = self.record_syscalls(unlink=True)
        d = self.spool.remove(queue_id)
        d.addCallback(lambda _: calls.append(("fired",)))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(
            calls,
            [
                ("unlink", "active/" + queue_id),
                ("fsync", "active"),
                ("unlink", "state/" + queue_id),
                ("fsync", "state"),
                ("fired",),
            ],
        )
        self.assertEqual(self.spool.commit_jobs, jobs + 2)

    def test_subscriber_hears_after_directory_fsync(self):
        calls = self.record_syscalls()
        self.spool.subscribe(lambda queue_id, state: calls.append(("notified", queue_id, state)))
        envelope = make_envelope()
        queue_id = envelope.queue_id
        d = self.spool.enqueue(envelope, BODY)
        d.addCallback(lambda _: calls.append(("fired",)))
        self.successResultOf(d)
        self.assertEqual(
            calls,
            [
                ("fdatasync", "tmp/" + queue_id),
                ("rename", "tmp/" + queue_id, "active/" + queue_id),
                ("fsync", "active"),
                ("notified", queue_id, "active"),
                ("fired",),
            ],
        )
        del calls[:]
        d = self.spool.move(queue_id, "deferred")
        d.addCallback(lambda _: calls.append(("fired",)))
        self.successResultOf(d)
        self.assertEqual(
            calls,
            [
                ("rename", "active/" + queue_id, "deferred/" + queue_id),
                ("fsync", "deferred"),
                ("fsync", "active"),
                ("notified", queue_id, "deferred"),
                ("fired",),
            ],
        )

    def test_not_fired_until_commit_job_ran(self):
        runner = QueuedRunner()
        self.spool = self.make_spool(runner)
        d = self.spool.enqueue(make_envelope(), BODY)
        self.assertNoResult(d)
        self.assertEqual(self.names("tmp"), [])  # the write is part of the commit job, not before it
        second = self.spool.enqueue(make_envelope(), BODY)
        third = self.spool.enqueue(make_envelope(), BODY)
        self.assertEqual(len(runner.jobs), 1)  # the others wait for the next commit job
        runner.run_one()
        self.successResultOf(d)
        self.assertNoResult(second)
        self.assertEqual(len(self.names("active")), 1)
        self.assertEqual(len(runner.jobs), 1)  # one job for both: writes, renames, one fsync of active/
        runner.run_one()
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(len(self.names("active")), 3)
        self.assertEqual(runner.jobs, [])


class StateTests(SpoolTestMixin, TestCase):
    """save_state / load_state: the scheduler's per-message delivery state, in state/<id>."""

    def state_path(self, queue_id):
        return os.path.join(self.path, "state", queue_id)

    def test_none_until_saved(self):
        _, queue_id = self.enqueue()
        self.assertIsNone(self.successResultOf(self.spool.load_state(queue_id)))
        self.assertIsNone(self.successResultOf(self.spool.load_state(new_queue_id())))

    def test_replace(self):
        _, queue_id = self.enqueue()
        self.successResultOf(self.spool.save_state(queue_id, b'{"attempts": 1, "done": []}'))
        self.successResultOf(self.spool.save_state(queue_id, b'{"attempts": 2}'))
        self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), b'{"attempts": 2}')
        with open(self.state_path(queue_id), "rb") as f:
            self.assertEqual(f.read(), b'{"attempts": 2}')  # plain bytes: readable with cat and jq
        self.assertEqual(os.stat(self.state_path(queue_id)).st_mode & 0o777, 0o600)
        self.assertEqual(self.names("state"), [queue_id])
        self.assertEqual(self.names("tmp"), [])
        self.assertEqual(self.names("active"), [queue_id])  # nothing next to the message

    def test_empty_large_and_mutable_data(self):
        _, queue_id = self.enqueue()
        self.successResultOf(self.spool.save_state(queue_id, b""))
        self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), b"")  # not None
        big = os.urandom(200_000)
        self.successResultOf(self.spool.save_state(queue_id, memoryview(big)))
        self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), big)
        runner = QueuedRunner()
        spool = self.make_spool(runner)
        data = bytearray(b"before")
        d = spool.save_state(queue_id, data)
        data[:] = b"changed"  # while the write waits for the pool
        runner.run_all()
        self.successResultOf(d)
        self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), b"before")

    def test_bad_arguments(self):
        _, queue_id = self.enqueue()
        self.assertRaises(TypeError, self.spool.save_state, queue_id, '{"text": "not bytes"}')
        for bad in ("../active/x", "x.state", ""):
            self.assertRaises(ValueError, self.spool.save_state, bad, b"{}")
            self.assertRaises(ValueError, self.spool.load_state, bad)

    def test_save_needs_the_message(self):
        """No state without a message: it would be an orphan (and what would it be about?)."""
        self.failureResultOf(self.spool.save_state(new_queue_id(), b"{}"), KeyError)
        self.assertEqual(self.names("state"), [])
        self.assertEqual(self.names("tmp"), [])

    def test_state_follows_the_message_through_moves(self):
        _, queue_id = self.enqueue()
        self.successResultOf(self.spool.save_state(queue_id, b"kept"))
        for state in ("deferred", "hold", "quarantine", "active"):
            self.successResultOf(self.spool.move(queue_id, state))
            self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), b"kept")
            self.successResultOf(self.spool.save_state(queue_id, b"kept"))  # saved in any state
        self.assertEqual(self.names("state"), [queue_id])

    def test_remove_deletes_state(self):
        _, queue_id = self.enqueue(state="deferred")
        self.successResultOf(self.spool.save_state(queue_id, b"{}"))
        self.successResultOf(self.spool.remove(queue_id))
        self.assertEqual(self.names("deferred"), [])
        self.assertEqual(self.names("state"), [])
        self.assertIsNone(self.successResultOf(self.spool.load_state(queue_id)))

    def test_remove_without_state_is_one_commit(self):
        _, queue_id = self.enqueue()
        jobs = self.spool.commit_jobs
        self.successResultOf(self.spool.remove(queue_id))
        self.assertEqual(self.spool.commit_jobs, jobs + 1)

    def test_state_removal_failure_is_logged_not_returned(self):
        """The message is durably gone, which is what the caller asked; recover() deletes the rest."""
        _, queue_id = self.enqueue()
        self.successResultOf(self.spool.save_state(queue_id, b"{}"))
        events = []
        self.patch(spool_module, "log", Logger(observer=events.append))

        def broken(root, queue_id):
            raise OSError(errno.EIO, "I/O error")

        self.patch(spool_module, "_op_remove_state", broken)
        self.assertIsNone(self.successResultOf(self.spool.remove(queue_id)))
        self.assertEqual(self.names("active"), [])
        [event] = [e for e in events if "log_failure" in e]
        self.assertEqual(event["queue_id"], queue_id)
        self.assertTrue(event["log_failure"].check(OSError))
        self.assertEqual(self.successResultOf(self.make_spool().recover()), 1)
        self.assertEqual(self.names("state"), [])

    def test_list_and_load_never_see_state_files(self):
        entries = [self.enqueue(state=s)[0] for s in ("active", "hold")]
        for envelope in entries:
            self.successResultOf(self.spool.save_state(envelope.queue_id, b"MGQ1 garbage"))
        listed = self.successResultOf(self.spool.list())
        self.assertEqual(listed, [("active", entries[0]), ("hold", entries[1])])
        self.assertEqual(self.successResultOf(self.spool.list("active")), [("active", entries[0])])
        self.assertEqual(self.successResultOf(self.spool.load(entries[0].queue_id))[2], BODY)
        self.assertEqual(self.successResultOf(self.make_spool().recover()), 0)
        self.assertEqual(self.names("corrupt"), [])
        self.assertEqual(self.names("state"), sorted(e.queue_id for e in entries))
        self.assertRaises(ValueError, self.spool.list, "state")
        self.assertRaises(ValueError, self.spool.move, entries[0].queue_id, "state")

    def test_readers_see_old_bytes_until_the_rename(self):
        _, queue_id = self.enqueue()
        self.successResultOf(self.spool.save_state(queue_id, b"old"))
        runner = QueuedRunner()
        spool = self.make_spool(runner)
        d = spool.save_state(queue_id, b"new")
        runner.run_one()  # the write: the new bytes are complete in tmp/, state/ is unchanged
        self.assertNoResult(d)
        self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), b"old")
        runner.run_one()  # the commit
        self.successResultOf(d)
        self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), b"new")
        self.assertEqual(self.names("tmp"), [])

    def test_saves_of_one_message_land_in_call_order(self):
        """A later save must win even if the pool would have finished its write first."""
        _, queue_id = self.enqueue()
        runner = QueuedRunner()
        spool = self.make_spool(runner)
        ds = [spool.save_state(queue_id, b"%d" % i) for i in range(3)]
        self.assertEqual(len(runner.jobs), 1)  # the second waits for the first to be committed
        runner.run_all()
        self.assertEqual(self.successResultOf(defer.gatherResults(ds)), [None] * 3)
        self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), b"2")
        self.assertEqual(spool._state_locks, {})  # nothing kept for messages not being saved

    def test_failed_save_does_not_block_the_next(self):
        _, queue_id = self.enqueue()
        real = os.fdatasync
        failures = [OSError(errno.EIO, "I/O error")]

        def flaky(fd):
            if failures:
                raise failures.pop()
            real(fd)

        self.patch(spool_module.os, "fdatasync", flaky)
        self.failureResultOf(self.spool.save_state(queue_id, b"lost"), OSError)
        self.successResultOf(self.spool.save_state(queue_id, b"kept"))
        self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), b"kept")
        self.assertEqual(self.names("tmp"), [])

    def test_concurrent_saves_share_directory_fsyncs(self):
        queue_ids = [self.enqueue()[1] for _ in range(30)]
        runner = QueuedRunner()
        spool = self.make_spool(runner)
        fsyncs = []
        real = os.fsync
        self.patch(spool_module.os, "fsync", lambda fd: fsyncs.append(fd) or real(fd))
        ds = [spool.save_state(q, q.encode()) for q in queue_ids]
        runner.run_all()
        self.successResultOf(defer.gatherResults(ds))
        self.assertLessEqual(spool.commit_jobs, 2)
        self.assertLessEqual(len(fsyncs), 2)
        for queue_id in queue_ids:
            self.assertEqual(self.successResultOf(self.spool.load_state(queue_id)), queue_id.encode())

    def test_save_racing_remove_leaves_no_orphan(self):
        """The rename of a save committed after remove() finds no message and fails."""
        _, queue_id = self.enqueue()
        runner = QueuedRunner()
        spool = self.make_spool(runner)
        saved = spool.save_state(queue_id, b"{}")  # its write waits in the pool
        removed = spool.remove(queue_id)  # its commit too
        runner.run_one(1)  # the removal is committed first
        runner.run_all()
        self.assertIsNone(self.successResultOf(removed))
        self.failureResultOf(saved, KeyError)
        self.assertEqual(self.names("state"), [])
        self.assertEqual(self.names("tmp"), [])


class SubscribeTests(SpoolTestMixin, TestCase):
    def setUp(self):
        SpoolTestMixin.setUp(self)
        self.heard = []
        self.unsubscribe = self.spool.subscribe(lambda queue_id, state: self.heard.append((queue_id, state)))

    def test_enqueue_notifies_after_commit(self):
        runner = QueuedRunner()
        spool = self.make_spool(runner)
        seen_on_disk = []
        spool.subscribe(
            lambda queue_id, state: seen_on_disk.append(os.path.exists(self.entry_path(queue_id, state)))
        )
        spool.subscribe(lambda queue_id, state: self.heard.append((queue_id, state)))
        envelope = make_envelope()
        d = spool.enqueue(envelope, BODY, "hold")
        self.assertEqual(self.heard, [])
        self.assertNoResult(d)
        runner.run_one()  # the commit: write, rename and fsync
        self.assertEqual(self.heard, [(envelope.queue_id, "hold")])
        self.assertEqual(seen_on_disk, [True])
        self.assertEqual(self.successResultOf(d), envelope.queue_id)

    def test_move_notifies_after_commit(self):
        _, queue_id = self.enqueue()
        del self.heard[:]
        runner = QueuedRunner()
        spool = self.make_spool(runner)
        spool.subscribe(lambda queue_id, state: self.heard.append((queue_id, state)))
        d = spool.move(queue_id, "deferred")
        self.assertEqual(self.heard, [])
        runner.run_one()
        self.assertEqual(self.heard, [(queue_id, "deferred")])
        self.successResultOf(d)

    def test_only_real_changes_are_announced(self):
        _, queue_id = self.enqueue()
        self.successResultOf(self.spool.move(queue_id, "active"))  # there already
        self.failureResultOf(self.spool.move(new_queue_id(), "active"), KeyError)
        self.successResultOf(self.spool.save_state(queue_id, b"{}"))
        self.successResultOf(self.spool.remove(queue_id))
        self.assertEqual(self.heard, [(queue_id, "active")])

    def test_failed_commit_is_not_announced(self):
        def broken(fd):
            raise OSError(errno.EIO, "I/O error")

        self.patch(spool_module.os, "fsync", broken)
        self.failureResultOf(self.spool.enqueue(make_envelope(), BODY), OSError)
        self.flushLoggedErrors()
        self.assertEqual(self.heard, [])

    def test_raising_subscriber_is_logged_and_harmless(self):
        events = []
        self.patch(spool_module, "log", Logger(observer=events.append))

        def bad(queue_id, state):
            raise ZeroDivisionError("subscriber bug")

        self.unsubscribe()
        self.spool.subscribe(bad)
        self.spool.subscribe(lambda queue_id, state: self.heard.append((queue_id, state)))
        envelope, queue_id = self.enqueue()
        self.assertEqual(queue_id, envelope.queue_id)
        self.assertIsNone(self.successResultOf(self.spool.move(queue_id, "hold")))
        self.assertEqual(self.heard, [(queue_id, "active"), (queue_id, "hold")])
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(
            [(e["queue_id"], e["state"]) for e in failures], [(queue_id, "active"), (queue_id, "hold")]
        )
        for event in failures:
            self.assertTrue(event["log_failure"].check(ZeroDivisionError))
            self.assertIs(event["subscriber"], bad)
        self.assertEqual(self.flushLoggedErrors(), [])  # nothing escaped into a Deferred

    def test_failing_deferred_of_a_subscriber_is_logged(self):
        events = []
        self.patch(spool_module, "log", Logger(observer=events.append))
        self.spool.subscribe(lambda queue_id, state: defer.fail(ValueError("later")))
        envelope, _ = self.enqueue()
        [event] = [e for e in events if "log_failure" in e]
        self.assertTrue(event["log_failure"].check(ValueError))
        self.assertEqual(event["queue_id"], envelope.queue_id)

    def test_unsubscribe(self):
        self.unsubscribe()
        self.unsubscribe()  # harmless twice
        self.enqueue()
        self.assertEqual(self.heard, [])

    def test_subscriber_may_use_the_queue(self):
        """What a scheduler does: hear of a message, load it, record state, deliver, remove it."""
        done = []

        @defer.inlineCallbacks
        def deliver(queue_id, state):
            yield self.spool.load(queue_id)
            yield self.spool.save_state(queue_id, b'{"delivered": true}')
            yield self.spool.remove(queue_id)
            done.append(queue_id)

        self.spool.subscribe(deliver)
        _, queue_id = self.enqueue()
        self.assertEqual(done, [queue_id])
        self.assertEqual(self.successResultOf(self.spool.list()), [])
        self.assertEqual(self.names("state"), [])


class MemoryQueueTests(TestCase):
    """The protocol tests' in-memory double follows the same contract."""

    def test_contract(self):
        from tests.smtphelp import MemoryQueue

        queue = MemoryQueue()
        self.assertTrue(verifyObject(IQueue, queue))
        heard = []

        def bad(queue_id, state):
            raise ZeroDivisionError()

        unsubscribe_bad = queue.subscribe(bad)
        unsubscribe = queue.subscribe(lambda queue_id, state: heard.append((queue_id, state)))
        envelope = make_envelope()
        self.assertEqual(self.successResultOf(queue.enqueue(envelope, BODY)), envelope.queue_id)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIsNone(self.successResultOf(queue.load_state(envelope.queue_id)))
        self.failureResultOf(queue.save_state(new_queue_id(), b"{}"), KeyError)
        self.successResultOf(queue.save_state(envelope.queue_id, b"{}"))
        self.assertEqual(self.successResultOf(queue.load_state(envelope.queue_id)), b"{}")
        self.successResultOf(queue.move(envelope.queue_id, "deferred"))
        self.assertEqual(self.successResultOf(queue.list("deferred")), [("deferred", envelope)])
        self.assertEqual(heard, [(envelope.queue_id, "active"), (envelope.queue_id, "deferred")])
        self.flushLoggedErrors(ZeroDivisionError)
        self.successResultOf(queue.remove(envelope.queue_id))
        self.assertIsNone(self.successResultOf(queue.load_state(envelope.queue_id)))
        unsubscribe()
        unsubscribe_bad()
        queue.hold = True
        d = queue.enqueue(make_envelope(), BODY, "hold")
        self.assertEqual(len(heard), 2)
        queue.release()
        self.successResultOf(d)
        self.assertEqual(len(heard), 2)


class GroupCommitTests(SpoolTestMixin, TestCase):
    def count_dir_fsyncs(self):
        counter = []
        real = os.fsync
        self.patch(spool_module.os, "fsync", lambda fd: counter.append(fd) or real(fd))
        return counter

    def test_concurrent_enqueues_share_directory_fsyncs(self):
        runner = QueuedRunner()
        self.spool = self.make_spool(runner)
        fsyncs = self.count_dir_fsyncs()
        envelopes = [make_envelope() for _ in range(40)]
        ds = [self.spool.enqueue(e, BODY) for e in envelopes]
        runner.run_all()
        self.assertEqual(self.successResultOf(defer.gatherResults(ds)), [e.queue_id for e in envelopes])
        self.assertLessEqual(len(fsyncs), 2)
        self.assertLessEqual(self.spool.commit_jobs, 2)
        self.assertEqual(self.names("active"), sorted(e.queue_id for e in envelopes))

    def test_batch_mixes_operations_and_isolates_failures(self):
        first, second = self.enqueue()[1], self.enqueue()[1]
        runner = QueuedRunner()
        self.spool = self.make_spool(runner)
        fsyncs = self.count_dir_fsyncs()
        blocker = self.spool.remove(first)  # keeps the committer busy so the rest queue up
        added = self.spool.enqueue(make_envelope(), BODY, "deferred")  # waits for the next commit
        moved = self.spool.move(second, "deferred")
        missing = self.spool.remove(new_queue_id())
        runner.run_all()
        self.successResultOf(blocker)
        self.successResultOf(moved)
        self.failureResultOf(missing, KeyError)
        self.successResultOf(added)
        self.assertEqual(self.spool.commit_jobs, 2)
        self.assertEqual(len(fsyncs), 1 + 2)  # active/ for the first job; deferred/ and active/
        self.assertEqual(self.names("active"), [])
        self.assertEqual(len(self.names("deferred")), 2)


    def test_failed_write_in_a_batch_fails_only_its_message(self):
        runner = QueuedRunner()
        self.spool = self.make_spool(runner)
        blocker = self.spool.enqueue(make_envelope(), BODY)  # the others share the next job
        clash = make_envelope()
        with open(os.path.join(self.path, "tmp", clash.queue_id), "wb") as f:
            f.write(b"another writer's file")  # O_EXCL makes this message's write fail
        good = make_envelope()
        failed, written = self.spool.enqueue(clash, BODY), self.spool.enqueue(good, BODY)
        runner.run_all()
        self.successResultOf(blocker)
        self.failureResultOf(failed, FileExistsError)
        self.assertEqual(self.successResultOf(written), good.queue_id)
        self.assertEqual(self.spool.commit_jobs, 2)
        self.assertNotIn(clash.queue_id, self.names("active"))
        self.assertEqual(self.names("tmp"), [clash.queue_id])  # the other writer's file is untouched


class CrashRecoveryTests(SpoolTestMixin, TestCase):
    def write(self, directory, name, content):
        with open(os.path.join(self.path, directory, name), "wb") as f:
            f.write(content)

    def good_entry_bytes(self, queue_id):
        envelope = make_envelope(queue_id)
        return spool_module._header(envelope.to_json(), BODY) + envelope.to_json() + b"\n" + BODY

    def test_leftovers_removed_and_corrupt_set_aside(self):
        good, _ = self.enqueue()
        self.write("tmp", new_queue_id(), self.good_entry_bytes("X")[:30])
        self.write("tmp", new_queue_id(), b"")
        truncated, garbage, empty, wrong_id, bad_json = (new_queue_id() for _ in range(5))
        self.write("active", truncated, self.good_entry_bytes(truncated)[:-1])
        self.write("active", garbage, os.urandom(300))
        self.write("deferred", empty, b"")
        self.write("hold", wrong_id, self.good_entry_bytes(new_queue_id()))
        body = b"{not json"
        self.write("active", bad_json, b"MGQ1 %d 0 00000000\n%s\n" % (len(body), body))
        self.write("active", good.queue_id + ".state", b"sidecar: left alone\n")
        os.mkdir(os.path.join(self.path, "quarantine", "a-directory"))

        events = []
        self.patch(spool_module, "log", Logger(observer=events.append))
        spool = self.make_spool()
        self.assertEqual(self.successResultOf(spool.recover()), 2 + 6)
        warnings = {e["queue_id"]: e for e in events if e["log_level"] == LogLevel.warn}
        bad = [truncated, garbage, empty, wrong_id, bad_json, "a-directory"]
        self.assertEqual(sorted(warnings), sorted(bad))
        self.assertEqual(warnings[truncated]["state"], "active")
        self.assertEqual(warnings[truncated]["moved_to"], os.path.join(self.path, "corrupt", truncated))
        self.assertIn("header says", warnings[truncated]["reason"])
        self.assertEqual(self.names("tmp"), [])
        self.assertEqual(
            self.names("corrupt"), sorted([truncated, garbage, empty, wrong_id, bad_json, "a-directory"])
        )
        self.assertEqual(self.successResultOf(spool.list()), [("active", good)])
        self.assertEqual(self.names("active"), sorted([good.queue_id, good.queue_id + ".state"]))
        self.assertEqual(self.successResultOf(spool.recover()), 0)

    def test_orphan_states_and_state_leftovers_removed(self):
        kept, kept_id = self.enqueue()
        self.successResultOf(self.spool.save_state(kept_id, b"kept"))
        orphan = new_queue_id()  # a crash between the two unlinks of remove()
        self.write("state", orphan, b"{}")
        self.write("tmp", kept_id + ".state-0123456789ab", b'{"half": ')  # a crash during save_state
        bad = new_queue_id()  # its message is set aside as corrupt: its state goes too
        self.write("active", bad, b"garbage")
        self.write("state", bad, b"{}")
        self.write("state", "not.an-id", b"someone else's")
        os.mkdir(os.path.join(self.path, "state", new_queue_id()))

        events = []
        self.patch(spool_module, "log", Logger(observer=events.append))
        spool = self.make_spool()
        self.assertEqual(self.successResultOf(spool.recover()), 1 + 1 + 2)
        [info] = [e for e in events if e["log_level"] == LogLevel.info]
        self.assertEqual((info["removed"], info["corrupt"], info["orphans"], info["entries"]), (1, 1, 2, 1))
        self.assertEqual(self.names("tmp"), [])
        self.assertEqual(self.names("corrupt"), [bad])
        self.assertEqual(len(self.names("state")), 3)
        self.assertNotIn(orphan, self.names("state"))
        self.assertNotIn(bad, self.names("state"))
        self.assertIn("not.an-id", self.names("state"))
        self.assertEqual(self.successResultOf(spool.load_state(kept_id)), b"kept")
        self.assertEqual(self.successResultOf(spool.list()), [("active", kept)])
        self.assertEqual(self.successResultOf(spool.recover()), 0)

    def test_old_spool_gets_a_state_directory(self):
        os.rmdir(os.path.join(self.path, "state"))
        self.assertEqual(self.successResultOf(self.make_spool().recover()), 0)
        self.assertTrue(os.path.isdir(os.path.join(self.path, "state")))

    def test_corrupt_never_overwrites_older_corrupt(self):
        queue_id = new_queue_id()
        self.write("corrupt", queue_id, b"older")
        self.write("active", queue_id, b"newer garbage")
        self.assertEqual(self.successResultOf(self.make_spool().recover()), 1)
        self.assertEqual(self.names("corrupt"), [queue_id, queue_id + ".1"])
        with open(os.path.join(self.path, "corrupt", queue_id), "rb") as f:
            self.assertEqual(f.read(), b"older")

    def test_crc_mismatch_on_load(self):
        envelope, queue_id = self.enqueue()
        with open(self.entry_path(queue_id), "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"XYZ")
        failure = self.failureResultOf(self.spool.load(queue_id), CorruptEntryError)
        self.assertEqual(failure.value.reason, "crc mismatch")
        self.assertEqual(failure.value.moved_to, os.path.join(self.path, "corrupt", queue_id))
        self.assertIsInstance(failure.value, KeyError)  # callers that skip missing ids skip it too
        self.assertEqual(self.names("active"), [])
        self.assertEqual(self.names("corrupt"), [queue_id])
        self.assertEqual(self.successResultOf(self.spool.list()), [])
        self.assertNotIsInstance(self.failureResultOf(self.spool.load(queue_id)).value, CorruptEntryError)

    def test_list_sets_aside_entries_gone_bad(self):
        envelope, _ = self.enqueue()
        bad = new_queue_id()
        self.write("active", bad, b"MGQ1 1 1 0000")
        self.assertEqual(self.successResultOf(self.spool.list()), [("active", envelope)])
        self.assertEqual(self.names("corrupt"), [bad])


class WriteErrorTests(SpoolTestMixin, TestCase):
    def break_syscall(self, name, error_number=errno.ENOSPC):
        """Named so as not to hide TestCase.fail, which failureResultOf calls."""
        def broken(*args, **kwargs):
            raise OSError(error_number, os.strerror(error_number))

        self.patch(spool_module.os, name, broken)

    def assertNothingQueued(self, d):
        self.failureResultOf(d, OSError)
        self.flushLoggedErrors()
        for directory in ("tmp",) + STATE_DIRS:
            self.assertEqual(self.names(directory), [], directory)

    def test_writev_fails(self):
        self.break_syscall("writev")
        self.assertNothingQueued(self.spool.enqueue(make_envelope(), BODY))

    def test_partial_writes_are_completed(self):
        real = os.writev
        self.patch(spool_module.os, "writev", lambda fd, bufs: real(fd, [bytes(bufs[0])[:7]]))
        envelope, queue_id = self.enqueue()
        self.assertEqual(self.successResultOf(self.spool.load(queue_id))[2], BODY)

    def test_fdatasync_fails(self):
        self.break_syscall("fdatasync", errno.EIO)
        self.assertNothingQueued(self.spool.enqueue(make_envelope(), BODY))

    def test_rename_fails(self):
        self.break_syscall("rename", errno.EIO)
        self.assertNothingQueued(self.spool.enqueue(make_envelope(), BODY))

    def test_directory_fsync_fails(self):
        """The rename happened but is not durable: the client gets 451, so the entry must go."""
        self.break_syscall("fsync", errno.EIO)
        self.assertNothingQueued(self.spool.enqueue(make_envelope(), BODY))

    def test_tmp_not_a_directory(self):
        os.rmdir(os.path.join(self.path, "tmp"))
        with open(os.path.join(self.path, "tmp"), "w"):
            pass
        self.failureResultOf(self.spool.enqueue(make_envelope(), BODY), OSError)
        self.flushLoggedErrors()
        for directory in STATE_DIRS:
            self.assertEqual(self.names(directory), [])

    def test_duplicate_write_keeps_other_file(self):
        """O_EXCL: a second writer of the same id fails and does not delete the first one's file."""
        envelope = make_envelope()
        self.write_tmp(envelope.queue_id)
        self.failureResultOf(self.spool.enqueue(envelope, BODY), OSError)
        self.flushLoggedErrors()
        self.assertEqual(self.names("tmp"), [envelope.queue_id])

    def write_tmp(self, name):
        with open(os.path.join(self.path, "tmp", name), "wb") as f:
            f.write(b"being written")

    def test_runner_raising_does_not_wedge_commits(self):
        calls = []

        def flaky(f, *args):
            calls.append(f)
            if f is spool_module._commit and len(calls) == 1:
                raise RuntimeError("pool is gone")
            return sync_runner(f, *args)

        self.spool = self.make_spool(flaky)
        self.failureResultOf(self.spool.enqueue(make_envelope(), BODY), RuntimeError)
        self.flushLoggedErrors()
        self.enqueue()


class ThreadPoolTests(TestCase):
    """The real thing: a thread pool, the running reactor, 50 concurrent sessions."""

    def setUp(self):
        self.pool = ThreadPool(minthreads=1, maxthreads=8, name="spool-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    @defer.inlineCallbacks
    def test_concurrent_enqueue(self):
        spool = Spool(self.mktemp(), global_reactor, threadpool=self.pool)
        self.assertEqual((yield spool.recover()), 0)
        envelopes = [make_envelope() for _ in range(50)]
        bodies = [os.urandom(1000 + i * 97) for i in range(50)]
        ids = yield defer.gatherResults(
            [spool.enqueue(e, b) for e, b in zip(envelopes, bodies)], consumeErrors=True
        )
        self.assertEqual(ids, [e.queue_id for e in envelopes])
        listed = yield spool.list()
        self.assertEqual(listed, [("active", e) for e in envelopes])
        for envelope, body in list(zip(envelopes, bodies))[::7]:
            self.assertEqual((yield spool.load(envelope.queue_id)), ("active", envelope, body))
        self.assertLessEqual(spool.commit_jobs, 50)
        self.assertEqual(os.listdir(os.path.join(spool.path, "tmp")), [])

    @defer.inlineCallbacks
    def test_state_and_subscribers_with_a_pool(self):
        """Subscribers run on the reactor thread, never in the pool; saves of many messages overlap."""
        spool = Spool(self.mktemp(), global_reactor, threadpool=self.pool)
        yield spool.recover()
        threads = []
        spool.subscribe(lambda queue_id, state: threads.append(threading.current_thread()))
        envelopes = [make_envelope() for _ in range(20)]
        yield defer.gatherResults([spool.enqueue(e, BODY) for e in envelopes], consumeErrors=True)
        self.assertEqual(threads, [threading.main_thread()] * 20)
        ids = [e.queue_id for e in envelopes]
        saves = [spool.save_state(q, b"%d" % n) for q in ids for n in range(3)]
        yield defer.gatherResults(saves, consumeErrors=True)
        states = yield defer.gatherResults([spool.load_state(q) for q in ids])
        self.assertEqual(states, [b"2"] * 20)
        yield spool.move(ids[0], "hold")
        self.assertEqual(len(threads), 21)
        self.assertIs(threads[-1], threading.main_thread())
        yield defer.gatherResults([spool.remove(q) for q in ids])
        self.assertEqual(os.listdir(os.path.join(spool.path, "state")), [])

    @defer.inlineCallbacks
    def test_default_runner_uses_reactors_pool(self):
        pool = self.pool

        class Reactor:
            callFromThread = staticmethod(global_reactor.callFromThread)

            def getThreadPool(self):
                return pool

        spool = Spool(self.mktemp(), Reactor())
        yield spool.recover()
        envelope = make_envelope()
        yield spool.enqueue(envelope, BODY)
        self.assertEqual((yield spool.load(envelope.queue_id)), ("active", envelope, BODY))
        self.assertIs((yield spool.check_writable()), True)
