"""
The main process's receivers: start them on the bound sockets, hear them, replace them.

ReceiverPool(gateway, reactor, count) starts count receiver processes (mailgate.processes.
receiver) once the gateway's queue is recovered, each inheriting every listening socket of the
gateway and given the running configuration (rendered, over its standard input: never the file
as it may be on disk by then).  What they report lands where a single process would have put
it: their events on the gateway's bus (so logs, trace, metrics and alerts see them), their
committed messages in the queue's notifications (so delivery starts at once), their log lines
in this process's log.

A receiver that dies is started again (after 1 s, doubling up to 30 s while they keep dying).  A
reload (mailgate.gateway) calls prepare(), which starts a new generation on the new settings and
sockets and fires once it accepts (or fails with the error that stopped it: the reload is
refused and the old generation goes on), then commit(), which retires the old generation: its
receivers stop accepting at once (commit fires when they have) and end when their sessions have.
So a reload loses no connection, and a session that starts after it gets the new settings.
stopService stops them all and fires when they have exited.
"""

import collections
import os
import sys

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel

from mailgate.config import render_config
from mailgate.errors import ConfigError
from mailgate.processes.channel import LineDecoder, encode
from mailgate.smtp.listener import listening_socket

log = Logger()

RESPAWN_FIRST = 1.0
RESPAWN_MAX = 30.0
STOP_GRACE = 10.0  # seconds receivers get to exit on stop before they are killed
START_TIMEOUT = 60.0  # seconds a new generation gets to accept, on a reload
_LEVELS = {level.name: level for level in (LogLevel.info, LogLevel.warn, LogLevel.error,
                                          LogLevel.critical)}


class ReceiverFailed(ConfigError):
    """A receiver could not start: its own one-line error (FILE: [SECTION] KEY: ...) as is."""

    def __str__(self):
        return self.message


def receiver_count(config):
    """[gateway] workers: 0 is auto (one receiver a CPU); 1 means no receivers (one process)."""
    workers = config.gateway.workers or (os.cpu_count() or 1)
    return workers if workers > 1 else 0


class _Receiver(protocol.ProcessProtocol):
    """One receiver process: what it was started with, and what it says."""

    def __init__(self, pool, index, generation, config, sockets, origin):
        self.pool = pool
        self.origin = origin  # names this process in the shared counters (mailgate.smtp.anvil)
        self.index = index
        self.generation = generation
        self.config = config
        self.sockets = sockets
        self.ready = False
        self.failure = None  # why it could not start
        self.retired = defer.Deferred()  # fires when it has stopped accepting (or ended)
        self.ended = defer.Deferred()
        self._started = []  # Deferreds waiting for it to accept
        self._decoder = LineDecoder()
        self._logs = {}

    def configure(self):
        """Send the configuration, and who to be: the main process's user and groups now."""
        self.send({"t": "config", "path": self.config.path,
                   "ini": render_config(self.config, show_secrets=True),
                   "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                   "anvil": self.pool.open_connections(self)})

    def when_started(self):
        """A Deferred firing once it accepts, failing with ReceiverFailed when it cannot start."""
        if self.ready:
            return defer.succeed(self)
        if self.failure is not None:
            return defer.fail(self.failure)
        d = defer.Deferred()
        self._started.append(d)
        return d

    def _start_done(self, failure=None):
        self.failure = failure
        waiting, self._started = self._started, []
        for d in waiting:
            if failure is None:
                d.callback(self)
            else:
                d.errback(failure)

    def childDataReceived(self, fd, data):
        if fd != 3:
            return
        for message in self._decoder.feed(data):
            kind = message.get("t")
            if kind == "ev":
                self.pool.gateway.events.relay(message.get("k"), message.get("f") or {})
            elif kind == "anvil":
                self.pool.anvil(self, message.get("op"))
            elif kind == "q":
                self.pool.committed(message.get("id"), message.get("s"))
            elif kind == "w":
                self.pool.write_error = str(message.get("e"))
            elif kind == "log":
                self._log(message)
            elif kind == "ready":
                self.ready = True
                self._start_done()
                self.pool.became_ready(self)
            elif kind == "retired":
                if not self.retired.called:
                    self.retired.callback(None)
            elif kind == "fatal":
                log.error("receiver {index} cannot start: {error}", index=self.index,
                          error=message.get("error"))
                self._start_done(ReceiverFailed(None, None, None, str(message.get("error"))))

    def _log(self, message):
        namespace = str(message.get("ns") or "mailgate.processes.receiver")
        logger = self._logs.get(namespace)
        if logger is None:
            logger = self._logs[namespace] = Logger(namespace=namespace)
        level = _LEVELS.get(message.get("lvl"), LogLevel.info)
        logger.emit(level, "{msg}", msg=str(message.get("msg", "")), receiver=self.index)

    def send(self, message):
        self.send_encoded(encode(message))

    def send_encoded(self, line):
        if self.transport is not None and not self.ended.called:
            self.transport.write(line)

    def processEnded(self, reason):
        if not self.ready and self.failure is None:
            self._start_done(ReceiverFailed(None, None, None, "receiver %d exited before it "
                                            "accepted: %s" % (self.index, reason.getErrorMessage())))
        if not self.retired.called:
            self.retired.callback(None)
        self.ended.callback(None)
        self.pool.ended(self, reason)


class ReceiverPool(service.Service):
    name = "receivers"

    def __init__(self, gateway, reactor, count, executable=sys.executable):
        self.gateway = gateway
        self.reactor = reactor
        self.count = count
        self.executable = executable
        self.current = []  # the receivers accepting now
        self.retiring = []  # older generations, finishing their sessions
        self._next = None  # a reload's new generation, until it takes over
        self._generation = 0
        self._respawn_delay = RESPAWN_FIRST
        self._respawns = {}  # slot in current -> DelayedCall
        self._announced = False
        self._origins = 0
        self._open = {}  # origin -> Counter(client key -> open connections): for new receivers
        self.write_error = None  # why a receiver's message write failed, until one commits again

    # -- life

    def prestart(self):
        """
        Start the receiver processes now, while we may still be root (the listeners are bound,
        the queue not yet recovered): they wait for their configuration.  A Python installed
        where only root may read is no obstacle then; each one switches to our user when it is
        configured.
        """
        if not self.current:
            self.current = self._spawn_generation(self.count, self.gateway.config,
                                                  self._sockets(), configure=False)

    def startService(self):
        service.Service.startService(self)
        if self.current:
            for receiver in self.current:
                receiver.configure()
        else:
            self.current = self._spawn_generation(self.count, self.gateway.config, self._sockets())

    def stopService(self):
        service.Service.stopService(self)
        self._cancel_respawns()
        everyone = self.current + self.retiring + (self._next or [])
        self._next = None
        for receiver in everyone:
            receiver.send({"t": "stop"})
        pending = [r.ended for r in everyone if not r.ended.called]
        if not pending:
            return None
        done = defer.DeferredList(pending)
        timer = self.reactor.callLater(STOP_GRACE, self._kill, everyone)
        done.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return done

    def _kill(self, receivers):
        for receiver in receivers:
            if not receiver.ended.called:
                log.warn("receiver {index} did not stop; killing it", index=receiver.index)
                try:
                    receiver.transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass

    # -- reload

    def prepare(self, config, sockets):
        """Start the next generation for config on sockets ({name: (fd, family)}); see above."""
        self._stop_next()
        nxt = self._next = self._spawn_generation(receiver_count(config) or 1, config, sockets)
        started = defer.gatherResults([r.when_started() for r in nxt], consumeErrors=True)
        started.addTimeout(START_TIMEOUT, self.reactor)

        def failed(failure):
            if self._next is nxt:
                self._stop_next()
            if failure.check(defer.FirstError):
                failure = failure.value.subFailure
            if failure.check(ConfigError):
                failure.raiseException()
            raise ReceiverFailed(None, None, None, "%s: the new receiver processes did not start "
                                 "within %gs" % (config.path, START_TIMEOUT))

        return started.addCallbacks(lambda _: None, failed)

    def commit(self):
        """The prepared generation takes over; fires once the old one stopped accepting."""
        old, self.current, self._next = self.current, self._next, None
        self.count = len(self.current)
        self._cancel_respawns()
        for receiver in old:
            receiver.send({"t": "retire"})
        self.retiring.extend(r for r in old if not r.ended.called)
        done = defer.DeferredList([r.retired for r in old])
        done.addTimeout(STOP_GRACE, self.reactor)
        return done.addErrback(lambda _: None)

    def _stop_next(self):
        for receiver in self._next or []:
            receiver.send({"t": "stop"})
        self._next = None

    # -- receivers

    def _sockets(self):
        return {listening.listener.name: listening_socket(listening.port)
                for listening in self.gateway.listeners() if listening.port is not None}

    def _spawn_generation(self, count, config, sockets, configure=True):
        self._generation += 1
        return [self._spawn(i, self._generation, config, sockets, configure)
                for i in range(count)]

    def _spawn(self, index, generation, config, sockets, configure=True):
        self._origins += 1
        receiver = _Receiver(self, index, generation, config, sockets, str(self._origins))
        child_fds = {0: "w", 1: 1, 2: 2, 3: "r"}
        args = [self.executable, "-m", "mailgate.processes.receiver",
                "--events", "all" if config.logging.dir else "summary"]
        for name, (fd, family) in sockets.items():
            child_fds[fd] = fd
            args += ["--listen", "%s=%d:%d" % (name, fd, family)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # our mailgate, theirs too
        self.reactor.spawnProcess(receiver, self.executable, args, env=env, childFDs=child_fds)
        if configure:
            receiver.configure()
        return receiver

    def became_ready(self, receiver):
        self._respawn_delay = RESPAWN_FIRST
        if receiver in self.current and all(r.ready for r in self.current):
            # The first time, the gateway takes mail from now on: the line the single process
            # logs once its queue is recovered.
            first, self._announced = not self._announced, True
            log.info("{ready}{count} receiver processes accepting",
                     ready="queue ready: " if first else "", count=len(self.current))

    def committed(self, queue_id, state):
        self.write_error = None  # a receiver's write worked
        announce = getattr(self.gateway.queue, "announce", None)
        if announce is None or not isinstance(queue_id, str) or not isinstance(state, str):
            return
        try:
            announce(queue_id, state)
        except ValueError:
            log.warn("a receiver announced a bad queue entry {queue_id!r} in {state!r}",
                     queue_id=queue_id, state=state)

    # -- the shared counters (mailgate.smtp.anvil): we pass each receiver's changes on

    def _everyone(self):
        return self.current + self.retiring + (self._next or [])

    def anvil(self, receiver, op):
        """One receiver's change to the counters: to every other receiver; connections kept."""
        if not isinstance(op, list) or not op:
            return
        if op[0] in ("c", "d") and len(op) > 1:
            counts = self._open.setdefault(receiver.origin, collections.Counter())
            key = str(op[1])
            if op[0] == "c":
                counts[key] += 1
            elif counts[key] > 1:
                counts[key] -= 1
            else:
                counts.pop(key, None)
        message = encode({"t": "anvil", "o": receiver.origin, "op": op})
        for other in self._everyone():
            if other is not receiver:
                other.send_encoded(message)

    def open_connections(self, receiver):
        """The other receivers' open connections, for one starting now."""
        return {origin: dict(counts) for origin, counts in self._open.items()
                if origin != receiver.origin and counts}

    def _forget(self, receiver):
        self._open.pop(receiver.origin, None)
        message = encode({"t": "anvil-gone", "o": receiver.origin})
        for other in self._everyone():
            if other is not receiver:
                other.send_encoded(message)

    def ended(self, receiver, reason):
        self._forget(receiver)
        if receiver in self.retiring:
            self.retiring.remove(receiver)
            return
        if receiver not in self.current or not self.running:
            return
        code = getattr(reason.value, "exitCode", None)
        log.error("receiver {index} exited ({why}); starting it again in {delay:g}s",
                  index=receiver.index,
                  why="exit %s" % code if code is not None else reason.getErrorMessage(),
                  delay=self._respawn_delay)
        slot = self.current.index(receiver)
        self._respawns[slot] = self.reactor.callLater(self._respawn_delay, self._respawn, receiver)
        self._respawn_delay = min(RESPAWN_MAX, self._respawn_delay * 2)

    def _respawn(self, dead):
        if not self.running or dead not in self.current:
            return
        slot = self.current.index(dead)
        self._respawns.pop(slot, None)
        self.current[slot] = self._spawn(dead.index, dead.generation, dead.config, dead.sockets)

    def _cancel_respawns(self):
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()

    def problems(self):
        """For /healthz: receivers of the current generation that do not accept."""
        if not self.running:
            return []
        problems = []
        ready = sum(1 for r in self.current if r.ready and not r.ended.called)
        if ready < len(self.current):
            problems.append("receivers: %d of %d accepting" % (ready, len(self.current)))
        if self.write_error is not None:
            problems.append("queue not writable: %s" % (self.write_error,))
        return problems
