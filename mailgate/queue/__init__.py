"""Queue backends.  Spool is the embedded durable one (files under a directory)."""

from mailgate.queue.spool import STATES, CorruptEntryError, Spool, new_queue_id

__all__ = ["STATES", "CorruptEntryError", "Spool", "new_queue_id"]
