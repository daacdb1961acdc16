"""`deskgate serve` freezes its start-up objects (gateway/memory.py): the cyclic collector
never looks at them again, so what a SIGHUP reload replaces must be freed by reference
counting alone, or every reload would leave the old pipeline behind for good."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from typing import Any

import pytest

from tests.mailbuild import make_mail, send


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_reload_frees_the_old_pipeline_without_the_cyclic_collector(
        make_gateway: Any) -> None:
    gw = await make_gateway()
    assert (await send(gw.inbound_port, make_mail(subject="Before the reload"))).code == 250
    old = weakref.ref(gw.pipeline)
    gc.collect()
    gc.disable()
    try:
        await gw.reload(replace(gw.settings))
        assert (await send(gw.inbound_port, make_mail(subject="After it"))).code == 250
        assert old() is None, [type(r).__name__ for r in gc.get_referrers(old())]
    finally:
        gc.enable()
