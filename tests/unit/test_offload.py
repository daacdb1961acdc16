"""The parser process of big mails (issue 10) runs below the serving process's priority."""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

from gateway.ingest import offload


def test_big_mails_are_parsed_at_a_lower_priority_than_the_loop_runs() -> None:
    # os.nice(0) reports a process's niceness; run there, it tells the parser process's.
    async def niceness_there() -> int:
        return await offload.in_process(cast(Any, os.nice), cast(Any, 0))

    ours = os.nice(0)
    theirs = asyncio.run(niceness_there())
    assert theirs == min(19, ours + offload.PARSER_NICENESS)
    assert os.nice(0) == ours  # the serving process itself is left as it was
