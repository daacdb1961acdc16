"""Small builders for test mails and a real SMTP client that reports reply codes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import aiosmtplib

_counter = itertools.count(1)


def make_mail(subject: str = "Refund needed", sender: str = "Jess <jess@example.org>",
              to: str = "support@example.test", body: str = "Hello, I need help.",
              message_id: str | None = None, in_reply_to: str | None = None,
              references: str | None = None, date: str = "Mon, 23 Nov 2026 10:00:00 +0000",
              headers: dict[str, str] | None = None) -> bytes:
    if message_id is None:
        message_id = f"<m{next(_counter)}.test@example.org>"
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}", f"Date: {date}",
             f"Message-ID: {message_id}", "MIME-Version: 1.0",
             "Content-Type: text/plain; charset=utf-8"]
    if in_reply_to:
        lines.append(f"In-Reply-To: {in_reply_to}")
    if references:
        lines.append(f"References: {references}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


@dataclass(frozen=True)
class Reply:
    code: int
    message: str
    stage: str  # mail | rcpt | data


async def send(port: int, data: bytes, mail_from: str = "jess@example.org",
               rcpts: tuple[str, ...] = ("support@example.test",),
               mail_options: tuple[str, ...] = (), helo: str | None = None) -> Reply:
    """One SMTP transaction over a real socket; the first refusal or the DATA answer."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False,
                             local_hostname=helo)
    await client.connect()
    stage = "mail"
    try:
        await client.ehlo()
        await client.mail(mail_from, options=list(mail_options))
        stage = "rcpt"
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        stage = "data"
        response = await client.data(data)
        return Reply(response.code, response.message, stage)
    except aiosmtplib.SMTPResponseException as exc:
        return Reply(exc.code, exc.message, stage)
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()
