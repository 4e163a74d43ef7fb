#!/usr/bin/env python3
"""
The queue backends side by side: the spool and PostgreSQL (a throwaway cluster with fsync on,
started here and removed afterwards; tests/pgcluster.py), in one run.

    .venv/bin/python bench/queue_bench.py [--messages 2000] [--size 4096] [--concurrency 50]

accept      N messages enqueued with C in flight at once, as C SMTP sessions would at end of
            data; each enqueue has fired (durably committed) before the next of its "session"
            starts.  msgs/s, and the latency of one enqueue (p50, p99).
end to end  the same N messages enqueued and delivered by the real scheduler (claim, load,
            record the outcome, remove) with a deliverer that answers 250 at once, so that
            what is measured is the queue's work per message, not a network: msgs/s from the
            first enqueue to the last removal.

Real fsyncs on both: the spool in a temporary directory on this disk (fdatasync, rename,
directory fsync, grouped), PostgreSQL with fsync=on and synchronous_commit=on, its WAL on the
same disk.  The numbers are this machine's; compare the rows, not the absolutes.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from mailgate.config import DeliveryConfig, GatewayConfig, QueueConfig, RouteConfig  # noqa: E402
from mailgate.delivery.scheduler import DeliveryService  # noqa: E402
from mailgate.envelope import Envelope, Hop, RecipientResult  # noqa: E402
from mailgate.queue import Spool, migrations, new_queue_id  # noqa: E402
from mailgate.queue.postgresql import PostgresQueue  # noqa: E402

ROUTE = RouteConfig(name="out", domains=("*",), smarthosts=(("127.0.0.1", 25),))


class Router:
    def route_for(self, domain):
        return ROUTE

    def hops(self, route, domain):
        return defer.succeed([Hop("sink.example", "127.0.0.1", 25)])


class Deliverer:
    def __init__(self):
        self.delivered = 0

    def deliver(self, route, hops, sender, recipients, data, transfer=None):
        self.delivered += len(recipients)
        return defer.succeed([RecipientResult(r, "delivered", 250, "2.0.0", "ok", hops[0])
                              for r in recipients])


class Config:
    def __init__(self):
        self.delivery = DeliveryConfig(concurrency=50, per_destination_concurrency=50)
        self.gateway = GatewayConfig(hostname="bench.example")


def envelope(size):
    return Envelope(queue_id=new_queue_id(), sender="bench@example.org",
                    recipients=("user@example.com",), client_ip="127.0.0.1",
                    received_at=time.time(), size=size)


@defer.inlineCallbacks
def accept(queue, messages, concurrency, body):
    latencies = []
    per_session = [messages // concurrency + (1 if i < messages % concurrency else 0)
                   for i in range(concurrency)]

    @defer.inlineCallbacks
    def session(count):
        for _ in range(count):
            started = time.perf_counter()
            yield queue.enqueue(envelope(len(body)), body)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    yield defer.gatherResults([session(n) for n in per_session])
    elapsed = time.perf_counter() - started
    latencies.sort()
    return messages / elapsed, latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]


@defer.inlineCallbacks
def end_to_end(reactor, queue, messages, concurrency, body):
    deliverer = Deliverer()
    service = DeliveryService(queue, Router(), deliverer, Config(), reactor, new_queue_id)
    service.startService()
    started = time.perf_counter()
    yield accept(queue, messages, concurrency, body)
    while deliverer.delivered < messages or (yield queue.list()):
        yield task.deferLater(reactor, 0.01, lambda: None)
    elapsed = time.perf_counter() - started
    service.stopService()
    return messages / elapsed


@defer.inlineCallbacks
def run(reactor, args):
    from tests import pgcluster
    import psycopg

    body = (b"X" * 76 + b"\r\n") * max(1, args.size // 78)
    rows = []
    spool_dir = tempfile.mkdtemp(prefix="mailgate-bench-spool-", dir=args.dir)
    cluster = pgcluster.Cluster(durable=True)
    try:
        cluster.start()
        for name in ("spool", "postgresql"):
            results = []
            for phase in ("accept", "e2e"):
                if name == "spool":
                    path = os.path.join(spool_dir, phase)
                    queue = Spool(path, reactor)
                else:
                    dsn = cluster.new_database()
                    with psycopg.connect(dsn, autocommit=True) as connection:
                        migrations.upgrade(connection)
                    queue = PostgresQueue(QueueConfig(backend="postgresql", dsn=dsn, node_id="bench",
                                                      pool_size=args.pool_size), reactor)
                yield queue.recover()
                if phase == "accept":
                    results.extend((yield accept(queue, args.messages, args.concurrency, body)))
                    jobs = getattr(queue, "commit_jobs", None)
                else:
                    results.append((yield end_to_end(reactor, queue, args.messages,
                                                      args.concurrency, body)))
                if hasattr(queue, "close"):
                    queue.close()
            rows.append((name, results, jobs))
    finally:
        cluster.destroy()
        shutil.rmtree(spool_dir, ignore_errors=True)
    print("%d messages of %d bytes, %d in flight%s" % (
        args.messages, len(body), args.concurrency,
        "; PostgreSQL pool_size %d" % args.pool_size))
    print()
    print("| backend | accept msgs/s | enqueue p50 | enqueue p99 | accept commits | end to end msgs/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (rate, p50, p99, e2e), jobs in rows:
        print("| %s | %.0f | %.1f ms | %.1f ms | %s | %.0f |" % (
            name, rate, p50 * 1000, p99 * 1000, jobs if jobs is not None else "-", e2e))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--concurrency", type=int, default=50, help="enqueues in flight")
    parser.add_argument("--pool-size", type=int, default=4, help="PostgreSQL [queue] pool_size")
    parser.add_argument("--dir", default=None, help="where the spool goes (default: $TMPDIR)")
    args = parser.parse_args()
    task.react(run, [args])


if __name__ == "__main__":
    main()
