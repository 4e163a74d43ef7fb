"""
protocol.log and tracking.log: the event bus (mailgate.events) written to disk as JSON Lines.

    logs = LogService(config.logging, reactor, events)   # an IService; needs logging.dir
    logs.setServiceParent(gateway)

Each line is one event: {"time": "2026-11-28T23:46:21.705Z", <the event's fields>}, time first
(ISO 8601 UTC, milliseconds, from the event's own "time"), None values left out, compact
separators, ASCII only (anything else \\u-escaped), so a line never holds a raw newline.

The reactor thread never touches the disk: the observer encodes the line and appends it to an
in-memory queue (bounded: past max_queue lines it drops them, counts them and says so in the
Twisted log; mail flow never waits for logs).  A writer thread takes the queue in batches, writes
them and flushes once per batch (no fsync).  threaded=False replaces the thread by flush(),
called by whoever runs the test.

Rotation (in the writer): before a line that would take a file past max_size, or the first line
of a later UTC day than the file's (the event's time decides), the file is renamed to
NAME.log.YYYYMMDDTHHMMSS (UTC, the time of that line; -1, -2, ... if taken) and a new one is
started.  Rotated files whose name is older than retention_days are deleted at each rotation and
at start.  stopService returns a Deferred that fires once everything queued so far is written.
"""

import collections
import datetime
import json
import os
import re
import threading

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

KINDS = ("protocol", "tracking")
MAX_QUEUE = 100000
_ROTATED = re.compile(r"^(protocol|tracking)\.log\.([0-9]{8}T[0-9]{6})(?:-([0-9]+))?$")
_STAMP = "%Y%m%dT%H%M%S"
_UTC = datetime.timezone.utc


# --- lines and files (shared with mailgate.ops.trace) --------------------------------------------


def iso_time(seconds):
    """POSIX seconds as 2026-11-28T23:46:21.705Z (to the nearest millisecond)."""
    millis = int(round(seconds * 1000))
    whole, millis = divmod(millis, 1000)
    stamp = datetime.datetime.fromtimestamp(whole, _UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return "%s.%03dZ" % (stamp, millis)


def _default(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)


def encode(fields, now=None):
    """One JSON line (bytes, with its newline) for an event's fields."""
    seconds = fields.get("time")
    record = {"time": iso_time(seconds if seconds is not None else now or 0.0)}
    for key, value in fields.items():
        if key != "time" and value is not None:
            record[key] = value
    return (json.dumps(record, separators=(",", ":"), default=_default) + "\n").encode("ascii")


def rotated_name(kind, seconds):
    stamp = datetime.datetime.fromtimestamp(int(seconds), _UTC).strftime(_STAMP)
    return "%s.log.%s" % (kind, stamp)


def _rotated(directory, kind):
    """[(rotation time, sequence, path)] of kind's rotated files, oldest first."""
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        match = _ROTATED.match(name)
        if match and match.group(1) == kind:
            when = datetime.datetime.strptime(match.group(2), _STAMP).replace(tzinfo=_UTC)
            sequence = int(match.group(3) or 0)
            found.append((when.timestamp(), sequence, os.path.join(directory, name)))
    return sorted(found)


def log_files(directory, kind):
    """
    [(start, end, path)] of kind's files, oldest first: the rotated ones, then kind.log.  start is
    the previous file's rotation time (None for the first), end the file's own (None for kind.log):
    every line of a file was written between the two.
    """
    files, start = [], None
    for when, _, path in _rotated(directory, kind):
        files.append((start, when, path))
        start = when
    current = os.path.join(directory, kind + ".log")
    if os.path.exists(current):
        files.append((start, None, current))
    return files


class LogFile:
    """One of the two logs, as the writer sees it (one thread only)."""

    def __init__(self, directory, kind, max_size, retention_days):
        self.directory = directory
        self.kind = kind
        self.path = os.path.join(directory, kind + ".log")
        self.max_size = max_size
        self.retention = retention_days * 86400.0
        self._file = None
        self._size = 0
        self._day = None  # the UTC day (POSIX days) of the file's lines; None while empty

    def write(self, entries):
        """entries: [(POSIX time, line bytes)], written in order, then flushed."""
        chunk = []
        for seconds, line in entries:
            if self._file is None:
                self._open()
            day = int(seconds // 86400)
            if self._size and (self._size + len(line) > self.max_size
                               or (self._day is not None and day > self._day)):
                self._file.write(b"".join(chunk))
                chunk = []
                self.rotate(seconds)
                self._open()
            if self._day is None or day > self._day:
                self._day = day
            chunk.append(line)
            self._size += len(line)
        if self._file is not None:
            self._file.write(b"".join(chunk))
            self._file.flush()

    def _open(self):
        # 0600: the logs name every sender and recipient (a new file only; the umask aside).
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "ab")
        info = os.fstat(self._file.fileno())
        self._size = info.st_size
        self._day = int(info.st_mtime // 86400) if info.st_size else None

    def rotate(self, seconds):
        """Rename the file to its rotated name (stamped seconds), then apply retention."""
        self.close()
        base = os.path.join(self.directory, rotated_name(self.kind, seconds))
        target, n = base, 0
        while os.path.exists(target):
            n += 1
            target = "%s-%d" % (base, n)
        if os.path.exists(self.path):
            os.rename(self.path, target)
        self.expire(seconds)

    def expire(self, now):
        """Delete rotated files older than the retention period (by their name's time)."""
        for when, _, path in _rotated(self.directory, self.kind):
            if when < now - self.retention:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass

    def close(self):
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None


# --- the service -------------------------------------------------------------------------------


class LogService(service.Service):
    """Writes the bus's protocol and tracking events to logging_config.dir, see above."""

    name = "logs"

    def __init__(self, logging_config, reactor, events, max_queue=MAX_QUEUE, threaded=True):
        self.config = logging_config
        self.reactor = reactor
        self.events = events
        self.max_queue = max_queue
        self.threaded = threaded
        self.dropped = 0  # lines dropped since start because the queue was full
        self.lost = 0  # lines that could not be written (disk errors)
        self._dropping = 0  # dropped in the current episode, not reported yet
        self._queue = collections.deque()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = None
        self._drained = None
        self._unsubscribe = None
        self._files = {}

    # -- lifecycle

    def startService(self):
        directory = self.config.dir
        os.makedirs(directory, mode=0o700, exist_ok=True)  # at start-up: failing loudly is right
        self._files = {kind: LogFile(directory, kind, self.config.max_size,
                                     self.config.retention_days) for kind in KINDS}
        self._stopping = False
        service.Service.startService(self)
        now = self.reactor.seconds()
        self._unsubscribe = self.events.subscribe(self._observe)
        if self.threaded:
            self._drained = defer.Deferred()
            self._thread = threading.Thread(target=self._run, args=(now,), daemon=True,
                                            name="mailgate-logs")
            self._thread.start()
        else:
            self._expire(now)

    def stopService(self):
        service.Service.stopService(self)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._report_dropped()
        if not self.threaded or self._thread is None:
            self.flush()
            self._close()
            return defer.succeed(None)
        with self._lock:
            self._stopping = True
            self._lock.notify()
        return self._drained

    # -- the reactor side

    def _observe(self, kind, fields):
        if kind not in self._files:
            return
        seconds = fields.get("time")
        if seconds is None:
            seconds = self.reactor.seconds()
        line = encode(fields, seconds)
        with self._lock:
            accepted = len(self._queue) < self.max_queue
            if accepted:
                self._queue.append((kind, seconds, line))
                self._lock.notify()
            else:
                self.dropped += 1
                self._dropping += 1
            episode = self._dropping
        if not accepted and episode == 1:
            log.warn("log queue full ({max} lines): dropping protocol and tracking lines",
                     max=self.max_queue)
        elif accepted and episode:
            self._report_dropped()

    def _report_dropped(self):
        with self._lock:
            count, self._dropping = self._dropping, 0
        if count:
            log.warn("log queue full: dropped {count} protocol and tracking lines", count=count)

    # -- the writer side

    def flush(self):
        """Write everything queued (the writer thread's job; tests call it with threaded=False)."""
        with self._lock:
            batch, self._queue = self._queue, collections.deque()
        if batch:
            self._write(batch)

    def _run(self, now):
        try:
            self._expire(now)
            while True:
                with self._lock:
                    while not self._queue and not self._stopping:
                        self._lock.wait()
                    batch, self._queue = self._queue, collections.deque()
                    done = self._stopping and not batch
                if batch:
                    self._write(batch)
                if done:
                    break
        except BaseException as e:  # a bug here must not leave stopService waiting forever
            self._tell(log.critical, "log writer stopped: {error!r}", error=e)
        finally:
            self._close()
            self.reactor.callFromThread(self._drained.callback, None)

    def _write(self, batch):
        by_kind = {}
        for kind, seconds, line in batch:
            by_kind.setdefault(kind, []).append((seconds, line))
        for kind, entries in by_kind.items():
            target = self._files[kind]
            try:
                target.write(entries)
            except Exception as e:
                target.close()  # reopened (and its size read again) at the next batch
                self.lost += len(entries)
                self._tell(log.error, "cannot write {path}: {error}; {count} lines lost",
                           path=target.path, error=str(e), count=len(entries))

    def _expire(self, now):
        for target in self._files.values():
            try:
                target.expire(now)
            except OSError as e:
                self._tell(log.error, "cannot apply log retention in {dir}: {error}",
                           dir=target.directory, error=str(e))

    def _close(self):
        for target in self._files.values():
            try:
                target.close()
            except OSError as e:
                self._tell(log.error, "cannot close {path}: {error}", path=target.path,
                           error=str(e))

    def _tell(self, method, text, **fields):
        """Log from the writer: through the reactor thread when there is a writer thread."""
        if self.threaded and threading.current_thread() is self._thread:
            self.reactor.callFromThread(method, text, **fields)
        else:
            method(text, **fields)
