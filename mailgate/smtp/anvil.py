"""
Counting across sessions (Postfix's anvil): open connections, rates and failed logins per client.

A session alone cannot see a flood: every counter here is shared by all the sessions of one
gateway process and lives in memory only (each node counts its own clients).  Clients are keyed
by address, IPv6 by its /64 (a host gets a /64, and a client must not escape a limit by hopping
through it).  Memory is bounded: idle entries expire (a bucket that has refilled, a failure
window that has passed), and each table holds at most max_entries keys; when full, the entries
that have been idle longest go first, so a client cycling through addresses cannot grow it.

Time comes from the injected clock (clock.seconds()).  Expiry runs by itself, at most once a
minute, when connections come in: no timer of its own.

Every key is gateway-wide (all listeners count into the same tables); the thresholds are the
listener's (mailgate.config.Limits), so a listener may be stricter or more lenient than another
about the same counts.
"""

import collections
import ipaddress

from mailgate.config import Rate

MAX_ENTRIES = 100000  # per table; at a few hundred bytes each, tens of MB at worst
EXPIRE_EVERY = 60.0  # seconds between sweeps of idle entries


def client_key(ip):
    """The key a client is counted under: its address, or the /64 of an IPv6 address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


__all__ = ["Anvil", "FailureWindows", "Rate", "TokenBuckets", "client_key"]


class _Table:
    """A dict with a size bound: the least recently touched keys are evicted first."""

    def __init__(self, max_entries):
        self.max_entries = max_entries
        self.items = collections.OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value):
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.max_entries:
            self.items.popitem(last=False)

    def pop(self, key):
        self.items.pop(key, None)

    def __len__(self):
        return len(self.items)


class TokenBuckets:
    """
    One token bucket per key: a key may spend rate.count tokens at once, and they come back at
    rate.count per rate.seconds.  A bucket that has refilled is forgotten (it holds no
    information), so idle clients cost nothing.
    """

    def __init__(self, clock, max_entries=MAX_ENTRIES):
        self.clock = clock
        self._table = _Table(max_entries)

    def take(self, key, rate, n=1):
        """Spend n tokens of key's bucket; False (and nothing spent) when it has fewer."""
        now = self.clock.seconds()
        tokens = self._level(self._table.get(key), rate, now)
        if tokens < n:
            self._table.put(key, (tokens, now, rate))
            return False
        tokens -= n
        if tokens >= rate.count:
            self._table.pop(key)
        else:
            self._table.put(key, (tokens, now, rate))
        return True

    def spend(self, key, rate, n=1):
        """Spend n tokens someone else was allowed (another process): down to none, never below."""
        now = self.clock.seconds()
        tokens = max(0.0, self._level(self._table.get(key), rate, now) - n)
        self._table.put(key, (tokens, now, rate))

    @staticmethod
    def _level(entry, rate, now):
        if entry is None:
            return float(rate.count)
        level, then, _ = entry
        return min(float(rate.count), level + (now - then) * rate.count / rate.seconds)

    def expire(self):
        """Forget the buckets that have refilled."""
        now = self.clock.seconds()
        for key, entry in list(self._table.items.items()):
            rate = entry[2]
            if self._level(entry, rate, now) >= rate.count:
                self._table.pop(key)

    def __len__(self):
        return len(self._table)


class FailureWindows:
    """Failures per key within a sliding window: only the last `limit` times are kept per key."""

    def __init__(self, clock, max_entries=MAX_ENTRIES):
        self.clock = clock
        self._table = _Table(max_entries)

    def count(self, key, window):
        times = self._table.get(key)
        if times is None:
            return 0
        cutoff = self.clock.seconds() - window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            self._table.pop(key)
            return 0
        return len(times)

    def add(self, key, limit):
        """One failure for key; at most limit times are kept (more cannot change a decision)."""
        if limit <= 0:
            return  # that limit is off: nothing to remember
        times = self._table.get(key)
        if times is None or times.maxlen < limit:  # new, or the limit was raised by a reload
            times = collections.deque(times or (), maxlen=limit)
            self._table.put(key, times)
        times.append(self.clock.seconds())

    def expire(self, window):
        for key in list(self._table.items):
            self.count(key, window)

    def __len__(self):
        return len(self._table)


class Anvil:
    """
    The gateway's counters.  connect() and disconnect() bracket every session; the listener asks
    the other methods before it answers.  Each answer that refuses names the limit, for the
    REJECT tracking event and mailgate_limit_refusals_total{limit}.

    Receiver processes (mailgate.processes) share the counts: each one's Anvil reports every
    change it makes to the function given to share(), the main process passes it on, and the
    others apply() it, so a limit holds for the gateway, not for each process (as Postfix's one
    anvil server does for all its smtpd processes).
    """

    def __init__(self, clock, max_entries=MAX_ENTRIES):
        self.clock = clock
        self.connections = 0
        self._per_client = collections.Counter()  # client key -> open connections (everyone's)
        self._theirs = {}  # origin -> Counter(client key -> open connections) of other processes
        self._publish = None
        self.buckets = TokenBuckets(clock, max_entries)
        self.auth_failures = FailureWindows(clock, max_entries)
        self._window = 600.0  # the longest auth_failure_window seen, for expiry
        self._next_expiry = clock.seconds() + EXPIRE_EVERY

    # -- connections -------------------------------------------------------------------------

    def connect(self, ip, limits, exempt=False):
        """
        Count a new connection from ip under limits (mailgate.config.Limits): None when it may
        go on, else the name of the limit it is over (and then it is not counted).  An exempt
        client is held to max_connections only (and still counted, so disconnect() matches).
        """
        now = self.clock.seconds()
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRE_EVERY
            self.expire()
        if limits.max_connections and self.connections >= limits.max_connections:
            return "max_connections"
        key = client_key(ip)
        if not exempt:
            if limits.max_connections_per_ip and \
                    self._per_client[key] >= limits.max_connections_per_ip:
                return "max_connections_per_ip"
            rate = limits.connection_rate_per_ip
            if rate is not None and not self.buckets.take(("connection_rate_per_ip", key), rate):
                return "connection_rate_per_ip"
        self.connections += 1
        self._per_client[key] += 1
        if self._publish is not None:
            self._publish(["c", key])
        return None

    def disconnect(self, ip):
        key = client_key(ip)
        self._closed(key)
        if self._publish is not None:
            self._publish(["d", key])

    def _closed(self, key, n=1):
        self.connections -= n
        left = self._per_client[key] - n
        if left > 0:
            self._per_client[key] = left
        else:
            del self._per_client[key]

    def open_from(self, ip):
        return self._per_client.get(client_key(ip), 0)

    # -- rates ----------------------------------------------------------------------------------

    def take(self, name, who, rate, n=1):
        """Spend n of the limit name's tokens for who (an address or a username); True if allowed."""
        if rate is None:
            return True
        key = client_key(who) if name.endswith("_per_ip") else who.lower()
        if not self.buckets.take((name, key), rate, n):
            return False
        if self._publish is not None:
            self._publish(["t", name, key, rate.count, rate.seconds, n])
        return True

    # -- failed logins ----------------------------------------------------------------------

    def auth_blocked(self, ip, username, limits):
        """The name of the failed-login limit ip or username is over, or None."""
        window = limits.auth_failure_window
        if limits.max_auth_failures_per_ip and \
                self.auth_failures.count(("ip", client_key(ip)), window) >= limits.max_auth_failures_per_ip:
            return "max_auth_failures_per_ip"
        if username is not None and limits.max_auth_failures_per_user and \
                self.auth_failures.count(("user", username.lower()), window) >= limits.max_auth_failures_per_user:
            return "max_auth_failures_per_user"
        return None

    def auth_failed(self, ip, username, limits):
        user = username.lower() if username is not None else None
        self._failed(client_key(ip), user, limits.max_auth_failures_per_ip,
                     limits.max_auth_failures_per_user, limits.auth_failure_window)
        if self._publish is not None:
            self._publish(["f", client_key(ip), user, limits.max_auth_failures_per_ip,
                           limits.max_auth_failures_per_user, limits.auth_failure_window])

    def _failed(self, ip_key, user, per_ip, per_user, window):
        self._window = max(self._window, window)
        self.auth_failures.add(("ip", ip_key), per_ip)
        if user is not None:
            self.auth_failures.add(("user", user), per_user)

    # -- shared between processes ----------------------------------------------------------

    def share(self, publish):
        """Report each change from now on to publish(op): op is a list JSON carries as is."""
        self._publish = publish

    def apply(self, origin, op):
        """
        Count another process's change (an op it published; origin names that process) without
        reporting it again.  A malformed op (a broken peer) is ignored: False.
        """
        try:
            kind = op[0]
            if kind == "c":
                key = str(op[1])
                self.connections += 1
                self._per_client[key] += 1
                self._theirs.setdefault(origin, collections.Counter())[key] += 1
            elif kind == "d":
                key = str(op[1])
                theirs = self._theirs.get(origin)
                if not theirs or theirs[key] <= 0:
                    return False  # not counted here (it connected before we started)
                theirs[key] -= 1
                if not theirs[key]:
                    del theirs[key]
                self._closed(key)
            elif kind == "t":
                name, key, count, seconds, n = str(op[1]), str(op[2]), int(op[3]), float(op[4]), int(op[5])
                self.buckets.spend((name, key), Rate(count, seconds), n)
            elif kind == "f":
                ip_key, user = str(op[1]), (None if op[2] is None else str(op[2]))
                self._failed(ip_key, user, int(op[3]), int(op[4]), float(op[5]))
            else:
                return False
        except (IndexError, TypeError, ValueError):
            return False
        return True

    def forget(self, origin):
        """That process is gone: the connections it had open no longer count."""
        for key, n in self._theirs.pop(origin, {}).items():
            self._closed(key, n)

    def theirs(self):
        """{origin: {client key: open connections}} of the other processes, as counted here."""
        return {origin: dict(counts) for origin, counts in self._theirs.items() if counts}

    def expire(self, auth_window=None):
        """Drop idle entries: refilled buckets, failures older than the longest window."""
        self.buckets.expire()
        self.auth_failures.expire(auth_window if auth_window is not None else self._window)
