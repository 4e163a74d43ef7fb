"""
The directory's cache: answers remembered for a while, a bounded number of them.

A found answer is kept for cache_ttl, a "not found" for negative_cache_ttl (so a mailbox created
a minute ago is accepted soon); failures are never kept.  At most size entries: past it the
least recently used go first.  Lookups of one key that overlap share one question to the
directory (a burst of RCPTs to one address asks once).  Time comes from the injected clock.
"""

import collections

from twisted.internet import defer
from twisted.python.failure import Failure


class TTLCache:
    def __init__(self, clock, ttl, negative_ttl, size):
        self.clock = clock
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.size = size
        self._entries = collections.OrderedDict()  # key -> (expires, value)
        self._pending = {}  # key -> [Deferred waiting for the lookup in flight]
        self.hits = self.misses = 0

    def __len__(self):
        return len(self._entries)

    def get(self, key, lookup):
        """
        A Deferred of the value for key: the remembered one while it lasts, else lookup(key)'s
        (a Deferred), remembered as found when true and as not found when false (None, False).
        """
        entry = self._entries.get(key)
        if entry is not None:
            expires, value = entry
            if expires > self.clock.seconds():
                self._entries.move_to_end(key)
                self.hits += 1
                return defer.succeed(value)
            del self._entries[key]
        self.misses += 1
        waiting = self._pending.get(key)
        if waiting is not None:
            d = defer.Deferred()
            waiting.append(d)
            return d
        self._pending[key] = []
        d = defer.maybeDeferred(lookup, key)
        d.addBoth(self._answered, key)
        return d

    def _answered(self, result, key):
        waiting = self._pending.pop(key, [])
        if not isinstance(result, Failure):
            self._put(key, result)
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        return result

    def _put(self, key, value):
        ttl = self.ttl if value else self.negative_ttl
        self._entries[key] = (self.clock.seconds() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self):
        self._entries.clear()
