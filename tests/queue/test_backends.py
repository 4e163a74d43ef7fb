"""
The shared behaviour of the queue backends (tests/queue/backends.py) run against the spool and
against PostgreSQL, and what only the shared queue has: leases that run out, several nodes,
notices between them, the schema check, and the database going away and coming back.
"""

import os

from twisted.internet import defer, task
from twisted.internet import reactor as global_reactor
from twisted.trial.unittest import TestCase

from mailgate.config import QueueConfig
from mailgate.queue import Spool, migrations
from mailgate.queue.claims import LeaseLost, QueueUnavailable
from mailgate.queue.pgpool import SchemaMismatch
from mailgate.queue.postgresql import PostgresQueue
from tests import pgcluster
from tests.queue.backends import BODY, QueueBehaviour, make_envelope, state_bytes, wait_for


class SpoolBehaviourTests(QueueBehaviour, TestCase):
    def make_queue(self):
        spool = Spool(os.path.abspath(self.mktemp()), global_reactor)
        return spool.recover().addCallback(lambda _: spool)


def upgraded(dsn):
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as connection:
        migrations.upgrade(connection)
    return dsn


def pg_queue(test, dsn, node_id="node-a", lease=60.0, pool_size=3):
    queue = PostgresQueue(QueueConfig(backend="postgresql", dsn=dsn, node_id=node_id, lease=lease,
                                      pool_size=pool_size), global_reactor, "/etc/mailgate.ini")
    test.addCleanup(queue.close)
    return queue


def sql(dsn, statement, args=()):
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(statement, args)
        return cursor.fetchall() if cursor.description else None


class PostgresTestMixin:
    timeout = 120

    def new_dsn(self):
        cluster = pgcluster.shared()
        dsn = upgraded(cluster.new_database())
        self.addCleanup(cluster.drop_database, dsn)
        return dsn

    def make_queue(self):
        self.dsn = self.new_dsn()
        queue = pg_queue(self, self.dsn)
        return queue.recover().addCallback(lambda _: queue)


class PostgresBehaviourTests(PostgresTestMixin, QueueBehaviour, TestCase):
    @defer.inlineCallbacks
    def test_per_recipient_rows_and_a_body_written_once(self):
        envelope = yield self.enqueue()
        queue_id = envelope.queue_id
        before = sql(self.dsn, "SELECT xmin::text FROM mailgate_bodies WHERE queue_id = %s", (queue_id,))
        claim = yield self.queue.claim(queue_id)
        yield self.queue.renew([claim])
        data = state_bytes(envelope, attempts=1)
        yield self.queue.save_state(queue_id, data, claim=claim)
        yield self.queue.move(queue_id, "deferred", claim=claim)
        rows = sql(self.dsn, "SELECT address, outcome FROM mailgate_recipients WHERE queue_id = %s "
                   "ORDER BY position", (queue_id,))
        self.assertEqual(rows, [("bob@example.com", "pending"), ("carol@example.com", "pending")])
        after = sql(self.dsn, "SELECT xmin::text FROM mailgate_bodies WHERE queue_id = %s", (queue_id,))
        self.assertEqual(before, after)  # no delivery bookkeeping rewrote the body's row

    @defer.inlineCallbacks
    def test_concurrent_sessions_share_commits(self):
        jobs = self.queue.commit_jobs
        yield defer.gatherResults([self.queue.enqueue(make_envelope(), BODY) for _ in range(60)])
        self.assertLess(self.queue.commit_jobs - jobs, 60)

    @defer.inlineCallbacks
    def test_a_bad_message_in_a_batch_fails_alone(self):
        taken = make_envelope()
        yield self.enqueue(taken)
        results = yield defer.DeferredList([self.queue.enqueue(e, BODY) for e in
                                            (make_envelope(), taken, make_envelope())],
                                           consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False, True])


class TwoNodesTests(PostgresTestMixin, TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.a = yield self.make_queue()
        self.b = pg_queue(self, self.dsn, node_id="node-b")
        yield self.b.recover()

    @defer.inlineCallbacks
    def test_a_lease_that_runs_out_is_taken_over(self):
        envelope = make_envelope()
        yield self.a.enqueue(envelope, BODY)
        claim_a = yield self.a.claim(envelope.queue_id)
        self.assertIsNone((yield self.b.claim(envelope.queue_id)))
        self.assertEqual((yield self.b.holders([envelope.queue_id]))[envelope.queue_id][0], "node-a")
        # node-a stops renewing (a paused VM): its lease runs out.
        sql(self.dsn, "UPDATE mailgate_messages SET lease_until = now() - interval '1 second'")
        due = yield self.b.claim_due(2e9, 10)
        self.assertEqual([(c.queue_id, c.owner) for c in due.claims], [(envelope.queue_id, "node-b")])
        # node-a wakes up: nothing it records lands, and it learns it lost the message.
        yield self.assertFailure(self.a.save_state(envelope.queue_id, state_bytes(envelope),
                                                   claim=claim_a), LeaseLost)
        self.assertEqual((yield self.a.renew([claim_a])), [envelope.queue_id])
        yield self.b.save_state(envelope.queue_id, state_bytes(envelope, attempts=1),
                                claim=due.claims[0])

    @defer.inlineCallbacks
    def test_nodes_claim_disjoint_work(self):
        envelopes = [make_envelope() for _ in range(30)]
        yield defer.gatherResults([self.a.enqueue(e, BODY) for e in envelopes])
        results = yield defer.gatherResults([q.claim_due(2e9, 7) for q in (self.a, self.b) * 3])
        claimed = [c.queue_id for due in results for c in due.claims]
        self.assertEqual(len(claimed), len(set(claimed)))
        self.assertEqual(len(claimed), 30)

    @defer.inlineCallbacks
    def test_new_mail_and_flush_wake_the_other_node(self):
        heard = []
        woken = defer.Deferred()

        def due():
            heard.append(1)
            if len(heard) >= 2 and not woken.called:
                woken.callback(None)

        yield self.wait_listening(self.b)
        self.b.on_due(due)
        own = []
        self.a.on_due(lambda: own.append(1))
        envelope = make_envelope()
        yield self.a.enqueue(envelope, BODY)
        yield self.a.make_due([envelope.queue_id], 1.0)
        yield wait_for(woken)
        self.assertEqual(own, [])  # a node does not wake itself

    @defer.inlineCallbacks
    def wait_listening(self, queue):
        for _ in range(200):
            if queue.listener.connected:
                return
            yield task.deferLater(global_reactor, 0.05, lambda: None)
        self.fail("never listening: %s" % (queue.listener.problem,))

    @defer.inlineCallbacks
    def test_make_due_makes_a_deferred_message_due_everywhere(self):
        envelope = make_envelope()
        yield self.a.enqueue(envelope, BODY)
        yield self.a.move(envelope.queue_id, "deferred")
        yield self.a.save_state(envelope.queue_id, state_bytes(envelope, next_attempt=5000.0))
        self.assertEqual((yield self.b.claim_due(1000.0, 10)).claims, ())
        yield self.a.make_due([envelope.queue_id], 1000.0)
        self.assertEqual(len((yield self.b.claim_due(1000.0, 10)).claims), 1)
        self.assertEqual(float((yield self.b.load_state(envelope.queue_id)).decode().split(
            '"next_attempt": ')[1].split(",")[0]), 1000.0)

    @defer.inlineCallbacks
    def test_a_restarted_node_gives_up_its_old_leases(self):
        envelope = make_envelope()
        yield self.a.enqueue(envelope, BODY)
        yield self.a.claim(envelope.queue_id)
        self.a.close()  # kill -9 and start again, under the same node id
        again = pg_queue(self, self.dsn, node_id="node-a")
        self.assertEqual((yield again.recover()), 1)
        self.assertIsNotNone((yield self.b.claim(envelope.queue_id)))


class SchemaTests(TestCase):
    timeout = 120

    def setUp(self):
        self.cluster = pgcluster.shared()
        self.dsn = self.cluster.new_database()
        self.addCleanup(self.cluster.drop_database, self.dsn)

    def test_upgrade_records_each_migration(self):
        import psycopg

        said = []
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            self.assertEqual(migrations.current_version(connection), 0)
            self.assertEqual(migrations.upgrade(connection, say=said.append),
                             (0, migrations.SCHEMA_VERSION))
            self.assertEqual(migrations.upgrade(connection), (migrations.SCHEMA_VERSION,) * 2)
        self.assertEqual(len(said), migrations.SCHEMA_VERSION)
        rows = sql(self.dsn, "SELECT version FROM mailgate_schema ORDER BY version")
        self.assertEqual([r[0] for r in rows], [v for v, _, _ in migrations.MIGRATIONS])

    @defer.inlineCallbacks
    def test_no_schema_refuses_with_the_command_to_run(self):
        queue = pg_queue(self, self.dsn)
        failure = yield self.assertFailure(queue.recover(), SchemaMismatch)
        self.assertEqual(str(failure), "the database has no mailgate schema: run "
                                       "`mailgate db-upgrade --config /etc/mailgate.ini`")

    @defer.inlineCallbacks
    def test_schema_behind_or_ahead(self):
        upgraded(self.dsn)
        sql(self.dsn, "INSERT INTO mailgate_schema (version, description) VALUES (99, 'future')")
        queue = pg_queue(self, self.dsn)
        failure = yield self.assertFailure(queue.recover(), SchemaMismatch)
        self.assertIn("newer than this mailgate", str(failure))
        self.assertEqual(migrations.mismatch(0, "x.ini").split(": ")[1], "run `mailgate db-upgrade --config x.ini`")
        self.assertIn("this mailgate needs %d" % migrations.SCHEMA_VERSION,
                      migrations.mismatch(migrations.SCHEMA_VERSION - 1) if migrations.SCHEMA_VERSION > 1
                      else "this mailgate needs 1")


class OutageTests(TestCase):
    """The database stopped and started again: its own cluster, so others are not disturbed."""

    timeout = 180

    @defer.inlineCallbacks
    def test_unreachable_then_back(self):
        cluster = pgcluster.Cluster()
        self.addCleanup(cluster.destroy)
        cluster.start()
        dsn = upgraded(cluster.new_database())
        queue = pg_queue(self, dsn)
        yield queue.recover()
        yield queue.enqueue(make_envelope(), BODY)
        cluster.stop()
        yield self.assertFailure(queue.enqueue(make_envelope(), BODY), QueueUnavailable)
        problem = yield queue.check_writable()
        self.assertTrue(problem.startswith("database unreachable: "), problem)
        cluster.start()
        envelope = make_envelope()
        yield queue.enqueue(envelope, BODY)  # reconnected by itself
        self.assertEqual((yield queue.load(envelope.queue_id))[2], BODY)
        self.assertIs((yield queue.check_writable()), True)
        self.assertEqual(len((yield queue.list())), 2)


class FailoverTests(TestCase):
    """A multi-host DSN with target_session_attrs=read-write follows a promoted standby."""

    timeout = 240

    @defer.inlineCallbacks
    def test_promoted_standby(self):
        primary = pgcluster.Cluster()
        self.addCleanup(primary.destroy)
        primary.start()
        dsn = upgraded(primary.new_database())
        dbname = dsn.split("dbname=")[1].split()[0]
        standby = primary.standby()
        self.addCleanup(standby.destroy)
        standby.start()
        multi = "host=%s,%s port=%d,%d dbname=%s user=postgres target_session_attrs=read-write" % (
            standby.socket_dir, primary.socket_dir, standby.port, primary.port, dbname)
        queue = pg_queue(self, multi)
        yield queue.recover()
        self.assertIs((yield queue.check_writable()), True)  # the standby was skipped
        first = make_envelope()
        yield queue.enqueue(first, BODY)
        standby.wait_replayed(primary)
        primary.stop()
        standby.promote()
        for _ in range(60):  # the connections to the old primary fail once, then libpq moves on
            try:
                yield queue.enqueue(make_envelope(), BODY)
                break
            except QueueUnavailable:
                yield task.deferLater(global_reactor, 0.5, lambda: None)
        else:
            self.fail("never reconnected to the promoted standby")
        self.assertEqual((yield queue.load(first.queue_id))[2], BODY)
