"""
Queue ids: unique, time-ordered and safe as file names, so that every backend (the spool's
files, a database's keys) and every node can make them without asking anyone.
"""

import re
import secrets
import threading
import time

STATES = ("active", "deferred", "hold", "quarantine")  # where an entry can be, in every backend
_ID_RE = re.compile(r"\A[0-9A-Za-z_-]{1,64}\Z")

# Crockford's base32: its digits are in ASCII order, so ids sort by time as plain strings.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_CHARS = 11  # 55 bits of microseconds: good until the year 3111 (10 chars ran out in 2005)
_RANDOM_CHARS = 6  # 30 random bits: tells apart ids made in the same microsecond by other processes
_id_lock = threading.Lock()
_last_us = 0


def _base32(number, width):
    chars = []
    for _ in range(width):
        chars.append(_ALPHABET[number & 31])
        number >>= 5
    return "".join(reversed(chars))


def new_queue_id():
    """
    A unique, time-ordered, file-name-safe id: 11 base32 chars of microseconds since the epoch, then
    6 random ones.  Within a process the time part strictly increases, so ids never repeat here.
    """
    global _last_us
    with _id_lock:
        now = time.time_ns() // 1000
        if now <= _last_us:
            now = _last_us + 1
        _last_us = now
    rand = int.from_bytes(secrets.token_bytes(4), "big") >> 2
    return _base32(now, _TIME_CHARS) + _base32(rand, _RANDOM_CHARS)


def check_state(state):
    """state, or ValueError when it is not one of STATES."""
    if state not in STATES:
        raise ValueError("unknown queue state %r (one of %s)" % (state, ", ".join(STATES)))
    return state


def check_queue_id(queue_id):
    """queue_id, or ValueError when it is not a safe queue id (what a file name can be)."""
    if not isinstance(queue_id, str) or not _ID_RE.match(queue_id):
        raise ValueError("not a queue id: %r" % (queue_id,))
    return queue_id
