"""Named, ordered checks that tell customer mail from loops, bounces and robots (DESIGN 4)."""

from __future__ import annotations

import re
from collections.abc import Callable

from gateway.ingest.bounce import is_success_only
from gateway.ingest.model import Classification, Envelope, MailKind, ParsedMail, RuleHit

Check = Callable[[ParsedMail, Envelope, frozenset[str]], RuleHit | None]

# The strongest hit decides the kind: a loop with ourselves beats everything.
_STRENGTH = {MailKind.CUSTOMER: 0, MailKind.BULK: 1, MailKind.AUTO_REPLY: 2,
             MailKind.REPORT: 3, MailKind.BOUNCE: 4, MailKind.OWN_MAIL: 5}

_REPORT_TYPE = re.compile(r"""report-type\s*=\s*"?\s*([A-Za-z0-9._-]+)""", re.I)
_DAEMON = re.compile(r"mailer[-_ ]?daemon|mail[-_ ]daemon|\bmail delivery (?:sub)?system\b", re.I)
_POSTMASTER = re.compile(r"\bpostmaster\b", re.I)
_FORWARD_OR_REPLY = re.compile(r"^\s*(?:re|fw|fwd|aw|wg|tr|sv|antw|vs)\s*(?:\[\d+\])?\s*:", re.I)

# Subjects of auto-replies as Exchange, Gmail, Apple, Zimbra and others word them,
# matched at the start only: "Re: out of office policy" from a customer must not hit.
_AUTOREPLY_SUBJECT = re.compile(r"""^\s*(?:
    out\ of\ (?:the\ )?office | auto(?:matic|mated)?[\s_-]*(?:reply|response|respons|answer)
  | auto\s*: | autosvar | automatisk\ svar | automatisch(?:e)?\ (?:antwort|antwoord|beantwoording)
  | abwesenheits?(?:notiz|meldung) | abwesend | afwezig | niet\ aanwezig
  | r[ée]ponse\ automatique | absence\ du\ bureau
  | automatyczna\ odpowied | risposta\ automatica | respuesta\ autom[aá]tica
  | resposta\ autom[aá]tica | automaattinen\ vastaus | automatick[aá]\ odpov[eě]d
  | 自动回复 | 自動回覆 | 自動回復 | 自動応答 | 自動返信 | 자동\s*응답
  | on\ vacation | vacation\ (?:reply|notice|message|response)
  | (?:i\ am|i'm)\ (?:currently\ )?(?:out\ of|away\ from)\ (?:the|my)\ office
)""", re.I | re.X)

# Failure subjects of MTAs (Postfix, Exim, qmail, Sendmail, Exchange, Gmail, Domino, ...).
_BOUNCE_SUBJECT = re.compile(r"""^\s*(?:
    undelivered\ mail | undeliverable | undelivered\ message | unzustellbar | onbestelbaar
  | non\ remis | non\ recapitabile | no\ entregado
  | delivery\ status\ notification\ \((?:failure|delay)
  | delivery\ status\ notification:\ (?:failed|error|delayed)
  | mail\ delivery\ failed | message\ delivery\ (?:has\ )?failed | delivery\ failure
  | delivery\ notification:\ delivery\ has | failure\ notice | returned\ mail
  | mail\ system\ error | mail\ delivery\ failure | email\ delivery\ (?:error|failure)
  | delayed\ mail | warning:\ could\ not\ send | postmaster\ notify
  | \[postmaster\] | sorry,\ your\ message\ could\ not | there\ was\ an\ error\ sending
  | message\ you\ sent\ blocked | notice:\ mail\ delivery\ status | delivery\ report
  | delivery\ status$ | mail\ could\ not\ be\ delivered | nondeliverable
  | メールエラー通知 | 配信不能 | 未送達
)""", re.I | re.X)

# Opening lines of MTA-written bounces; read only from the start of the text so a customer
# quoting a bounce further down is not mistaken for one.
_BOUNCE_BODY = re.compile(r"""(?:
    this\ is\ the\ mail\ system\ at\ host | this\ message\ was\ created\ automatically\ by\ mail
  | this\ is\ the\ qmail-send\ program | the\ original\ message\ was\ received\ at
  | delivery\ to\ the\ following\ recipients?\ (?:failed|has\ been\ delayed)
  | delivery\ has\ failed\ to\ these\ recipients | could\ not\ be\ delivered\ to\ one\ or\ more
  | your\ message\ (?:could\ not\ be|wasn't|was\ not)\ delivered
  | unable\ to\ deliver\ (?:your\ )?message | permanent\ fatal\ errors
  | message\ could\ not\ be\ delivered | i'm\ sorry\ to\ have\ to\ inform\ you
  | undeliverable\ message | mail\ delivery\ (?:failed|error)
)""", re.I | re.X)

_AUTOREPLY_HEADERS = ("x-autoreply", "x-autorespond", "x-auto-reply", "x-autoreply-from",
                      "x-mail-autoreply", "x-autoresponder", "x-vacation")
_AUTOREPLY_MAILER = re.compile(r"vacation|auto[-_ ]?(?:reply|respon)", re.I)


def _report_type(mail: ParsedMail) -> str | None:
    value = mail.header("content-type") or ""
    if not value.lower().lstrip().startswith("multipart/report"):
        return None
    match = _REPORT_TYPE.search(value)
    return match.group(1).lower() if match else ""


def _has_part(mail: ParsedMail, content_type: str) -> bool:
    return any(part.content_type == content_type for part in mail.attachments)


def own_address(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    sender = (mail.from_addr or "").lower()
    if sender and sender in own:
        return RuleHit("own-address", f"From {sender} is one of our own addresses")
    return None


def delivery_status_report(mail: ParsedMail, envelope: Envelope,
                           own: frozenset[str]) -> RuleHit | None:
    """RFC 3464: multipart/report; report-type=delivery-status, unless it reports success."""
    kind = _report_type(mail)
    is_dsn = kind in ("delivery-status", "global-delivery-status") or (
        kind is not None and _has_part(mail, "message/delivery-status"))
    if is_dsn and not is_success_only(mail):
        return RuleHit("delivery-status-report", f"multipart/report; report-type={kind}")
    return None


def bounce_subject(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    if _BOUNCE_SUBJECT.match(mail.subject) and not is_success_only(mail):
        return RuleHit("bounce-subject", f"failure subject {mail.subject[:80]!r}")
    return None


def mailer_daemon_sender(mail: ParsedMail, envelope: Envelope,
                         own: frozenset[str]) -> RuleHit | None:
    sender = mail.header("from") or ""
    if _DAEMON.search(sender) and not is_success_only(mail):
        return RuleHit("mailer-daemon-sender", f"From {sender[:80]!r}")
    return None


def bounce_body(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    if _FORWARD_OR_REPLY.match(mail.subject) or is_success_only(mail):
        return None  # a customer forwarding a bounce to us wants help with it
    sender_is_robot = envelope.mail_from in ("", "<>") or \
        _POSTMASTER.search(mail.header("from") or "")
    if not sender_is_robot and _report_type(mail) is None:
        return None  # the body's wording alone decides nothing: skip the costly search
    match = _BOUNCE_BODY.search(mail.text, 0, 1500)
    if match:
        return RuleHit("bounce-body", f"MTA text {match.group(0)!r}")
    return None


def delivery_success_report(mail: ParsedMail, envelope: Envelope,
                            own: frozenset[str]) -> RuleHit | None:
    if _report_type(mail) is not None and is_success_only(mail):
        return RuleHit("delivery-success-report", "DSN reports delivery only (RFC 3464 2.3.3)")
    return None


def feedback_report(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    """RFC 5965 ARF abuse/feedback report."""
    if _report_type(mail) == "feedback-report" or _has_part(mail, "message/feedback-report"):
        return RuleHit("feedback-report", "ARF report (RFC 5965)")
    return None


def disposition_notification(mail: ParsedMail, envelope: Envelope,
                             own: frozenset[str]) -> RuleHit | None:
    """RFC 8098 read receipt (MDN)."""
    if (_report_type(mail) == "disposition-notification"
            or _has_part(mail, "message/disposition-notification")):
        return RuleHit("disposition-notification", "read receipt (RFC 8098)")
    return None


def other_report(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    kind = _report_type(mail)
    if kind is not None and kind not in ("delivery-status", "global-delivery-status",
                                         "feedback-report", "disposition-notification"):
        return RuleHit("machine-report", f"multipart/report; report-type={kind or '?'}")
    return None


def auto_submitted(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    """RFC 3834 5: any Auto-Submitted value other than "no" marks automatic mail."""
    value = mail.header("auto-submitted")
    if value is not None and value.split(";", 1)[0].strip().lower() not in ("no", ""):
        return RuleHit("auto-submitted-header", f"Auto-Submitted: {value[:60]}")
    return None


def auto_reply_header(mail: ParsedMail, envelope: Envelope,
                      own: frozenset[str]) -> RuleHit | None:
    for name in _AUTOREPLY_HEADERS:
        if mail.header(name) is not None:
            return RuleHit("auto-reply-header", f"{name} present")
    checks = (("x-autogenerated", "reply"), ("x-fc-machinegenerated", "true"),
              ("precedence", "auto_reply"), ("x-precedence", "auto_reply"))
    for name, needle in checks:
        if needle in (mail.header(name) or "").lower():
            return RuleHit("auto-reply-header", f"{name}: {needle}")
    mailer = mail.header("x-mailer") or ""
    if _AUTOREPLY_MAILER.search(mailer):
        return RuleHit("auto-reply-header", f"X-Mailer: {mailer[:60]}")
    return None


def auto_response_suppress(mail: ParsedMail, envelope: Envelope,
                           own: frozenset[str]) -> RuleHit | None:
    """Exchange marks its automatic mail (OOF, receipts) with X-Auto-Response-Suppress."""
    value = mail.header("x-auto-response-suppress")
    if value is not None and value.strip().lower() != "none":
        return RuleHit("auto-response-suppress", f"X-Auto-Response-Suppress: {value[:60]}")
    return None


def auto_reply_subject(mail: ParsedMail, envelope: Envelope,
                       own: frozenset[str]) -> RuleHit | None:
    if _AUTOREPLY_SUBJECT.match(mail.subject):
        return RuleHit("auto-reply-subject", f"subject {mail.subject[:80]!r}")
    return None


def null_sender(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    """RFC 5321 4.5.5 / RFC 3834 3.3: only automatic mail uses the null reverse-path <>."""
    if envelope.mail_from is not None and envelope.mail_from.strip() in ("", "<>"):
        return RuleHit("null-envelope-sender", "MAIL FROM:<>")
    return None


def precedence_bulk(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    value = (mail.header("precedence") or "").strip().lower()
    if value in ("bulk", "junk", "list"):
        return RuleHit("precedence-bulk", f"Precedence: {value}")
    return None


def list_headers(mail: ParsedMail, envelope: Envelope, own: frozenset[str]) -> RuleHit | None:
    """RFC 2919 List-Id, RFC 2369 List-*: list or newsletter traffic (ezmlm: Mailing-List)."""
    for name in ("list-id", "list-unsubscribe", "list-post", "list-subscribe", "mailing-list"):
        value = mail.header(name)
        if value is not None:
            return RuleHit("list-headers", f"{name}: {value[:60]}")
    return None


# Ordered as they are reported; the order does not change the kind (strongest wins).
RULES: tuple[tuple[MailKind, Check], ...] = (
    (MailKind.OWN_MAIL, own_address),
    (MailKind.BOUNCE, delivery_status_report),
    (MailKind.BOUNCE, bounce_subject),
    (MailKind.BOUNCE, mailer_daemon_sender),
    (MailKind.BOUNCE, bounce_body),
    (MailKind.REPORT, delivery_success_report),
    (MailKind.REPORT, feedback_report),
    (MailKind.REPORT, disposition_notification),
    (MailKind.REPORT, other_report),
    (MailKind.AUTO_REPLY, auto_submitted),
    (MailKind.AUTO_REPLY, auto_reply_header),
    (MailKind.AUTO_REPLY, auto_response_suppress),
    (MailKind.AUTO_REPLY, auto_reply_subject),
    (MailKind.AUTO_REPLY, null_sender),
    (MailKind.BULK, precedence_bulk),
    (MailKind.BULK, list_headers),
)


def classify(mail: ParsedMail, envelope: Envelope,
             own_addresses: frozenset[str]) -> Classification:
    """Run every rule; all hits are kept so a suppression can be explained later."""
    own = frozenset(address.lower() for address in own_addresses)
    kind = MailKind.CUSTOMER
    hits: list[RuleHit] = []
    for rule_kind, check in RULES:
        hit = check(mail, envelope, own)
        if hit is None:
            continue
        hits.append(hit)
        if _STRENGTH[rule_kind] > _STRENGTH[kind]:
            kind = rule_kind
    return Classification(kind, tuple(hits))
