"""
A throwaway PostgreSQL cluster for the tests: the machine's initdb, pg_ctl and postgres (Debian's
`postgresql` package, /usr/lib/postgresql/*/bin) in a temporary directory, listening on a unix
socket in that directory only (no TCP), run as `nobody` when the tests run as root (postgres
refuses to run as root).

    from tests import pgcluster
    cluster = pgcluster.shared()          # one per test process, started on first use
    dsn = cluster.new_database()          # a fresh, empty database for one test
    cluster.stop(); cluster.start()       # the database going away and coming back

shared() stops and deletes its cluster when the process exits.  A missing PostgreSQL is an error,
never a skip: .ci/run installs it.  Durability settings are relaxed (fsync off) since no test
pulls the power; the benchmark makes its own cluster with them on (durable=True).
"""

import atexit
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import threading

SUPERUSER = "postgres"
_PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresMissing(RuntimeError):
    pass


def pg_bin():
    """The directory holding initdb and pg_ctl (the newest installed version)."""
    for directory in sorted(glob.glob(_PG_BIN_GLOB), key=_version, reverse=True):
        if os.path.exists(os.path.join(directory, "initdb")):
            return directory
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    raise PostgresMissing("PostgreSQL's initdb was not found (%s): install the Debian package "
                          "postgresql (.ci/run does)" % _PG_BIN_GLOB)


def _version(directory):
    try:
        return int(directory.rstrip("/").split("/")[-2])
    except ValueError:
        return 0


class Cluster:
    """One PostgreSQL server in its own temporary directory."""

    def __init__(self, durable=False, settings=None, init=True):
        self.bin = pg_bin()
        self.root = tempfile.mkdtemp(prefix="mailgate-pg-")
        self.data = os.path.join(self.root, "data")
        self.socket_dir = self.root
        self.log = os.path.join(self.root, "postgres.log")
        self.port = 5432  # only names the socket file: there is no TCP listener
        self.durable = durable
        self.settings = dict(settings or {})
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._user = None
        if os.geteuid() == 0:
            self._user = "nobody"
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, self._user)
        self.running = False
        if init:
            args = ["-D", self.data, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"]
            self._run("initdb", *(args if durable else args + ["--no-sync"]))

    def standby(self):
        """A streaming replica of this (running) cluster, made by pg_basebackup; not started."""
        replica = Cluster(self.durable, self.settings, init=False)
        replica._run("pg_basebackup", "-h", self.socket_dir, "-p", str(self.port), "-U", SUPERUSER,
                     "-D", replica.data, "-R", "-X", "stream", "-c", "fast", "--no-sync")
        return replica

    def promote(self):
        self._run("pg_ctl", "-D", self.data, "-w", "-t", "60", "promote")

    def wait_replayed(self, primary, timeout=30.0):
        """Block until this standby has replayed everything the primary has written so far."""
        import time

        with primary.connect() as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while time.monotonic() < deadline:
                if conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[0]:
                    return
                time.sleep(0.05)
        raise RuntimeError("standby did not catch up within %gs" % timeout)

    def _command(self, name, *args):
        command = [os.path.join(self.bin, name)] + list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--"] + command
        return command

    def _run(self, name, *args, timeout=120):
        result = subprocess.run(self._command(name, *args), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=timeout, cwd=self.root, env=_env())
        if result.returncode != 0:
            raise RuntimeError("%s failed (%d):\n%s%s" % (name, result.returncode, result.stdout,
                                                          self.tail()))
        return result.stdout

    def options(self):
        values = {"listen_addresses": "''", "unix_socket_directories": "'%s'" % self.socket_dir,
                  "port": str(self.port), "max_connections": "200",
                  "shared_buffers": "32MB", "log_min_messages": "warning"}
        if not self.durable:
            values.update(fsync="off", full_page_writes="off", synchronous_commit="on")
        values.update(self.settings)
        return " ".join("-c %s=%s" % item for item in values.items())

    def start(self):
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "-o",
                  self.options(), "start")
        self.running = True
        return self

    def stop(self, mode="fast"):
        """Stop the server (mode: smart, fast or immediate, as pg_ctl -m)."""
        if self.running:
            self._run("pg_ctl", "-D", self.data, "-w", "-t", "60", "-m", mode, "stop")
            self.running = False

    def destroy(self):
        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def tail(self, lines=30):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def dsn(self, dbname="postgres", **extra):
        parts = {"host": self.socket_dir, "port": self.port, "dbname": dbname, "user": SUPERUSER}
        parts.update(extra)
        return " ".join("%s=%s" % item for item in parts.items())

    def connect(self, dbname="postgres", **kw):
        import psycopg

        return psycopg.connect(self.dsn(dbname), autocommit=True, **kw)

    def new_database(self, prefix="t"):
        """CREATE DATABASE with a fresh name; returns its DSN."""
        with self._lock:
            name = "%s%d_%d" % (prefix, os.getpid(), next(self._names))
        with self.connect() as conn:
            conn.execute('CREATE DATABASE "%s" TEMPLATE template0' % name)
        return self.dsn(name)

    def drop_database(self, dsn):
        name = dict(item.split("=", 1) for item in dsn.split())["dbname"]
        with self.connect() as conn:
            conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


_shared = None
_shared_lock = threading.Lock()


def shared():
    """The test process's cluster, started on first use and removed when the process exits."""
    global _shared
    with _shared_lock:
        if _shared is None:
            cluster = Cluster()
            atexit.register(cluster.destroy)
            cluster.start()
            _shared = cluster
        elif not _shared.running:
            _shared.start()
        return _shared
