"""
[queue]: where accepted mail waits for delivery: the embedded spool (one node), or a PostgreSQL
database shared by several nodes (mailgate.queue.postgresql).
"""

import attr

from mailgate.config.schema import Key, _plain
from mailgate.config.types import Choice, Dsn, Duration, Int, Label, Path, _file_problem


@attr.s(frozen=True, slots=True)
class QueueConfig:
    backend = attr.ib(default="spool")  # "spool" | "postgresql"
    path = attr.ib(default=None)  # the spool; with postgresql, where the admin socket lives
    dsn = attr.ib(default=None)  # libpq connection string or URL (postgresql)
    password_file = attr.ib(default=None)  # read each time a connection is made
    node_id = attr.ib(default=None)  # this node's name in leases (None: the host name)
    lease = attr.ib(default=300.0)
    pool_size = attr.ib(default=4)


QUEUE_KEYS = {
    "backend": Key(
        Choice(("spool", "postgresql")), "spool",
        doc="Where accepted mail waits for delivery.  `spool` keeps each message and its "
        "envelope as files in a directory (one node).  `postgresql` keeps them in a PostgreSQL "
        "database that any number of nodes share: each node claims the mail it delivers with a "
        "lease, and takes over the mail of a node that stopped renewing its leases (see "
        "\"Several nodes\").  The database schema is made with `mailgate db-upgrade`.",
        example="postgresql",
    ),
    "path": Key(
        Path(optional=False), "/var/spool/mailgate",
        doc="The spool directory, created when missing; it must be writable by the user "
        "mailgate runs as.  With `backend = postgresql` no mail is kept there, but the admin "
        "socket is (unless `[admin] socket` is set).",
        example="/srv/mailgate/spool",
    ),
    "dsn": Key(
        Dsn(), "",
        doc="`backend = postgresql`: the database, as a libpq connection string "
        "(`host=db1 dbname=mailgate user=mailgate`) or URL.  Several hosts with "
        "`target_session_attrs=read-write` let the nodes follow a failover to a promoted "
        "standby.  A password in it is hidden by `check-config`; better keep it in "
        "`password_file`.  Required with `backend = postgresql`.",
        example="host=db1.example.com,db2.example.com dbname=mailgate user=mailgate "
        "target_session_attrs=read-write",
    ),
    "password_file": Key(
        Path(), "",
        doc="`backend = postgresql`: a file whose first line is the database password, read "
        "each time a connection is made (so a new password needs no restart).  It must exist "
        "and be readable.",
        example="/etc/mailgate/db.password",
    ),
    "node_id": Key(
        Label(), "",
        default_doc="not set: the machine's host name, up to its first dot",
        doc="`backend = postgresql`: this node's name in the leases it holds (shown by "
        "`mailgate queue list`).  Every gateway sharing a database needs its own; a gateway "
        "that starts gives up the leases left under its name by an earlier run of itself.",
        example="mx1",
    ),
    "lease": Key(
        Duration(), "5m",
        doc="`backend = postgresql`: how long a node's claim on a message lasts unless renewed "
        "(it is renewed every third of it while the node works on the message).  When a node "
        "dies, the others deliver its mail once its leases have run out: a shorter lease means a "
        "faster takeover, a longer one survives longer pauses of a node (a stalled VM, a "
        "network cut) without another node delivering the same mail.  At least 1s.",
        example="2m",
    ),
    "pool_size": Key(
        Int(1, 100), "4",
        doc="`backend = postgresql`: database connections (and threads) this node uses for "
        "the queue, plus one that listens for the other nodes' notices.  Concurrent sessions' "
        "commits are grouped, so a few are enough for hundreds of sessions.",
        example="8",
    ),
}


def _check_queue(values):
    if values["backend"] == "postgresql":
        if values["dsn"] is None:
            return "dsn", "required with backend = postgresql"
        if values["lease"] < 1:
            return "lease", "expected at least 1s, got %gs" % values["lease"]
        if values["password_file"] is not None:
            problem = _file_problem(values["password_file"])
            if problem:
                return "password_file", problem
    else:
        for key in ("dsn", "password_file"):
            if values[key] is not None:
                return key, "only used with backend = postgresql"
    return None


QUEUE = _plain("queue", QueueConfig, QUEUE_KEYS, check=_check_queue)
