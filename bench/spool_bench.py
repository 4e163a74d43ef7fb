"""
How fast the spool accepts messages durably: N messages of a given size, `concurrency` sessions at a
time, through a real thread pool, each counted only once its Deferred fired (i.e. when the SMTP client
would get its 250).  Prints messages/second and how many fsyncs each message cost.

    python bench/spool_bench.py [-n 2000] [--size 10240] [--concurrency 50] [--threads 50] [--path DIR]
"""

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import threading
import time

from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool

from mailgate.envelope import Envelope
from mailgate.queue import Spool, new_queue_id
from mailgate.queue import spool as spool_module


class CallCounter:
    """Counts calls of os.<name> made by the spool (it calls them through its os module)."""

    def __init__(self, name):
        self.calls = 0
        self._lock = threading.Lock()
        real = getattr(os, name)

        def counted(*args):
            with self._lock:
                self.calls += 1
            return real(*args)

        setattr(spool_module.os, name, counted)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10 * 1024, help="message size in bytes")
    parser.add_argument("--concurrency", type=int, default=50, help="sessions in flight")
    parser.add_argument("--threads", type=int, default=None, help="thread pool size (default: concurrency)")
    parser.add_argument("--path", default=None, help="spool directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the spool directory afterwards")
    return parser.parse_args(argv)


@defer.inlineCallbacks
def session(spool, body, remaining, latencies):
    """One SMTP session's worth of accepts, back to back."""
    while next(remaining) > 0:
        envelope = Envelope(
            new_queue_id(), "sender@example.org", ["rcpt@example.com"], "192.0.2.1", size=len(body)
        )
        started = time.perf_counter()
        yield spool.enqueue(envelope, body)
        latencies.append(time.perf_counter() - started)


@defer.inlineCallbacks
def run(reactor, options):
    threads = options.threads or options.concurrency
    path = options.path or tempfile.mkdtemp(prefix="spool-bench-")
    pool = ThreadPool(minthreads=threads, maxthreads=threads, name="spool-bench")
    pool.start()
    fdatasyncs, fsyncs = CallCounter("fdatasync"), CallCounter("fsync")
    try:
        spool = Spool(path, reactor, threadpool=pool)
        yield spool.recover()
        base_data, base_dir, base_jobs = fdatasyncs.calls, fsyncs.calls, spool.commit_jobs
        body = (b"X" * 76 + b"\r\n") * (options.size // 78) + b"Y" * (options.size % 78)
        remaining = itertools.count(options.messages, -1)
        latencies = []
        started = time.perf_counter()
        yield defer.gatherResults(
            [session(spool, body, remaining, latencies) for _ in range(options.concurrency)],
            consumeErrors=True,
        )
        elapsed = time.perf_counter() - started
        counts = (fdatasyncs.calls - base_data, fsyncs.calls - base_dir, spool.commit_jobs - base_jobs)
        report(options, threads, path, elapsed, latencies, *counts)
    finally:
        pool.stop()
        if not options.keep and not options.path:
            shutil.rmtree(path, ignore_errors=True)


def report(options, threads, path, elapsed, latencies, data_syncs, dir_syncs, commits):
    n = len(latencies)
    latencies.sort()
    print("spool:           %s" % (path,))
    print(
        "messages:        %d x %d bytes, concurrency %d, %d threads"
        % (n, options.size, options.concurrency, threads)
    )
    print("elapsed:         %.3f s" % (elapsed,))
    print("rate:            %.0f messages/s (%.1f MB/s)" % (n / elapsed, n * options.size / elapsed / 1e6))
    print("fsyncs/message:  %.3f (%.3f fdatasync of data + %.3f fsync of directories)"
          % ((data_syncs + dir_syncs) / n, data_syncs / n, dir_syncs / n))
    print("group commits:   %d (%.1f messages each)" % (commits, n / max(commits, 1)))
    print("latency:         p50 %.1f ms, p99 %.1f ms, max %.1f ms"
          % (1e3 * latencies[n // 2], 1e3 * latencies[min(n - 1, n * 99 // 100)], 1e3 * latencies[-1]))


def main(argv=None):
    options = parse_args(sys.argv[1:] if argv is None else argv)
    task.react(run, [options])


if __name__ == "__main__":
    main()
