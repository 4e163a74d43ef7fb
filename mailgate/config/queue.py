"""[queue]: where accepted mail waits for delivery."""

import attr

from mailgate.config.schema import Key, _plain
from mailgate.config.types import Choice, Path


@attr.s(frozen=True, slots=True)
class QueueConfig:
    backend = attr.ib(default="spool")
    path = attr.ib(default=None)


QUEUE_KEYS = {
    "backend": Key(
        Choice(("spool",)), "spool",
        doc="Where accepted mail waits for delivery.  `spool` keeps each message and its "
        "envelope as files in a directory.",
        example="spool",
    ),
    "path": Key(
        Path(optional=False), "/var/spool/mailgate",
        doc="The spool directory, created when missing; it must be writable by the user "
        "mailgate runs as.",
        example="/srv/mailgate/spool",
    ),
}

QUEUE = _plain("queue", QueueConfig, QUEUE_KEYS)
