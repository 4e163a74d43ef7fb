"""
File names as a client may read them, and whether the policy allows them: part_names (every
reading of a MIME part's filename/name parameters: RFC 2047 encoded-words, RFC 2231 sections,
duplicates, raw 8-bit bytes), display_name (a name fit to show), clean_name and name_problem
(format and control characters, blocked and double extensions).

Separate because it is pure text handling, used alike for MIME parts (the walk) and archive
members (archives), and needs nothing from either.
"""

import binascii
import quopri
import re
import unicodedata
import urllib.parse

MAX_DISPLAY = 120  # characters of a file name shown in replies and notes

# Format characters (Unicode category Cf) are removed before a name is checked.  They are a
# reason to block by themselves, except the joiners and the direction marks: ZWNJ/ZWJ are part of
# ordinary Persian, Indic and emoji names and LRM/RLM/ALM of Hebrew and Arabic ones, and none of
# them can reorder letters (only the embeddings, overrides and isolates can: "invoice<RLO>fdp.exe"
# shows as "invoiceexe.pdf").  The extension is checked on the name without any of them.
_HARMLESS_FORMAT = frozenset("\u200c\u200d\u200e\u200f\u061c")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_ENCODED_WORD_GAP = re.compile(r"(\?=)\s+(=\?)")
# filename=, name=, filename*=, filename*0*= ... anywhere in a raw header value, quoted or not.
_PARAM = re.compile(
    r"""(?:^|[;\s])((?:file)?name)(?:\*([0-9]{1,3}))?(\*)?\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)""",
    re.IGNORECASE,
)


def _fix_surrogates(text):
    """Undo surrogateescape (raw 8-bit header bytes) by decoding them as UTF-8."""
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


def _decode_bytes(data, charset=None):
    """Bytes of a name in charset, else UTF-8, else Latin-1: never raises."""
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeError, ValueError):
            continue
    return data.decode("latin-1")


def _decode_words(text):
    """RFC 2047 encoded-words anywhere in text (also inside quotes, as mail clients do)."""
    if "=?" not in text:
        return text
    text = _ENCODED_WORD_GAP.sub(r"\1\2", text)

    def word(match):
        charset, encoding, encoded = match.groups()
        charset = charset.split("*", 1)[0]
        try:
            if encoding in "bB":
                data = binascii.a2b_base64(encoded + "=" * (-len(encoded) % 4))
            else:
                data = quopri.decodestring(encoded.replace("_", " ").encode("latin-1", "replace"),
                                           header=True)
        except (binascii.Error, ValueError):
            return match.group(0)
        return _decode_bytes(data, charset)

    return _ENCODED_WORD.sub(word, text)


def _unquote(value):
    if value.startswith('"'):
        value = value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:]
        value = re.sub(r"\\(.)", r"\1", value)
    return value


def _rfc2231(sections):
    """Join RFC 2231 sections [(extended, value)] in order: -> candidate str values."""
    charset = None
    data = bytearray()
    for i, (extended, value) in enumerate(sections):
        if extended:
            if i == 0 and value.count("'") >= 2:
                charset, _language, value = value.split("'", 2)
            data += urllib.parse.unquote_to_bytes(value)
        else:
            data += value.encode("utf-8", "surrogateescape") if _has_surrogates(value) \
                else value.encode("utf-8")
    data = bytes(data)
    out = [_decode_bytes(data, charset)]
    utf8 = data.decode("utf-8", "replace")
    if utf8 not in out:
        out.append(utf8)
    return out


def _has_surrogates(text):
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _raw_param_names(raw):
    """
    Every filename/name parameter in one raw header value, parsed leniently: duplicates kept,
    RFC 2231 continuations joined and decoded, quotes undone.  What a forgiving client may see.
    """
    raw = raw.replace("\r", "").replace("\n", "")
    plain = []
    sections = {}
    for match in _PARAM.finditer(raw):
        key, number, extended, value = match.groups()
        if value.startswith('"'):
            value = _unquote(value)
        else:
            # Unquoted, a value ends at white space, but a forgiving client may read on up to
            # the ";" ("invoice.pdf .exe"): both are checked.
            value = value.strip()
            if " " in value or "\t" in value:
                plain.append(value.split()[0])
        if number is None:
            if extended:
                plain.extend(_rfc2231([(True, value)]))
            else:
                plain.append(value)
        else:
            sections.setdefault(key.lower(), {})[int(number)] = (bool(extended), value)
    for parts in sections.values():
        plain.extend(_rfc2231([parts[n] for n in sorted(parts)]))
    return plain


def part_names(part):
    """
    The file names a MIME part claims, decoded, most authoritative first: Content-Disposition
    filename and Content-Type name as the email package reads them, then every other reading of
    every Content-Disposition/Content-Type header (duplicated headers and parameters, RFC 2231
    sections, encoded-words, raw 8-bit bytes) so that no reading a client might use goes
    unchecked.
    """
    names = []

    def add(value):
        if isinstance(value, tuple):
            charset, _language, text = (list(value) + [None, None, ""])[:3]
            value = _decode_bytes(str(text).encode("latin-1", "replace"), charset)
        if not isinstance(value, str):
            return
        value = _fix_surrogates(_decode_words(_fix_surrogates(value))).strip()
        if value and value not in names:
            names.append(value)

    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            add(part.get_param(param, None, header))
        except Exception:
            pass
    for header in ("content-disposition", "content-type"):
        try:
            values = part.get_all(header, []) or []
        except Exception:  # the email package raises on some hostile headers
            values = []
        for value in values:
            try:
                params = dict(getattr(value, "params", {}) or {})
            except Exception:
                continue
            for key in ("filename", "name"):
                if key in params:
                    add(params[key])
    for header, raw in part.raw_items():
        if header.lower() in ("content-disposition", "content-type") and isinstance(raw, str):
            for value in _raw_param_names(raw):
                add(value)
    return names


def display_name(name):
    """A name fit to show: invisible and control characters as \\uXXXX escapes, shortened."""
    out = []
    for ch in name:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cf", "Cs", "Zl", "Zp") or (category == "Zs" and ch != " "):
            out.append("\\x%02x" % ord(ch) if ord(ch) < 0x100 else "\\u%04x" % ord(ch))
        else:
            out.append(ch)
    text = "".join(out)
    if len(text) > MAX_DISPLAY:
        text = text[:MAX_DISPLAY - 3] + "..."
    return text


def clean_name(name):
    """The name as checked: format and control characters removed, NFKC, the last path
    component, trailing dots and spaces (which Windows drops) removed."""
    name = _fix_surrogates(name)
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cf", "Cc"))
    name = unicodedata.normalize("NFKC", name)
    name = re.split(r"[/\\]", name.strip())
    name = next((piece for piece in reversed(name) if piece.strip(" .")), name[-1])
    return re.sub(r"[\s.]+$", "", name.strip())


def name_problem(name, policy):
    """Why a file name is not allowed, or None."""
    name = _fix_surrogates(name)
    for ch in name:
        category = unicodedata.category(ch)
        if category == "Cf" and ch not in _HARMLESS_FORMAT:
            what = "direction override" if ch in "\u202a\u202b\u202c\u202d\u202e" \
                "\u2066\u2067\u2068\u2069" else "invisible"
            return "%s character U+%04X in file name" % (what, ord(ch))
        if category == "Cc":
            return "control character U+%04X in file name" % ord(ch)
    clean = clean_name(name)
    # "evil.exe:stream" is evil.exe on NTFS.
    for candidate in dict.fromkeys((clean, clean.split(":", 1)[0].rstrip(" ."))):
        folded = candidate.casefold()
        for ext in policy.extensions:
            if folded.endswith("." + ext):
                disguise = re.search(r"\.([a-z0-9]{1,5})$", folded[:-len(ext) - 1])
                if disguise:
                    return "blocked file type .%s (double extension .%s.%s)" % (
                        ext, disguise.group(1), ext)
                return "blocked file type .%s" % ext
    return None
