"""Templates -> subject, text and HTML in the customer's language (Jinja2, strict, HTML escaped)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined

from gateway.paths import templates_dir

TEMPLATES = templates_dir()
EVENTS = ("ack", "agent_reply", "rating_request", "verification", "invite", "notification",
          "escalation", "agent_notice", "alert")
SHIPPED = ("en", "de", "nl", "zh")

# What `deskgate render EVENT` fills in, so an operator can check a template by eye.
SAMPLES: dict[str, dict[str, Any]] = {
    "alert": {"mailbox": "support-mailbox", "server": "imap.example.com:993",
              "folder": "INBOX", "user": "support@example.com", "department": "Support",
              "error": "login as support@example.com refused: NO [AUTHENTICATIONFAILED]",
              "since": "2026-11-23 09:40 UTC", "hostname": "deskgate.example.com"},
    "ack": {"customer_name": "Jess Doe", "department": "Support", "ticket_number": 1234,
            "subject": "Refund for order 1234", "tag": "[#1234]"},
    "agent_reply": {"subject": "Refund for order 1234", "body": "Your refund is on its way.",
                    "body_html": "<p>Your refund is on its way.</p>", "agent_name": "Shawn",
                    "department": "Support", "ticket_number": 1234, "tag": "[#1234]"},
    "rating_request": {"customer_name": "Jess Doe", "department": "Support",
                       "ticket_number": 1234, "subject": "Refund for order 1234",
                       "good_url": "https://helpdesk.example.com/rate/1234.1767225600.x/good",
                       "okay_url": "https://helpdesk.example.com/rate/1234.1767225600.x/okay",
                       "bad_url": "https://helpdesk.example.com/rate/1234.1767225600.x/bad"},
    "verification": {"address": "support@example.com", "department": "Support",
                     "code": "3f9c2a7d1b6e4f08a5c9d2e7b1f4a6c3",
                     "verify_url": "https://helpdesk.example.com/verify/3f9c2a7d1b6e4f08a5c9d2e7b1f4a6c3"},
    "invite": {"agent_name": "Shawn", "department": "Support",
               "invite_url": "https://helpdesk.example.com/invite/abcdef"},
    "agent_notice": {"agent_name": "Shawn", "department": "Support", "ticket_number": 1234,
                     "tag": "[#1234]", "notice": "collision", "author": "Kim",
                     "lines": ["Resend your mail with #force to send it anyway."],
                     "quoted": "Your refund went out this morning."},
    "escalation": {"department": "Support", "ticket_number": 1234, "warning": False,
                   "subject": "Refund for order 1234", "customer": "jess@example.org",
                   "target": "first_response", "due_at": "2026-11-23 10:00 (Europe/Berlin)"},
    "notification": {"marker": "##- Please type your reply above this line -##",
                     "event": "created", "customer": "Jess Doe <jess@example.org>",
                     "customer_name": "Jess Doe", "customer_email": "jess@example.org",
                     "department": "Support", "ticket_number": 1234, "tag": "[#1234]",
                     "subject": "Refund for order 1234",
                     "text": "Hello, I need a refund for order 1234.", "status": "open",
                     "priority": "high", "owner": "Shawn",
                     "due_at": "2026-11-24 10:00 (Europe/Berlin)",
                     "previous": [{"number": 1180, "subject": "Login fails",
                                   "status": "closed"}]},
}


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str
    language: str


def _autoescape(name: str | None) -> bool:
    return bool(name and name.endswith(".html.j2"))


def pick_language(wanted: Iterable[str], fallback: str) -> str:
    """First language tag we ship ('de-CH' -> 'de'), else the department's (RFC 3282 tags)."""
    for tag in wanted:
        primary = tag.strip().split("-", 1)[0].split("_", 1)[0].lower()
        if primary in SHIPPED:
            return primary
    return fallback if fallback in SHIPPED else "en"


def content_languages(header: str | None) -> list[str]:
    return [t for t in (header or "").split(",") if t.strip()]


class Renderer:
    """One Jinja2 environment per template folder set; a department may override any file."""

    def __init__(self, department_dirs: Mapping[str, str] | None = None) -> None:
        self._department_dirs = dict(department_dirs or {})
        self._envs: dict[str | None, Environment] = {}

    def _env(self, department: str | None) -> Environment:
        key = department if department in self._department_dirs else None
        if key not in self._envs:
            loaders = [FileSystemLoader(self._department_dirs[key])] if key else []
            loaders.append(FileSystemLoader(str(TEMPLATES)))
            self._envs[key] = Environment(
                loader=ChoiceLoader(loaders), undefined=StrictUndefined,
                autoescape=_autoescape, keep_trailing_newline=False)
        return self._envs[key]

    def render(self, event: str, language: str, context: Mapping[str, Any],
               department: str | None = None) -> Rendered:
        if event not in EVENTS:
            raise ValueError(f"unknown template event {event!r} (one of {', '.join(EVENTS)})")
        env = self._env(department)
        parts = [env.get_template(f"{language}/{event}.{ext}.j2").render(**context)
                 for ext in ("subject", "txt", "html")]
        subject = " ".join(parts[0].split())  # one line, whatever the template did
        return Rendered(subject, parts[1].strip() + "\n", parts[2].strip() + "\n", language)

    def sample(self, event: str, language: str) -> Rendered:
        return self.render(event, language, SAMPLES[event])
