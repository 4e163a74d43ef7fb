"""
The queue: where accepted mail waits, behind the IQueue seam (mailgate.interfaces).

Spool is the embedded durable backend (files under a directory); ids.new_queue_id names every
entry, whatever the backend.
"""

from mailgate.queue.ids import new_queue_id
from mailgate.queue.spool import STATES, CorruptEntryError, Spool

__all__ = ["STATES", "CorruptEntryError", "Spool", "new_queue_id"]
