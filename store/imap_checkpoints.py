"""IMAP checkpoints (imap_mailboxes): read and write one mailbox's progress; no policy."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from store.models import ImapMailbox


async def load(session: AsyncSession, name: str) -> ImapMailbox:
    """The mailbox's checkpoint row, created empty on first use."""
    row = await session.scalar(select(ImapMailbox).where(ImapMailbox.name == name))
    if row is None:
        row = ImapMailbox(name=name, uidvalidity=None, last_uid=0, backlog=0)
        session.add(row)
        await session.flush()
    return row


async def save(session: AsyncSession, name: str, **values: Any) -> None:
    await session.execute(update(ImapMailbox).where(ImapMailbox.name == name).values(**values))


async def all_rows(session: AsyncSession) -> dict[str, ImapMailbox]:
    return {row.name: row for row in await session.scalars(select(ImapMailbox))}
