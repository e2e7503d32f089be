"""A file's type from its first bytes, named as Zeek's file analysis names it (mime_type).

Zeek does not believe Content-Type headers: its http.log `orig_mime_types`/`resp_mime_types`
come from signatures over the start of each (de-chunked, decompressed) body, the strongest
match winning. The same idea here, with our own checks and Zeek's type names and order of
precedence: binary formats by their magic numbers, then markup (HTML beats XML, both beat
plain text), JSON, and last "text/plain" for a start of at least ten printable or blank
characters after an optional byte-order mark. No match: None (Zeek logs no type then).
"""

from __future__ import annotations

import re

HEAD_BYTES = 4096  # how much of a body is looked at (Zeek's default_file_bof_buffer_size)

# (strength, type, check): the strongest matching check names the file
_BOM = rb"(?:\xef\xbb\xbf|(?:\x00\x00)?\xfe\xff|\xff\xfe(?:\x00\x00)?)?"
_BLANKS = rb"[\r\n \t]*"
# blanks and comments before markup, one of them per repetition: nested optional runs
# ("(?:[ ]*(?:<!--...-->)?[ ]*)*") backtrack exponentially on a long run of blanks
_LEAD = rb"(?:[\r\n \t]|<!--.*?-->)*+"  # possessive: never given back (what follows starts with "<")
_XML_DECL = rb"(?:<\?xml .*?\?>" + _LEAD + rb")?"
_SIGNATURES: list[tuple[int, str, re.Pattern]] = [
    (-20, "text/plain", re.compile(_BOM + rb"[\t\n\x0b\x0c\r\x20-\x7e]{10}")),
    (10, "application/xml", re.compile(_LEAD + rb"<\?xml ", re.S)),
    (100, "text/html", re.compile(_LEAD + _XML_DECL + rb"<(?:!doctype +html|html)", re.S | re.I)),
    (20, "text/html", re.compile(_LEAD + _XML_DECL + rb"<(?:head|title|body)", re.S | re.I)),
    (1, "text/json", re.compile(rb"(?:\xef\xbb\xbf)?" + _BLANKS + rb"\{" + _BLANKS
                                + rb"(?:\"[^\"]+\"|[A-Za-z][A-Za-z0-9_]*)" + _BLANKS + rb":" + _BLANKS
                                + rb"(?:[\"\[{0-9-]|true|false|null)")),
    (1, "text/json", re.compile(rb"(?:\xef\xbb\xbf)?" + _BLANKS + rb"\[" + _BLANKS
                                + rb"(?:[{\[]|(?:\"[^\"]*\"|-?[0-9]+(?:\.[0-9]+)?|true|false|null)" + _BLANKS + rb"[,\]])")),
    (100, "application/x-dosexec", re.compile(rb"MZ")),
    (100, "application/x-executable", re.compile(rb"\x7fELF")),
    (70, "application/pdf", re.compile(rb"%PDF-")),
    (10, "application/zip", re.compile(rb"PK\x03\x04", re.S)),
    (100, "application/java-archive", re.compile(rb"PK\x03\x04.{1,200}META-INF/", re.S)),
    (71, "application/x-java-applet", re.compile(rb"\xca\xfe\xba\xbe\x00\x00\x00[\x2e-\x44]")),
    (60, "application/x-shockwave-flash", re.compile(rb"[FCZ]WS")),
    (100, "application/x-gzip", re.compile(rb"\x1f\x8b")),
    (100, "application/x-bzip2", re.compile(rb"BZh[1-9]")),
    (100, "application/x-7z-compressed", re.compile(rb"7z\xbc\xaf\x27\x1c")),
    (100, "application/x-rar", re.compile(rb"Rar!\x1a\x07")),
    (100, "application/vnd.ms-cab-compressed", re.compile(rb"MSCF\x00\x00\x00\x00")),
    (100, "image/png", re.compile(rb"\x89PNG\r\n\x1a\n")),
    (100, "image/gif", re.compile(rb"GIF8[79]a")),
    (52, "image/jpeg", re.compile(rb"\xff\xd8\xff")),
    (50, "image/x-ms-bmp", re.compile(rb"BM.{12}[\x0c\x28\x38\x40\x6c\x7c]\x00\x00\x00", re.S)),
    (50, "image/tiff", re.compile(rb"II[\x2a\x2b]\x00|MM\x00[\x2a\x2b]")),
    (50, "image/x-icon", re.compile(rb"\x00\x00\x01\x00[\x01-\x20]\x00", re.S)),
    (50, "image/webp", re.compile(rb"RIFF.{4}WEBP", re.S)),
    (50, "audio/mpeg", re.compile(rb"ID3[\x02-\x04]")),
]


# Strongest first (a stable sort: among equal strengths the list's order), so the first match
# is the strongest. All the checks as one pattern, an alternative each in that order, each
# with its own flags: a match tries them in turn, as a loop over the patterns did, in one
# call instead of up to 26 (a quarter of HTTP's parse time went to that loop).
_BY_STRENGTH = sorted(_SIGNATURES, key=lambda sig: -sig[0])


def _scoped(pattern: re.Pattern) -> bytes:
    """The pattern as a group carrying its own flags (S and I are the only ones used)."""
    flags = ("s" if pattern.flags & re.S else "") + ("i" if pattern.flags & re.I else "")
    return (b"(?" + flags.encode() + b":" if flags else b"(?:") + pattern.pattern + b")"


_ANY = re.compile(b"|".join(b"(?P<g%d>%s)" % (i, _scoped(p)) for i, (_, _, p) in enumerate(_BY_STRENGTH)))
_NAMES = {f"g{i}": name for i, (_, name, _) in enumerate(_BY_STRENGTH)}


def sniff(head: bytes | None) -> str | None:
    """The type of a file starting with `head` (its first bytes), or None."""
    if not head:
        return None
    m = _ANY.match(head[:HEAD_BYTES])
    return _NAMES[m.lastgroup] if m else None
