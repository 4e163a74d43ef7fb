"""
Example third-party filters, loaded by dotted path in the tests the way a user's own module would
be (`filters = tests.thirdparty_filter.SubjectTagger`, options from `[filter:NAME]`).
"""

import copy

from zope.interface import implementer

from mailgate.interfaces import IFilter
from mailgate.verdict import Verdict


@implementer(IFilter)
class SubjectTagger:
    """
    Puts a tag in front of the Subject of mail from clients that may not relay (the internet):
    [filter:tests.thirdparty_filter.SubjectTagger] tag = [EXTERNAL].  Options: tag (required),
    header (optional: a header added as "header: tagged").
    """

    name = "subject-tagger"

    def __init__(self, options):
        if "tag" not in options:
            raise ValueError("option tag is required")
        self.tag = options["tag"]
        self.header = options.get("header")

    def on_data(self, session, message):
        if session.relay_allowed:
            return Verdict.next()
        subject = message.parsed.get("Subject", "")
        if subject.startswith(self.tag):
            return Verdict.next()
        tagged = copy.deepcopy(message.parsed)  # never edit the message the chain gave us
        del tagged["Subject"]
        tagged["Subject"] = ("%s %s" % (self.tag, subject)).strip()
        verdict = Verdict.next().with_message(tagged)
        if self.header:
            verdict = verdict.with_headers([(self.header, "tagged")])
        return verdict


class NoHooks:
    """Has a name but no hook: not a filter."""

    name = "no-hooks"

    def __init__(self, options):
        pass

