"""
bench/run's own SMTP client (asyncio): the latency of the final 250, and idle sessions.

latency() drives a target with `sessions` concurrent sessions (one message per connection, or
all of a session's messages over one connection like smtp-source -d) and records, for every
message, the time from writing the final ".<CRLF>" (after the body has left our buffers) to
reading the 250.  It speaks like smtp-source: HELO, MAIL, RCPT, DATA, QUIT, no pipelining.

idle() opens many sessions that read their greeting and then say nothing, and keeps them open
while a probe (latency() with one session) tries to get mail accepted.
"""

import asyncio
import itertools
import time


class SMTPFailure(Exception):
    pass


def stuffed(message):
    """The DATA payload: message (CRLF lines) dot-stuffed, without the final '.' line."""
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines[:-1]) + b"\r\n"


async def _reply(reader, timeout):
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise SMTPFailure("connection closed by the server" +
                              (" after %r" % (lines[-1],) if lines else ""))
        lines.append(line)
        if line[3:4] != b"-":
            break
    try:
        return int(lines[-1][:3]), lines[-1].rstrip(b"\r\n").decode("latin-1")
    except ValueError:
        raise SMTPFailure("not an SMTP reply: %r" % (lines[-1],))


async def _expect(reader, writer, line, wanted, timeout):
    if line is not None:
        writer.write(line)
    code, text = await _reply(reader, timeout)
    if code // 100 != wanted:
        raise SMTPFailure("%s -> %s" % ((line or b"(greeting)").strip().decode("latin-1"), text))
    return text


class Client:
    def __init__(self, port, payload, sender, rcpt, rcpts=1, helo="client.test", timeout=60.0,
                 host="127.0.0.1"):
        self.host, self.port = host, port
        self.payload = payload  # from stuffed()
        self.sender, self.rcpt, self.rcpts, self.helo = sender, rcpt, rcpts, helo
        self.timeout = timeout
        self._numbers = itertools.count(1)

    async def connect(self):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout)
        writer.transport.set_write_buffer_limits(0)  # drain() returns once the kernel has it all
        await _expect(reader, writer, None, 2, self.timeout)
        await _expect(reader, writer, b"HELO %s\r\n" % self.helo.encode(), 2, self.timeout)
        return reader, writer

    async def transaction(self, reader, writer):
        """One message; the seconds from the final dot to the 250."""
        await _expect(reader, writer, b"MAIL FROM:<%s>\r\n" % self.sender.encode(), 2, self.timeout)
        for _ in range(self.rcpts):
            rcpt = b"%d%s" % (next(self._numbers), self.rcpt.encode())  # like smtp-source -N
            await _expect(reader, writer, b"RCPT TO:<%s>\r\n" % rcpt, 2, self.timeout)
        await _expect(reader, writer, b"DATA\r\n", 3, self.timeout)
        writer.write(self.payload)
        await writer.drain()
        started = time.monotonic()
        await _expect(reader, writer, b".\r\n", 2, self.timeout)
        return time.monotonic() - started

    async def quit(self, reader, writer):
        try:
            await _expect(reader, writer, b"QUIT\r\n", 2, self.timeout)
        except (SMTPFailure, OSError, asyncio.TimeoutError):
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _latency(client, sessions, messages, reuse):
    latencies, remaining = [], itertools.count(messages, -1)

    async def one_session():
        if reuse:
            reader, writer = await client.connect()
            try:
                while next(remaining) > 0:
                    latencies.append(await client.transaction(reader, writer))
            finally:
                await client.quit(reader, writer)
        else:
            while next(remaining) > 0:
                reader, writer = await client.connect()
                try:
                    latencies.append(await client.transaction(reader, writer))
                finally:
                    await client.quit(reader, writer)

    results = await asyncio.gather(*[one_session() for _ in range(sessions)],
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    return latencies, errors


def latency(client, sessions, messages, reuse=False):
    """(latencies in seconds, errors): `messages` messages over `sessions` sessions."""
    return asyncio.run(_latency(client, sessions, messages, reuse))


def percentile(values, fraction):
    """The nearest-rank percentile of values (fraction 0.5 for p50, 0.99 for p99); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-fraction * len(ordered) // 1)))  # ceil(fraction * n)
    return ordered[min(rank, len(ordered)) - 1]


async def _idle(port, count, probe, probe_messages, measure, concurrency=200, connect_timeout=3.0,
                greet_timeout=10.0, open_deadline=120.0, give_up_after=500):
    """Open `count` idle sessions, then probe while they stay open; see idle()."""
    connections, greeted, failures = [], 0, 0
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    stop = False

    async def open_one():
        nonlocal greeted, failures, stop
        async with gate:
            if stop:
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), connect_timeout)
            except (OSError, asyncio.TimeoutError):
                failures += 1
                stop = stop or failures >= give_up_after or \
                    time.monotonic() - started > open_deadline
                return
            connections.append(writer)
            try:
                line = await asyncio.wait_for(reader.readline(), greet_timeout)
                if line.startswith(b"220"):
                    greeted += 1
                    return
            except (OSError, asyncio.TimeoutError):
                pass
            failures += 1  # connected, but no greeting in time: still held open
            stop = stop or failures >= give_up_after or time.monotonic() - started > open_deadline

    await asyncio.gather(*[open_one() for _ in range(count)])
    opened = time.monotonic() - started
    try:
        latencies, errors = await _latency(probe, 1, probe_messages, False)
        memory = measure()
    finally:
        for writer in connections:
            writer.transport.abort()
    return {"connected": len(connections), "greeted": greeted, "open_seconds": opened,
            "probe_latencies": latencies, "probe_errors": [str(e) or type(e).__name__
                                                           for e in errors],
            "memory": memory}


def idle(port, count, probe, probe_messages, measure):
    """
    Hold `count` idle sessions to port (each connected and, if the target greets it, past the
    220), then send probe_messages messages with the probe client while they are open, then call
    measure() (the target's memory) and close everything.  A dict of what happened.
    """
    return asyncio.run(_idle(port, count, probe, probe_messages, measure))
