"""
Outbound connections kept open between messages (Postfix's connection cache).

Opening a connection costs a TCP handshake, the greeting, EHLO and often a TLS handshake and
AUTH: more than the transaction itself for a small message.  After a transaction ends cleanly,
the client parks its connection here under its destination key; the next delivery to the same
destination takes it and sends MAIL FROM at once.  A parked connection that nobody takes within
idle_time seconds says QUIT; one older than max_age is not parked again, so a long-lived
connection does not pin us to one server of a pool for ever.

The cache never holds more than max_per_key idle connections to one destination.  It knows the
connections only by what they promise: park() and take() are for mailgate.delivery.client.
"""

from twisted.logger import Logger

log = Logger()


class ConnectionCache:
    def __init__(self, clock, idle_time, max_age, max_per_key=20):
        self.clock = clock
        self.idle_time = idle_time
        self.max_age = max_age
        self.max_per_key = max_per_key
        self._idle = {}  # key -> [(connection, timer)], most recently parked last
        self.reused = 0  # how many transactions ran on a taken connection (tests, metrics)

    def accepts(self, key, born):
        """Would a connection opened at born be parked under key now?"""
        if self.idle_time <= 0:
            return False
        if self.clock.seconds() - born >= self.max_age:
            return False
        return len(self._idle.get(key, ())) < self.max_per_key

    def park(self, key, connection):
        """Keep connection (which has closeIdle()) idle under key; False when it may not stay."""
        if not self.accepts(key, connection.born):
            return False
        timer = self.clock.callLater(self.idle_time, self._expired, key, connection)
        self._idle.setdefault(key, []).append((connection, timer))
        return True

    def take(self, key):
        """The most recently parked idle connection under key, or None."""
        idle = self._idle.get(key)
        while idle:
            connection, timer = idle.pop()
            if not idle:
                del self._idle[key]
            if timer.active():
                timer.cancel()
            if connection.usable():
                self.reused += 1
                return connection
            idle = self._idle.get(key)
        return None

    def discard(self, connection):
        """connection went away by itself (the server closed it while idle)."""
        for key, idle in list(self._idle.items()):
            for entry in idle:
                if entry[0] is connection:
                    idle.remove(entry)
                    if entry[1].active():
                        entry[1].cancel()
                    if not idle:
                        del self._idle[key]
                    return

    def _expired(self, key, connection):
        idle = self._idle.get(key, [])
        for entry in idle:
            if entry[0] is connection:
                idle.remove(entry)
                break
        if not idle:
            self._idle.pop(key, None)
        connection.closeIdle()

    def close_all(self):
        """Say QUIT on every idle connection (the service stops, or a reload replaced us)."""
        idle, self._idle = self._idle, {}
        for entries in idle.values():
            for connection, timer in entries:
                if timer.active():
                    timer.cancel()
                connection.closeIdle()

    def __len__(self):
        return sum(len(entries) for entries in self._idle.values())
