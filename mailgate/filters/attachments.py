"""
The attachment policy ([attachments]): dangerous attachments never reach the mailboxes.  The
same policy applies to every listener that runs it, submission included (an infected internal
machine sends too).

make(context) builds the filter (name "attachments", hook on_data).  The message is walked by
mailgate.filters.mime.walker in context.run_in_thread; the verdict:

  * a blocked attachment and action = reject:
        550 5.7.1 Message rejected: attachment NAME is not allowed (REASON)
    NAME is the file as named in the message ("ARCHIVE: MEMBER" for a file inside an archive,
    "unnamed part 1.2" for a part without a name), ASCII with \\u escapes for anything else;
  * otherwise a structural problem (limits, broken MIME, corrupt archives) and malformed = reject:
        550 5.6.0 Message structure rejected: PROBLEM
  * a blocked attachment and action = quarantine: Verdict.quarantine("attachment NAME is not
    allowed (REASON)");
  * a blocked attachment and action = strip: Verdict.next() with the message replaced by a copy
    in which every blocked part is a short text/plain note naming the file and the reason (should
    stripping itself fail, the message is rejected as for action = reject);
  * else Verdict.next(), the message untouched.

Anything unexpected (an exception while walking, a failed thread) is logged and treated as a
structural problem: never raised to the chain.
"""

from email import policy as email_policy
from email.parser import BytesParser

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailgate.filters import mime as mimewalk
from mailgate.interfaces import IFilter
from mailgate.verdict import Verdict

log = Logger()

MAX_REPLY_NAME = 200  # characters of NAME in an SMTP reply (a reply line is at most 512 octets)


def _ascii(text, limit=MAX_REPLY_NAME):
    """Text fit for an SMTP reply: ASCII, no line breaks, bounded."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(ch if " " <= ch <= "~" else "\\x%02x" % ord(ch) for ch in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(finding):
    """'attachment NAME is not allowed (REASON)' for a mimewalk.Finding."""
    return "attachment %s is not allowed (%s)" % (_ascii(finding.name), _ascii(finding.reason))


def reject_blocked(finding):
    return Verdict.reject(550, "5.7.1", "Message rejected: " + describe(finding))


def reject_malformed(problem):
    return Verdict.reject(550, "5.6.0", "Message structure rejected: " + _ascii(problem, 300))


@implementer(IFilter)
class AttachmentFilter:
    """The attachment policy for one mailgate.config.AttachmentsConfig."""

    name = "attachments"

    def __init__(self, config, run_in_thread):
        self.config = config
        self.policy = mimewalk.policy_from_config(config)
        self._run = run_in_thread

    def on_data(self, session, message):
        d = self._run(self._inspect, message)
        d.addErrback(self._failed, session)
        d.addCallback(self._logged, session)
        return d

    # -- in the thread -------------------------------------------------------------------------

    def _inspect(self, message):
        """-> _Outcome for a mailgate.message.Message (CPU-bound: run in a thread)."""
        try:
            parsed = message.parsed
            if parsed is None:
                parsed = BytesParser(policy=email_policy.default).parsebytes(message.raw)
            report = mimewalk.inspect(parsed, self.policy)
        except Exception:
            return _Outcome(self._malformed_verdict("the message could not be inspected"),
                            failure=Failure())
        return _Outcome(self.decide(parsed, report), report=report)

    def decide(self, parsed, report):
        """Verdict for a mimewalk.Report on the parsed message (see the module docstring)."""
        config = self.config
        if report.blocked and config.action == "reject":
            return reject_blocked(report.blocked[0])
        if report.malformed and config.malformed == "reject":
            return reject_malformed(report.malformed[0])
        if not report.blocked:
            return Verdict.next()
        if config.action == "quarantine":
            return Verdict.quarantine(describe(report.blocked[0]))
        if config.action != "strip":
            return reject_blocked(report.blocked[0])
        try:
            stripped = mimewalk.strip(parsed, report.blocked)
            stripped.as_bytes()  # the chain serializes it: fail here, not there
        except Exception as e:
            report.errors.append(("strip", e))
            return reject_blocked(report.blocked[0])
        return Verdict.next().with_message(stripped)

    def _malformed_verdict(self, problem):
        if self.config.malformed == "reject":
            return reject_malformed(problem)
        return Verdict.next()

    # -- back on the reactor thread -------------------------------------------------------------

    def _failed(self, failure, session):
        return _Outcome(self._malformed_verdict("the message could not be inspected"),
                        failure=failure)

    def _logged(self, outcome, session):
        try:
            self._log(outcome, session)
        except Exception:
            pass  # the verdict matters more than its log line
        return outcome.verdict

    def _log(self, outcome, session):
        if outcome.failure is not None:
            log.failure("attachments: inspecting the message of {session} failed",
                        outcome.failure, session=session)
        report = outcome.report
        if report is None:
            return
        for where, error in report.errors:
            log.error("attachments: {session}: {where}: unexpected {error!r}",
                      session=session, where=where, error=error)
        verdict = outcome.verdict
        if verdict.message is not None:
            log.info("attachments: {session}: stripped {what}", session=session,
                     what="; ".join(describe(f) for f in report.blocked))
        elif verdict.action != "next":
            log.info("attachments: {session}: {action}: {reason}", session=session,
                     action=verdict.action, reason=verdict.reason)


class _Outcome:
    def __init__(self, verdict, report=None, failure=None):
        self.verdict = verdict
        self.report = report
        self.failure = failure


def make(context):
    """The built-in "attachments" filter for the chain: context has config and run_in_thread."""
    return AttachmentFilter(context.config.attachments, context.run_in_thread)
