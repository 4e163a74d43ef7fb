"""
The DATA transform (mailgate.delivery.dotstuff) on its own: DotStuffer fed in every chunking,
against a line-by-line reference.  The C1/C2 regression tests over real sockets are in
test_client.py.
"""

import itertools
import random

from twisted.trial.unittest import SynchronousTestCase

from mailgate.delivery.dotstuff import DotStuffer, stuff

CHUNK = 16384  # FileSender.CHUNK_SIZE


def normalized(data):
    """What data should be after CRLF normalisation (reference implementation for the tests)."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def reference_stuff(data):
    lines = normalized(data).split(b"\r\n")[:-1]
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines) + b".\r\n"


class DotStufferTests(SynchronousTestCase):
    """The transform itself, fed in every chunking, against a line-by-line reference."""

    SAMPLES = [
        b"",
        b".",
        b".\r\n",
        b"a\r\n.\r\nb\r\n",
        b"no final newline",
        b"..\r\n...\r\n",
        b"bare\nlf\n.dot\n",
        b"bare\rcr\r.dot\r",
        b"mixed\r\n\n\r\r\n.\r.\n.",
        b"\r\n\r\n.\r\n",
        b"x" * 100 + b"\r\n." + b"y" * 50,
    ]

    def feed(self, data, sizes):
        stuffer, out, i = DotStuffer(), b"", 0
        for size in itertools.cycle(sizes):
            if i >= len(data):
                break
            out += stuffer.feed(data[i:i + size])
            i += size
        return out + stuffer.finish()

    def test_every_chunking(self):
        for data in self.SAMPLES:
            expected = reference_stuff(data)
            self.assertEqual(stuff(data), expected, data)
            for sizes in ([1], [2], [3], [1, 2], [5, 1], [len(data) or 1]):
                self.assertEqual(self.feed(data, sizes), expected, (data, sizes))

    def test_random(self):
        rng = random.Random(1234)
        alphabet = [b"\r", b"\n", b"\r\n", b".", b"a", b"b"]
        for _ in range(300):
            data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            sizes = [rng.randint(1, 7) for _ in range(3)]
            self.assertEqual(self.feed(data, sizes), reference_stuff(data), (data, sizes))

    def test_never_cr_cr_lf(self):
        data = b"line\r\n" * 5000
        out = self.feed(data, [CHUNK])
        self.assertNotIn(b"\r\r\n", out)
        self.assertEqual(out, data + b".\r\n")
