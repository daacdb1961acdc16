"""readable(mail) -> Readable: what an agent reads of a mail — the best plain text, the
sender's new words, sanitised HTML and the language (issue 12). Pure functions.

HTML becomes text with inscriptis (tables and lists keep their layout); HTML is sanitised
with nh3 (Ammonia's allow-list); quoted history is cut in gateway.ingest.quotes.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, replace
from functools import cache
from urllib.parse import quote, unquote

import nh3
import structlog
from inscriptis import get_text
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from gateway.ingest.language import Classify, classifier
from gateway.ingest.model import AttachmentPart, ParsedMail
from gateway.ingest.quotes import visible_text
from gateway.ingest.tnef import tnef_attachments, tnef_body

# Where a cid: image points: {sha256} of the stored attachment's bytes, {cid} its Content-ID.
DEFAULT_CID_URL = "/attachments/{sha256}"

_TAGS = nh3.ALLOWED_TAGS | {"font", "tfoot"}
_ATTRIBUTES = {tag: set(names) for tag, names in nh3.ALLOWED_ATTRIBUTES.items()}
_ATTRIBUTES["*"] = {"style", "title", "dir", "lang"}
_ATTRIBUTES["font"] = {"color", "face", "size"}
for _cell in ("td", "th", "table", "tr"):
    _ATTRIBUTES.setdefault(_cell, set()).update({"bgcolor", "valign", "width", "height"})
_STYLES = {"color", "background-color", "font-weight", "font-style", "font-size", "font-family",
           "text-align", "text-decoration", "margin", "padding", "border", "width", "height",
           "white-space", "line-height", "vertical-align", "list-style-type"}
# Old IE ran expression(); url() loads remote images past the image block.
_UNSAFE_STYLE = re.compile(r"expression|url\s*\(|javascript|behaviou?r|-moz-binding", re.I)
_CID_REF = re.compile(r"""["'(]\s*cid:([^"')\s]+)""", re.I)
_BLANK_RUN = re.compile(r"\n[ \t]*(?:\n[ \t]*){2,}")
_LANGUAGE_TAG = re.compile(r"\s*([A-Za-z]{2,3})(?:[-_][A-Za-z0-9]+)*\s*(?:,|$)")
LANGUAGE_MIN_CHARS = 20
LANGUAGE_MIN_PROBABILITY = 0.9


@dataclass(frozen=True, slots=True)
class Readable:
    text: str  # the best plain text of the whole mail
    visible_text: str  # what the sender newly wrote: no quoted history, no signature
    html_safe: str | None  # sanitised HTML, remote images blocked; None without HTML
    language: str | None  # ISO 639-1 code when known with confidence


def html_to_text(html: str) -> str:
    """Readable text of an HTML body; scripts and styles are not text."""
    try:
        text = get_text(html)
    except Exception:  # noqa: BLE001 — lxml refuses some documents (empty, only comments)
        return ""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip("\n")


def best_text(mail: ParsedMail) -> str:
    """text/plain when it says something, else the HTML as text, else a winmail.dat body."""
    if mail.text.strip():
        return mail.text
    if mail.html:
        converted = html_to_text(mail.html)
        if converted.strip():
            return converted
    text, html = tnef_body(mail.attachments)
    if text and text.strip():
        return text
    return html_to_text(html) if html else mail.text


def _cid_key(value: str) -> str:
    return unquote(value).strip().strip("<>").lower()


def referenced_cids(html: str | None) -> frozenset[str]:
    """Content-IDs that the HTML shows (src="cid:…", url(cid:…)), lower-cased."""
    return frozenset(_cid_key(found) for found in _CID_REF.findall(html or ""))


def _cid_targets(attachments: tuple[AttachmentPart, ...], cid_url: str) -> dict[str, str]:
    return {_cid_key(part.content_id): cid_url.format(
                sha256=hashlib.sha256(part.payload).hexdigest(), cid=quote(part.content_id))
            for part in attachments if part.content_id}


def _attribute_filter(targets: dict[str, str]):  # type: ignore[no-untyped-def]
    def keep(tag: str, attribute: str, value: str) -> str | None:
        if attribute == "style":
            return None if _UNSAFE_STYLE.search(value) else value
        if tag == "img" and attribute == "src":
            # Only our own stored parts load; a remote image is a tracking pixel until the
            # agent asks for it (it stays in the stored original HTML).
            if value.lower().startswith("cid:"):
                return targets.get(_cid_key(value[4:]))
            return None
        return value
    return keep


def html_safe(html: str, attachments: tuple[AttachmentPart, ...] = (),
              cid_url: str = DEFAULT_CID_URL) -> str:
    """Allow-listed HTML: no script, handlers, forms or remote loads; links nofollow."""
    return nh3.clean(
        html, tags=_TAGS, attributes=_ATTRIBUTES, url_schemes={"http", "https", "mailto", "cid",
                                                                "tel"},
        clean_content_tags={"script", "style", "title", "head", "svg", "math", "template"},
        link_rel="noopener noreferrer nofollow", filter_style_properties=_STYLES,
        attribute_filter=_attribute_filter(_cid_targets(attachments, cid_url)),
        strip_comments=True)


@cache
def _identifier() -> LanguageIdentifier:
    """The langid model shipped in py3langid, loaded once (about a second) on first use."""
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@cache
def _classify() -> Classify:
    """The identifier's classify(), through gateway.ingest.language's faster equivalent."""
    return classifier(_identifier())


def warm_up() -> None:
    """Load the language model now rather than on the first mail (daemon start, benches):
    loading it held the event loop ~0.3-0.5 s, every session waiting behind the first mail."""
    started = time.perf_counter()
    _classify()
    structlog.get_logger("deskgate.ingest").info(
        "ingest.language_model_ready", seconds=round(time.perf_counter() - started, 3))


def detect_language(mail: ParsedMail, text: str) -> str | None:
    """Content-Language (RFC 3282) when declared, else a confident guess from the text."""
    declared = _LANGUAGE_TAG.match(mail.header("content-language") or "")
    if declared:
        return declared.group(1).lower()
    sample = text[:2000]
    if len(sample.strip()) < LANGUAGE_MIN_CHARS:
        return None
    language, probability = _classify()(sample)
    return str(language) if probability >= LANGUAGE_MIN_PROBABILITY else None


def stored_attachments(mail: ParsedMail) -> tuple[AttachmentPart, ...]:
    """The parts to store: inline means shown by the HTML (when there is HTML), and the files
    inside a winmail.dat follow the winmail.dat itself."""
    shown = referenced_cids(mail.html)
    parts = tuple(
        replace(part, inline=bool(part.content_id) and _cid_key(part.content_id) in shown)
        if mail.html else part for part in mail.attachments)
    return parts + tnef_attachments(mail.attachments)


def readable(mail: ParsedMail, cid_url: str = DEFAULT_CID_URL) -> Readable:
    """Everything an agent-facing view needs of one mail; the full text is always kept."""
    text = best_text(mail)
    html = mail.html or tnef_body(mail.attachments)[1]
    visible = visible_text(text) if text.strip() else ""
    return Readable(
        text=text, visible_text=visible,
        html_safe=html_safe(html, mail.attachments, cid_url) if html else None,
        language=detect_language(mail, visible))


def readable_or_plain(mail: ParsedMail, cid_url: str = DEFAULT_CID_URL) -> Readable:
    """readable() for the ingest path: a library bug on hostile input costs the readable
    view of this one mail (it shows the full text), never the mail itself."""
    try:
        return readable(mail, cid_url)
    except Exception:  # noqa: BLE001 — the stored mail matters more than its nicer view
        return Readable(text=mail.text, visible_text=mail.text, html_safe=None, language=None)
