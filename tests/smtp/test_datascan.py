"""
DataScanner: the same stream must give the same result however the network splits it.
"""

import random

from twisted.trial import unittest

from mailgate.smtp.datascan import DataScanner


def scan(stream, cuts, max_size=10**7):
    scanner = DataScanner(max_size)
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    for i, piece in enumerate(pieces):
        rest = scanner.feed(piece)
        if rest is not None:
            return scanner, rest + b"".join(pieces[i + 1:])
    return scanner, None


def every_split(case, stream, check, tries=200):
    rng = random.Random(len(stream))
    splits = [[], list(range(1, len(stream)))]  # whole, and byte by byte
    splits += [sorted(rng.sample(range(1, len(stream)), rng.randint(1, min(20, len(stream) - 1))))
               for _ in range(tries)]
    for cuts in splits:
        check(*scan(stream, cuts))


class DataScannerTests(unittest.TestCase):
    def test_unstuffing_and_end_under_any_split(self):
        stream = b".lead\r\nx\r\n..two\r\n..\r\nend\r\n.\r\nQUIT\r\n"

        def check(scanner, rest):
            self.assertEqual(scanner.message(), b"lead\r\nx\r\n.two\r\n.\r\nend\r\n")
            self.assertEqual(rest, b"QUIT\r\n")
            self.assertFalse(scanner.bare_newline or scanner.line_too_long or scanner.too_big)

        every_split(self, stream, check)

    def test_empty_message(self):
        every_split(self, b".\r\nNOOP\r\n", lambda s, rest: (
            self.assertEqual((s.message(), rest), (b"", b"NOOP\r\n"))))

    def test_bare_lf_and_cr_flagged_under_any_split(self):
        for stream in (b"a\nb\r\n.\r\n", b"a\rb\r\n.\r\n", b"a\r\n.\n.\r\n.\r\n", b"\n\r\n.\r\n"):
            def check(scanner, rest, stream=stream):
                self.assertTrue(scanner.bare_newline, stream)
                self.assertEqual(rest, b"")

            every_split(self, stream, check, tries=50)

    def test_bare_lf_dot_lf_never_ends_data(self):
        scanner, rest = scan(b"a\n.\nMAIL FROM:<x@y>\n", [])
        self.assertIsNone(rest)

    def test_line_length_boundary_under_any_split(self):
        ok = b"y" * 998 + b"\r\n.\r\n"
        long = b"y" * 999 + b"\r\n.\r\n"
        every_split(self, ok, lambda s, rest: self.assertFalse(s.line_too_long), tries=30)
        every_split(self, long, lambda s, rest: self.assertTrue(s.line_too_long), tries=30)

    def test_very_long_line_is_not_held_in_the_tail(self):
        scanner = DataScanner(10**7)
        for _ in range(100):
            self.assertIsNone(scanner.feed(b"z" * 10000))
        self.assertLessEqual(len(scanner._tail), 1000)
        self.assertEqual(scanner.feed(b"\r\n.\r\n"), b"")
        self.assertTrue(scanner.line_too_long)

    def test_size_limit_keeps_scanning_but_stops_keeping(self):
        scanner = DataScanner(100)
        for _ in range(50):
            scanner.feed(b"x" * 70 + b"\r\n")
        self.assertTrue(scanner.too_big)
        self.assertEqual(scanner.chunks, [])
        self.assertEqual(scanner.feed(b".\r\n"), b"")

    def test_dot_after_a_bare_lf_is_kept_in_any_chunking(self):
        """Found by hypothesis (test_properties): only CRLF starts a line, in every chunking."""
        wire = b"\n.\r\n.\r\nNEXT"

        def check(scanner, rest):
            self.assertEqual((scanner.message(), rest, scanner.bare_newline),
                             (b"\n.\r\n", b"NEXT", True))

        every_split(self, wire, check)
