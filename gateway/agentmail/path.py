"""AgentPath: what the submission port does with an authenticated agent's mail (DESIGN 3a)."""

from __future__ import annotations

from gateway.agents import AgentIdentity
from gateway.ingest.model import Envelope


class AgentPath:
    """Interface used by gateway/submission; the lead is writing the body (issue 6)."""

    async def check_recipient(self, agent: AgentIdentity, address: str) -> str | None:
        """None when the agent may send to this address; else the SMTP reply (550 5.7.1 ...)."""
        raise NotImplementedError

    async def deliver(self, agent: AgentIdentity, raw: bytes, envelope: Envelope) -> str:
        """The SMTP reply at the end of DATA: 250 only after commit; 550 5.7.1; 451 4.3.0."""
        raise NotImplementedError
