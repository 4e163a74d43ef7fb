"""
A receiver process: `python -m mailgate.processes.receiver --listen NAME=FD:FAMILY ...`.

Started by the main process (mailgate.processes.pool), never by hand.  The first thing it reads
on its standard input is the main process's running configuration; it builds the receiving half
of the gateway from it (listeners on the inherited sockets, their filter chains, the queue's
enqueue), and reports over its descriptor 3 (mailgate.processes.channel) everything the main
process must know: its events, the messages it committed, its log lines.
Like mailgate.tap, it is a program's entry point, so it uses the global reactor.
"""

import argparse
import os
import sys

from twisted.application import service
from twisted.internet import stdio
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, formatEvent, globalLogBeginner
from zope.interface import implementer

from mailgate.errors import ConfigError
from mailgate.processes.channel import LineDecoder, encode

EVENTS_FD = 3
SUMMARY_EVENTS = ("connect", "disconnect", "tls")  # of the protocol events, what metrics count
TIMEOUT_REPLY = "421 "  # replies the main process needs even in summary mode (timeouts, limits)


@implementer(IHalfCloseableProtocol)
class Channel(Protocol):
    """Standard input (commands from the main process) and descriptor 3 (everything we report)."""

    def __init__(self, receiver):
        self.receiver = receiver
        self._decoder = LineDecoder()

    def send(self, message):
        if self.transport is not None:
            self.transport.write(encode(message))

    def dataReceived(self, data):
        for message in self._decoder.feed(data):
            kind = message.get("t")
            if kind == "anvil":
                self.receiver.counted(message.get("o"), message.get("op"))
            elif kind == "anvil-gone":
                self.receiver.forget(message.get("o"))
            elif kind == "config":
                self.receiver.start(str(message.get("ini", "")), str(message.get("path", "")),
                                    message.get("uid"), message.get("gid"),
                                    message.get("groups") or [], message.get("anvil") or {})
            elif kind == "retire":
                self.receiver.retire()
            elif kind == "stop":
                self.receiver.retire(hard=True)

    def readConnectionLost(self):
        self.receiver.retire()  # the main process is gone: stop accepting, finish what is open

    def writeConnectionLost(self):
        self.receiver.retire(hard=True)  # nobody hears us: nothing we accept could be delivered

    def connectionLost(self, reason=None):
        self.receiver.retire(hard=True)


class Receiver:
    def __init__(self, reactor, all_events, adopted):
        self.reactor = reactor
        self.all_events = all_events
        self.adopted = adopted
        self.channel = Channel(self)
        self.gateway = None
        self.open_sessions = 0
        self.retiring = False
        self._finishing = False

    # -- what we report

    def observe(self, kind, fields):
        """The event bus observer: every event the main process needs, to the main process."""
        if kind == "protocol" and fields.get("direction") == "in":
            event = fields.get("event")
            if event == "connect":
                self.open_sessions += 1
            elif event == "disconnect":
                self.open_sessions -= 1
                if self.retiring and self.open_sessions <= 0:
                    self.reactor.callLater(0, self.finish)
            if not self.all_events and event not in SUMMARY_EVENTS and not (
                    event == "reply" and str(fields.get("data", "")).startswith(TIMEOUT_REPLY)):
                return
        self.channel.send({"t": "ev", "k": kind, "f": fields})

    def committed(self, queue_id, state):
        self.channel.send({"t": "q", "id": queue_id, "s": state})

    def write_state(self, why):
        """A message write failed (why): for the main /healthz, until we commit one again."""
        self.channel.send({"t": "w", "e": why})

    # -- the counters the receivers share (mailgate.smtp.anvil)

    def share(self, op):
        self.channel.send({"t": "anvil", "op": op})

    def counted(self, origin, op):
        if self.gateway is not None and isinstance(op, list):
            self.gateway.anvil.apply(str(origin), op)

    def forget(self, origin):
        if self.gateway is not None:
            self.gateway.anvil.forget(str(origin))

    def log(self, event):
        level = event.get("log_level", LogLevel.info)
        if level < LogLevel.info:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        self.channel.send({"t": "log", "lvl": level.name, "ns": event.get("log_namespace", "-"),
                           "msg": text})

    # -- life

    def start(self, ini, path, uid=None, gid=None, groups=(), theirs=None):
        from mailgate.config import load_config_text
        from mailgate.service import build_service

        if self.gateway is not None or self.retiring:
            return
        adopted = self.adopted
        try:
            config = load_config_text(ini, path)
            self.gateway = build_service(config, self.reactor, adopted=adopted)
            self.gateway.events.subscribe(self.observe)
            self.gateway.queue.subscribe(self.committed)
            watch = getattr(self.gateway.queue, "watch_writes", None)
            if watch is not None:
                watch(self.write_state)
            anvil = self.gateway.anvil
            for origin, counts in (theirs or {}).items():  # the others' open connections
                for key, n in (counts.items() if isinstance(counts, dict) else ()):
                    for _ in range(min(int(n), 100000)):
                        anvil.apply(str(origin), ["c", key])
            anvil.share(self.share)
            service.IService(self.gateway).privilegedStartService()
            self.gateway.startService()
            _become(uid, gid, groups)  # the main process's user, before any session starts
        except ConfigError as e:
            self.channel.send({"t": "fatal", "error": str(e)})
            self.reactor.callLater(0, self.reactor.stop)
            return
        for fd, _ in adopted.values():
            os.close(fd)  # the ports hold their own copies
        self.channel.send({"t": "ready"})

    def retire(self, hard=False):
        if self.retiring and not hard:
            return
        self.retiring = True
        if self.gateway is not None:
            for listening in self.gateway.listeners():
                listening.stop_listening()
        self.channel.send({"t": "retired"})  # not accepting any more: the reload may go on
        if hard or self.open_sessions <= 0 or self.gateway is None:
            self.reactor.callLater(0, self.finish)
        else:
            limit = max((l.limits.session_timeout for l in self.gateway.config.listeners), default=0)
            self.reactor.callLater(limit + 5, self.finish)

    def finish(self):
        if self._finishing:
            return
        self._finishing = True
        d = self.gateway.stopService() if self.gateway is not None and self.gateway.running else None
        if d is not None:
            d.addBoth(lambda _: self.reactor.stop())
        else:
            self.reactor.stop()


def _become(uid, gid, groups):
    """Switch to uid, gid and groups (those of the main process) when we are root and they differ."""
    if uid is None or os.geteuid() != 0 or (os.getuid(), os.getgid()) == (uid, gid):
        return
    try:
        os.setgroups([int(g) for g in groups])
        os.setgid(int(gid))
        os.setuid(int(uid))
    except (OSError, ValueError) as e:
        raise ConfigError("receiver", None, None, "cannot switch to uid %s: %s" % (uid, e))


def _listen_argument(text):
    name, _, rest = text.partition("=")
    fd, _, family = rest.partition(":")
    return name, (int(fd), int(family))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mailgate.processes.receiver")
    parser.add_argument("--listen", action="append", type=_listen_argument, default=[])
    parser.add_argument("--events", choices=("all", "summary"), default="summary")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    receiver = Receiver(reactor, args.events == "all", dict(args.listen))
    globalLogBeginner.beginLoggingTo([receiver.log], redirectStandardIO=False)
    stdio.StandardIO(receiver.channel, stdin=0, stdout=EVENTS_FD, reactor=reactor)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
