"""mailgate.queue.ids: unique, time-ordered, file-name-safe queue ids."""

import os

from twisted.trial.unittest import TestCase

from mailgate.queue import ids as ids_module
from mailgate.queue import new_queue_id


class QueueIdTests(TestCase):
    def test_unique_sortable_and_safe(self):
        ids = [new_queue_id() for _ in range(5000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(ids, sorted(ids))
        for queue_id in ids[:50]:
            self.assertRegex(queue_id, r"\A[0-9A-Z]{17}\Z")

    def test_sorts_by_time_not_by_random_part(self):
        """An id made later sorts later even when its random part is smaller."""
        self.patch(ids_module, "_last_us", 0)
        randoms = iter([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"])
        self.patch(ids_module.secrets, "token_bytes", lambda n: next(randoms))
        times = iter([31_000, 32_000])  # 31 and 32 microseconds: across a base32 digit boundary
        self.patch(ids_module.time, "time_ns", lambda: next(times))
        first, second = new_queue_id(), new_queue_id()
        self.assertLess(first, second)

    def test_clock_going_back_keeps_order(self):
        self.patch(ids_module, "_last_us", 0)
        times = iter([5_000_000_000, 4_000_000_000, 4_000_000_000])
        self.patch(ids_module.time, "time_ns", lambda: next(times))
        ids = [new_queue_id() for _ in range(3)]
        self.assertEqual(ids, sorted(set(ids)))

    def test_encoding_preserves_order(self):
        numbers = sorted(int.from_bytes(os.urandom(7), "big") >> 1 for _ in range(500))
        encoded = [ids_module._base32(n, 11) for n in numbers]
        self.assertEqual(encoded, sorted(encoded))
