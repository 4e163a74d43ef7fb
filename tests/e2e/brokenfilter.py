"""
A third-party filter that fails on purpose, loaded by the gateway by dotted path in
tests/e2e/test_filters.py (`filters = tests.e2e.brokenfilter.Raiser`): its hooks raise for a
sender or a Subject containing the [filter:...] option `trigger`, and go on otherwise.
"""

from zope.interface import implementer

from mailgate.interfaces import IFilter
from mailgate.verdict import Verdict

MESSAGE = "deliberate failure of the e2e broken filter"


class DeliberateError(Exception):
    pass


@implementer(IFilter)
class Raiser:
    name = "raiser"

    def __init__(self, options):
        self.trigger = options.get("trigger", "boom")

    def on_mail(self, session, sender):
        if self.trigger in str(sender):
            raise DeliberateError(MESSAGE + " (mail)")
        return Verdict.next()

    def on_data(self, session, message):
        if self.trigger in str(message.parsed.get("Subject", "")):
            raise DeliberateError(MESSAGE + " (data)")
        if "not-a-verdict" in str(message.parsed.get("Subject", "")):
            return "accept"  # anything but a Verdict is a filter failure too
        return Verdict.next()
