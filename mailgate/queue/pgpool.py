"""
The PostgreSQL backend's connections: a bounded pool of psycopg 3 connections used from a
thread pool of the same size (never from the reactor thread), and one more connection, in a
thread of its own, that LISTENs for the other nodes' notices.

Why a pool of our own rather than twisted.enterprise.adbapi or psycopg_pool: the queue must tell
"the database cannot be reached" (QueueUnavailable: 451 to clients, 503 on /healthz, try again)
from every other error, drop a broken connection at once so that the next job connects afresh
(libpq then walks a multi-host DSN again, which is how a failover to a promoted standby is
followed), and check the schema version on every new connection.  That is a few dozen lines
here; adbapi would still need all of it wrapped around its own reconnect logic.

Database.run(job, *args) runs job(connection, *args) inside one transaction in a pool thread and
fires with its result.  Connection trouble (the server gone, shut down, restarting, a read-only
standby) closes that connection and fails the Deferred with QueueUnavailable; the next run
connects again.  Everything on the thread side touches no Deferred, reactor or logger.
"""

import collections
import queue as queues
import threading

from twisted.internet import threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailgate.queue.claims import QueueUnavailable

log = Logger()

CONNECT_TIMEOUT = 10  # seconds libpq may take to connect (per host of a multi-host DSN)
STATEMENT_TIMEOUT_MS = 60000  # a statement the server has not finished by then is cancelled
LISTEN_WAIT = 1.0  # how often the listening thread looks at its stop flag


class SchemaMismatch(QueueUnavailable):
    """The database's schema is not the one this mailgate needs (str: what to run)."""


def _psycopg():
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the postgresql extra is not installed
        raise QueueUnavailable("the postgresql backend needs psycopg 3: "
                               "pip install 'mailgate[postgresql]'") from None
    return psycopg


def _one_line(error):
    text = " ".join(str(error).split())
    return text or type(error).__name__


def is_connection_trouble(error):
    """Errors after which a connection must not be used again, and the job may be tried later."""
    psycopg = _psycopg()
    from psycopg import errors

    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError,
                              errors.ReadOnlySqlTransaction, errors.AdminShutdown,
                              errors.CannotConnectNow))


class Connector:
    """Opens connections to one DSN (password from password_file, read at each connect)."""

    def __init__(self, dsn, password_file=None, application_name="mailgate", check=None):
        self.dsn = dsn
        self.password_file = password_file
        self.application_name = application_name
        self.check = check  # check(connection) after connecting: raises to refuse it

    def _password(self):
        if self.password_file is None:
            return {}
        try:
            with open(self.password_file, encoding="utf-8-sig") as f:
                return {"password": f.readline().strip()}
        except OSError as e:
            raise QueueUnavailable("cannot read [queue] password_file %s: %s"
                                   % (self.password_file, e.strerror or e)) from None

    def connect(self, autocommit=True):
        psycopg = _psycopg()
        kwargs = dict(autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT,
                      application_name=self.application_name, keepalives=1, keepalives_idle=10,
                      keepalives_interval=5, keepalives_count=3,
                      options="-c statement_timeout=%d" % STATEMENT_TIMEOUT_MS)
        kwargs.update(self._password())
        try:
            connection = psycopg.connect(self.dsn, **kwargs)
        except psycopg.Error as e:
            raise QueueUnavailable("database unreachable: %s" % (_one_line(e),)) from None
        if self.check is not None:
            try:
                self.check(connection)
            except BaseException:
                connection.close()
                raise
        return connection


def _retryable(error):
    from psycopg import errors

    return isinstance(error, (errors.SerializationFailure, errors.DeadlockDetected))


class Database:
    """pool_size connections, used by pool_size threads; start() before run(), stop() after."""

    def __init__(self, reactor, connector, pool_size):
        self.reactor = reactor
        self.connector = connector
        self.size = pool_size
        self._threads = ThreadPool(minthreads=0, maxthreads=pool_size, name="mailgate-db")
        self._idle = queues.LifoQueue()  # connections not in use (the warmest first)
        self._lock = threading.Lock()
        self._open = set()
        self.connects = 0  # connections made, for tests and the benchmark
        self.started = False

    def start(self):
        if not self.started:
            self._threads.start()
            self.started = True

    def stop(self):
        """Stop the threads (waiting for running jobs) and close every connection."""
        if self.started:
            self.started = False
            self._threads.stop()
        with self._lock:
            connections, self._open = list(self._open), set()
        for connection in connections:
            try:
                connection.close()
            except Exception:
                pass

    def run(self, job, *args):
        """Deferred: job(connection, *args) in one transaction, in a pool thread."""
        if not self.started:
            from twisted.internet import defer

            return defer.fail(QueueUnavailable("the queue's database pool is not running"))
        return threads.deferToThreadPool(self.reactor, self._threads, self._job, job, args)

    def _take(self):
        try:
            return self._idle.get_nowait()
        except queues.Empty:
            pass
        connection = self.connector.connect()
        with self._lock:
            self._open.add(connection)
            self.connects += 1
        return connection

    def _drop(self, connection):
        with self._lock:
            self._open.discard(connection)
        try:
            connection.close()
        except Exception:
            pass

    def _job(self, job, args):
        for attempt in (1, 2):
            connection = self._take()
            try:
                with connection.transaction():
                    result = job(connection, *args)
            except Exception as e:
                if is_connection_trouble(e) or connection.closed:
                    self._drop(connection)
                    if isinstance(e, QueueUnavailable):
                        raise
                    raise QueueUnavailable("database unreachable: %s" % (_one_line(e),)) from None
                self._idle.put(connection)
                if attempt == 1 and _retryable(e):
                    continue
                raise
            self._idle.put(connection)
            return result
        raise AssertionError("not reached")  # pragma: no cover


class Listener:
    """
    One connection that LISTENs on channel, in a daemon thread of its own; each notice's payload
    goes to heard(payload) on the reactor thread, and heard(None) after every (re)connection
    (notices sent while nobody listened are lost: look at the queue again).  It reconnects by
    itself, waiting 1s, then up to 10s, between tries.
    """

    def __init__(self, reactor, connector, channel, heard):
        self.reactor = reactor
        self.connector = connector
        self.channel = channel
        self.heard = heard
        self._stop = threading.Event()
        self._thread = None
        self.connected = False
        self.problem = None  # the last connection error, or None while listening

    def start(self):
        self._thread = threading.Thread(target=self._run, name="mailgate-db-listen", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()

    def _run(self):
        wait = 1.0
        while not self._stop.is_set():
            connection = None
            try:
                connection = self.connector.connect()
                connection.execute("LISTEN %s" % (self.channel,))
                self.connected, self.problem, wait = True, None, 1.0
                self.reactor.callFromThread(self.heard, None)
                while not self._stop.is_set():
                    payloads = collections.deque(
                        n.payload for n in connection.notifies(timeout=LISTEN_WAIT))
                    for payload in payloads:
                        self.reactor.callFromThread(self.heard, payload)
            except Exception as e:
                self.connected = False
                self.problem = _one_line(e)
            finally:
                if connection is not None:
                    try:
                        connection.close()
                    except Exception:
                        pass
            if self._stop.wait(wait):
                break
            wait = min(wait * 2, 10.0)
        self.connected = False

