"""
The PostgreSQL queue's schema: numbered migrations, applied by `mailgate db-upgrade`, each in a
transaction of its own together with the row in mailgate_schema that records it.

A gateway never changes the schema itself.  It refuses to run on a schema that is behind (run
db-upgrade) or ahead (this mailgate is older than the database: upgrade mailgate) of
SCHEMA_VERSION, checked once at start-up and again on every new database connection.

Layout, and why:
- mailgate_messages: one row per message (state, envelope JSON, the message-level delivery state,
  and the lease: owner, token, until).  Everything that changes during delivery is here or in
  mailgate_recipients; the body is not.
- mailgate_bodies: the message bytes, a bytea written once by the INSERT of enqueue and never
  updated (so no lease renewal or state change copies it), deleted with the message.  bytea
  rather than a large object: it is written and removed in the same transaction as its message
  (a large object needs lo_unlink or a trigger, and leaks when forgotten), it streams to a
  standby with the rest, pg_dump takes it as is, and at [gateway] max_message_size (35M by
  default, under bytea's 1G) TOAST stores it out of line, compressed.
- mailgate_recipients: one row per recipient with its outcome, so recording one recipient's
  result touches that row only.
- mailgate_lease_token: every claim gets a new token, so a node can tell its claim from a later
  one on the same message, even one of its own.
"""

SCHEMA_TABLE = "mailgate_schema"
CHANNEL = "mailgate_queue"

MIGRATIONS = [
    (1, "messages, bodies, recipients and leases", """
CREATE TABLE mailgate_messages (
    queue_id     text PRIMARY KEY,
    state        text NOT NULL CHECK (state IN ('active', 'deferred', 'hold', 'quarantine')),
    envelope     text NOT NULL,
    size         bigint NOT NULL,
    received_at  double precision NOT NULL,
    has_state    boolean NOT NULL DEFAULT false,
    attempts     integer NOT NULL DEFAULT 0,
    next_attempt double precision NOT NULL DEFAULT 0,
    delay_warned boolean NOT NULL DEFAULT false,
    dkim         jsonb NOT NULL DEFAULT '{}',
    extra        jsonb NOT NULL DEFAULT '{}',
    lease_owner  text,
    lease_token  bigint,
    lease_until  timestamptz,
    queued_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mailgate_messages_due ON mailgate_messages (next_attempt)
    WHERE state IN ('active', 'deferred');
CREATE INDEX mailgate_messages_owner ON mailgate_messages (lease_owner)
    WHERE lease_owner IS NOT NULL;

CREATE TABLE mailgate_bodies (
    queue_id text PRIMARY KEY REFERENCES mailgate_messages ON DELETE CASCADE,
    data     bytea NOT NULL
);

CREATE TABLE mailgate_recipients (
    queue_id text NOT NULL REFERENCES mailgate_messages ON DELETE CASCADE,
    address  text NOT NULL,
    position integer NOT NULL,
    outcome  text NOT NULL DEFAULT 'pending',
    code     integer,
    status   text,
    text     text,
    remote   text,
    at       double precision,
    reported boolean NOT NULL DEFAULT false,
    extra    jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (queue_id, address)
);

CREATE SEQUENCE mailgate_lease_token;
"""),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def _create_schema_table(connection):
    connection.execute("""
        CREATE TABLE IF NOT EXISTS mailgate_schema (
            version     integer PRIMARY KEY,
            description text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )""")


def current_version(connection):
    """The schema version recorded in the database (0: none yet)."""
    row = connection.execute("SELECT to_regclass('mailgate_schema')").fetchone()
    if row[0] is None:
        return 0
    return connection.execute("SELECT coalesce(max(version), 0) FROM mailgate_schema").fetchone()[0]


def upgrade(connection, target=SCHEMA_VERSION, say=lambda text: None):
    """
    Apply every migration above the database's version up to target, each in its own
    transaction (with its row in mailgate_schema).  Concurrent upgrades wait for each other (an
    advisory lock).  Returns (version before, version after).
    """
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(hashtext('mailgate db-upgrade'))")
        _create_schema_table(connection)
    before = current_version(connection)
    if before > SCHEMA_VERSION:
        raise ValueError("the database's schema is at version %d, newer than this mailgate knows "
                         "(%d): upgrade mailgate" % (before, SCHEMA_VERSION))
    for version, description, sql in MIGRATIONS:
        if version <= before or version > target:
            continue
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(hashtext('mailgate db-upgrade'))")
            if current_version(connection) >= version:
                continue  # another db-upgrade did it meanwhile
            connection.execute(sql)
            connection.execute("INSERT INTO mailgate_schema (version, description) VALUES (%s, %s)",
                               (version, description))
        say("applied migration %d: %s" % (version, description))
    return before, current_version(connection)


def mismatch(version, config_path=None):
    """None when version is the one needed, else the one line that says what to do."""
    if version == SCHEMA_VERSION:
        return None
    command = "mailgate db-upgrade --config %s" % (config_path or "FILE")
    if version == 0:
        return "the database has no mailgate schema: run `%s`" % (command,)
    if version < SCHEMA_VERSION:
        return ("the database schema is at version %d, this mailgate needs %d: run `%s`"
                % (version, SCHEMA_VERSION, command))
    return ("the database schema is at version %d, newer than this mailgate (%d): upgrade "
            "mailgate on this node" % (version, SCHEMA_VERSION))


def _connect(queue_config):
    from mailgate.queue.pgpool import Connector

    return Connector(queue_config.dsn, queue_config.password_file, "mailgate db-upgrade").connect()


def upgrade_database(queue_config, say=print):
    """
    `mailgate db-upgrade`: bring the database of queue_config (a QueueConfig) to SCHEMA_VERSION.
    Returns (version before, version after); QueueUnavailable when it cannot be reached,
    ValueError when its schema is newer than this mailgate.
    """
    connection = _connect(queue_config)
    try:
        return upgrade(connection, say=say)
    finally:
        connection.close()


def check_database(queue_config, config_path):
    """
    At start-up (blocking: before the reactor runs): None when the database's schema is the one
    needed, else the one line saying what to run.  QueueUnavailable when it cannot be reached.
    """
    connection = _connect(queue_config)
    try:
        return mismatch(current_version(connection), config_path)
    finally:
        connection.close()
