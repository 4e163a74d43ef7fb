"""
The walk itself: inspect() walks a parsed message's MIME tree with an explicit stack (parts and
depth counted), reports structural defects, checks each part's names and declared content
types, decodes its payload and has the archive inspector examine it (and the sniffers the
uuencoded files in a text body), and returns the Report; strip() writes the copy without the
blocked parts.

Separate because it is the only module that knows MIME structure: it puts the detectors (names,
sniff, archives, decode) together, and none of them imports it.
"""

import copy
import quopri
import re
from email import errors as email_errors
from email.message import MIMEPart

from mailgate.filters.mime.archives import _Blocked, _Corrupt, _Inspector, _Source
from mailgate.filters.mime.decode import _cte, _decode_base64, _decode_uu, decode_payload
from mailgate.filters.mime.names import _decode_bytes, display_name, name_problem, part_names
from mailgate.filters.mime.policy import Finding, Report
from mailgate.filters.mime.sniff import HEAD_SIZE, sniff_executable

MAX_UU_BLOCKS = 64  # uuencoded files in one text part whose content is checked (names: all)

# ---------------------------------------------------------------------------------------------
# MIME.
# ---------------------------------------------------------------------------------------------

_STRUCTURAL_DEFECTS = {
    email_errors.StartBoundaryNotFoundDefect: "multipart start boundary not found",
    email_errors.CloseBoundaryNotFoundDefect: "multipart close boundary not found",
    email_errors.NoBoundaryInMultipartDefect: "multipart without a boundary",
    email_errors.MultipartInvariantViolationDefect: "multipart without parts",
    email_errors.MissingHeaderBodySeparatorDefect: "header line without a colon",
    email_errors.FirstHeaderLineIsContinuationDefect: "first header line is a continuation",
    email_errors.InvalidMultipartContentTransferEncodingDefect:
        "multipart with a Content-Transfer-Encoding other than 7bit, 8bit or binary",
}
_UNIQUE_HEADERS = ("content-type", "content-transfer-encoding")
_BOUNDARY = re.compile(r"(?:^|[;\s])boundary\*?[0-9]*\*?\s*=", re.IGNORECASE)
_UU_BEGIN = re.compile(rb"^begin [0-7]{3,4} ", re.MULTILINE)


def _where(path):
    return "part %s" % ".".join(str(i + 1) for i in path) if path else "message body"


def _content_type(part, raw_headers, children):
    """part.get_content_type(), or when the email package cannot parse the header (it raises
    on some), the raw value; a part parsed as a container stays one."""
    try:
        return part.get_content_type()
    except Exception:
        pass
    for header, value in raw_headers:
        if header == "content-type":
            ctype = re.sub(r"\s+", "", str(value).split(";", 1)[0]).lower()
            if re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", ctype):
                if (children is not None) == ctype.startswith(("multipart/", "message/")):
                    return ctype
            break
    return "multipart/mixed" if children is not None else "application/octet-stream"


def _declared_types(part, ctype):
    types = [ctype]
    for header, raw in part.raw_items():
        if header.lower() == "content-type" and isinstance(raw, str):
            value = raw.replace("\r", "").replace("\n", "").split(";", 1)[0].strip().lower()
            value = re.sub(r"\s+", "", value)
            if value and value not in types:
                types.append(value)
    return types


def _type_blocked(types, policy):
    for declared in types:
        for blocked in policy.mime_types:
            if blocked.endswith("/*"):
                if declared.split("/", 1)[0] == blocked[:-2]:
                    return declared
            elif declared == blocked:
                return declared
    return None


def _children(part):
    if part.is_multipart():  # the payload is a list: get_payload() returns it as is
        return part.get_payload()
    return None


def _reparse_encoded_message(part):
    """
    A message/* part with a base64 or quoted-printable body (forbidden by RFC 2046, so the email
    package parsed the encoded text itself as the inner message): decode and parse it again.
    """
    from email.parser import BytesParser
    children = _children(part) or []
    if not children:
        return None
    encoded = children[0].as_bytes()
    cte = _cte(part)
    data = _decode_base64(encoded)[0] if cte == "base64" else quopri.decodestring(encoded)
    return BytesParser(policy=part.policy).parsebytes(data)


class _Walk:
    def __init__(self, policy):
        self.policy = policy
        self.report = Report()
        self.inspector = _Inspector(policy, self.report)

    def _malformed(self, text):
        if text not in self.report.malformed:
            self.report.malformed.append(text)

    def _block(self, path, name, reason):
        self.report.blocked.append(Finding(tuple(path), name, reason))

    def run(self, message):
        policy = self.policy
        # (path of the part, the part, its MIME depth, anchor): anchor is None, or the path of the
        # message/* part whose decoded body this part comes from (what to strip for it).
        stack = [((), message, 0, None)]
        while stack:
            path, part, depth, anchor = stack.pop()
            self.report.parts += 1
            if self.report.parts > policy.max_parts:
                self._malformed("more than max_parts (%d) MIME parts" % policy.max_parts)
                if policy.stop_at_limits:
                    break
            if depth > policy.max_mime_depth:
                self._malformed("MIME nesting deeper than max_mime_depth (%d)"
                                % policy.max_mime_depth)
                if policy.stop_at_limits:
                    break
            try:
                children, reparsed = self._part(path, part, anchor)
            except Exception as e:  # the other parts are still checked
                self.report.errors.append((_where(path), e))
                self._malformed("%s could not be inspected (%s)" % (_where(path), type(e).__name__))
                children, reparsed = None, False
            if children:
                child_anchor = path if reparsed and anchor is None else anchor
                for i in reversed(range(len(children))):
                    stack.append((path + (i,), children[i], depth + 1, child_anchor))
        return self.report

    def _part(self, path, part, anchor):
        """Check one part -> (its children to walk or None, whether they were re-parsed)."""
        where = _where(path)
        strip_path = anchor if anchor is not None else path
        for defect in getattr(part, "defects", ()) or ():
            for kind, text in _STRUCTURAL_DEFECTS.items():
                if isinstance(defect, kind):
                    self._malformed("%s: %s" % (where, text))
        raw_headers = [(name.lower(), value) for name, value in part.raw_items()]
        for name in _UNIQUE_HEADERS:
            if sum(1 for header, _value in raw_headers if header == name) > 1:
                self._malformed("%s: more than one %s header" % (where, name.title()))
        for header, value in raw_headers:
            if header == "content-type" and len(_BOUNDARY.findall(str(value))) > 1:
                # Each MIME parser picks one of them: the structure is whatever it chooses.
                self._malformed("%s: more than one boundary parameter" % where)
        children = _children(part)
        ctype = _content_type(part, raw_headers, children)  # parsing headers is costly: once
        maintype = ctype.split("/", 1)[0]
        if children is not None and maintype != "message":
            return children, False
        if children is None and maintype in ("multipart", "message"):
            maintype = "application"  # not parsed as a container: examined as a file
        # A name parameter always has "name" in its key, whatever encoding its value uses.
        mentions_name = any("name" in str(value).lower() for header, value in raw_headers
                            if header in ("content-type", "content-disposition"))
        names = part_names(part) if mentions_name else []
        label = display_name(names[0]) if names else "unnamed %s" % where if path else where
        if self._blocked_by_headers(strip_path, part, ctype, names, label):
            return None, False
        if maintype == "message":
            if ctype == "message/partial":
                self._block(strip_path, label, "fragmented message (message/partial) cannot be "
                            "inspected")
                return None, False
            cte = _cte(part)
            if cte in ("base64", "quoted-printable"):
                self._malformed("%s: message/* part with Content-Transfer-Encoding %s"
                                % (where, cte))
                inner = _reparse_encoded_message(part)
                return ([inner], True) if inner is not None else (None, False)
            return children, False
        data, problem = decode_payload(part)
        if problem:
            self._malformed("%s: %s" % (where, problem))
        attachment = bool(names) or maintype not in ("text", "multipart", "message") or any(
            header == "content-disposition" and
            str(value).split(";", 1)[0].strip().lower() == "attachment"
            for header, value in raw_headers)
        try:
            self.inspector.examine(_Source.of_bytes(data), label, 0, attachment=attachment)
        except _Blocked as e:
            self._block(strip_path, e.label, e.reason)
            return None, False
        except _Corrupt as e:
            self._malformed("%s: %s" % (e.label, e.reason))
        if maintype == "text" and _UU_BEGIN.search(data):
            self._inline_uuencode(strip_path, label, data)
        return None, False

    def _blocked_by_headers(self, strip_path, part, ctype, names, label):
        for name in names:
            reason = name_problem(name, self.policy)
            if reason:
                self._block(strip_path, display_name(name), reason)
                return True
        declared = _type_blocked(_declared_types(part, ctype), self.policy) \
            if self.policy.mime_types else None
        if declared:
            self._block(strip_path, label, "blocked content type %s" % declared)
            return True
        return False

    def _inline_uuencode(self, strip_path, label, data):
        """
        uuencoded files in a plain text body (Outlook shows them as attachments): every name is
        checked, the content of the first MAX_UU_BLOCKS (their first HEAD_SIZE bytes).
        """
        for count, match in enumerate(_UU_BEGIN.finditer(data)):
            end = data.find(b"\n", match.end())
            line = data[match.end():end if end >= 0 else len(data)].strip()
            name = _decode_bytes(line)
            member = "%s: %s" % (label, display_name(name))
            reason = name_problem(name, self.policy)
            if reason is None and self.policy.detect_executables and count < MAX_UU_BLOCKS:
                encoded = data[match.start():match.start() + 2 * HEAD_SIZE]  # 45 bytes a line
                block, _ok = _decode_uu(encoded, HEAD_SIZE)
                reason = sniff_executable(block[:HEAD_SIZE], True)
                reason = reason and "executable content (%s)" % reason
            if reason:
                self._block(strip_path, member, reason)
                return


def inspect(message, policy):
    """Walk message (an email.message.EmailMessage) under policy (a Policy) -> Report."""
    return _Walk(policy).run(message)


# ---------------------------------------------------------------------------------------------
# Stripping.
# ---------------------------------------------------------------------------------------------


def _get(message, path):
    part = message
    for i in path:
        part = part.get_payload()[i]
    return part


def strip(message, findings):
    """
    A copy of message with each MIME part named by findings replaced by a short text/plain part
    saying what was removed and why.  A blocked part that is the whole of an attached message
    takes that message/rfc822 part with it; the root, when it is itself the attachment, keeps its
    headers and gets the note as its body.  The original message is not modified.
    """
    new = copy.deepcopy(message)
    notes = {}
    for finding in findings:
        path = tuple(finding.path)
        while path and _get(new, path[:-1]).get_content_maintype() == "message":
            path = path[:-1]
        notes.setdefault(path, []).append(finding)
    done = []
    for path in sorted(notes, key=len):
        if any(path[:len(parent)] == parent for parent in done):
            continue  # inside a part already replaced
        done.append(path)
        lines = ["The mail gateway removed an attachment from this message:", ""]
        for finding in notes[path]:
            lines.append("  %s: %s" % (finding.name, finding.reason))
        text = "\n".join(lines) + "\n"
        if not path:
            new.clear_content()
            new.set_content(text, disposition="inline")
            continue
        note = MIMEPart(policy=new.policy)
        note.set_content(text, disposition="inline")
        _get(new, path[:-1]).get_payload()[path[-1]] = note
    return new
