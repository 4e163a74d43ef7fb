"""
What the main process and a receiver say to each other: one JSON object a line, over pipes.

Receiver to main (the receiver's descriptor 3): {"t": "ready"} once it accepts; {"t": "fatal",
"error": LINE} when it cannot start; {"t": "retired"} once it stopped accepting; {"t": "ev",
"k": KIND, "f": FIELDS} an event of its bus; {"t": "q", "id": QUEUE_ID, "s": STATE} a message it
committed to the queue; {"t": "log", "lvl": LEVEL, "ns": NAMESPACE, "msg": TEXT} a log line;
{"t": "anvil", "op": OP} a change to the counters across sessions (mailgate.smtp.anvil).

Main to receiver (its standard input): {"t": "config", "ini": TEXT, "path": PATH, "uid": ...,
"gid": ..., "groups": [...], "anvil": {ORIGIN: {CLIENT: OPEN}}} first, with
the other receivers' open connections; {"t": "anvil", "o": ORIGIN, "op": OP} another
receiver's change to the counters; {"t": "anvil-gone", "o": ORIGIN} that receiver ended;
{"t": "retire"} stop accepting and exit once the open sessions are over; {"t": "stop"} stop
accepting, close the sessions and exit now.  End of input means the main process is gone: the
same as retire.
"""

import json

MAX_LINE = 4 * 1024 * 1024  # an event is small; a line longer than this is a broken peer


def encode(message):
    return json.dumps(message, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


class LineDecoder:
    """Bytes in, messages (dicts) out; a line that is not a JSON object is dropped and counted."""

    def __init__(self):
        self._buffer = b""
        self.dropped = 0

    def feed(self, data):
        self._buffer += data
        if b"\n" not in data:
            if len(self._buffer) > MAX_LINE:
                self._buffer = b""
                self.dropped += 1
            return []
        *lines, self._buffer = self._buffer.split(b"\n")
        messages = []
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if isinstance(message, dict):
                messages.append(message)
            elif line.strip():
                self.dropped += 1
        return messages
