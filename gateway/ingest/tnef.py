"""winmail.dat (MS-TNEF): the real attachments and body Outlook wrapped inside it (issue 12).

The application/ms-tnef part itself stays an attachment: nothing is thrown away.
"""

from __future__ import annotations

from tnefparse import TNEF

from gateway.ingest.model import AttachmentPart

TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})


def is_tnef(part: AttachmentPart) -> bool:
    name = (part.filename or "").lower()
    return part.content_type.lower() in TNEF_TYPES or name == "winmail.dat"


def _decode(data: bytes | str | None) -> str | None:
    if data is None or isinstance(data, str):
        return data or None
    text = data.rstrip(b"\x00")
    try:
        return text.decode("utf-8")
    except UnicodeError:
        return text.decode("cp1252", "replace")


def _read(part: AttachmentPart) -> TNEF | None:
    try:
        return TNEF(part.payload, do_checksum=False)
    except Exception:  # noqa: BLE001 — a broken winmail.dat stays an opaque attachment
        return None


def _name(attachment: object) -> str | None:
    try:
        name = attachment.long_filename()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 — a missing name only costs the name
        name = getattr(attachment, "name", None)
    if isinstance(name, bytes):
        name = _decode(name)
    return name.strip("\x00 ") or None if isinstance(name, str) else None


def tnef_attachments(parts: tuple[AttachmentPart, ...]) -> tuple[AttachmentPart, ...]:
    """The files inside every winmail.dat among the parts (the parts themselves not repeated)."""
    found: list[AttachmentPart] = []
    for part in filter(is_tnef, parts):
        tnef = _read(part)
        for attachment in tnef.attachments if tnef else ():
            data = attachment.data if isinstance(attachment.data, bytes) else b""
            found.append(AttachmentPart(_name(attachment), "application/octet-stream", data,
                                        False))
    return tuple(found)


def tnef_body(parts: tuple[AttachmentPart, ...]) -> tuple[str | None, str | None]:
    """(plain text, HTML) of the first winmail.dat that carries a body."""
    for part in filter(is_tnef, parts):
        tnef = _read(part)
        if tnef is None:
            continue
        text, html = _decode(tnef.body), _decode(tnef.htmlbody)
        if text or html:
            return text, html
    return None, None
