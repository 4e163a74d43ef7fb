"""[queue]: where accepted mail waits for delivery."""

import attr

from mailgate.config.schema import Key, _plain
from mailgate.config.types import Choice, Path


@attr.s(frozen=True, slots=True)
class QueueConfig:
    backend = attr.ib(default="spool")
    path = attr.ib(default=None)


QUEUE_KEYS = {
    "backend": Key(Choice(("spool",)), "spool"),
    "path": Key(Path(optional=False), "/var/spool/mailgate"),
}

QUEUE = _plain("queue", QueueConfig, QUEUE_KEYS)
