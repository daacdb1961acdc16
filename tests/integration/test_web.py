"""The web endpoint over real HTTP: one-click ratings, comments, refusals, health, metrics."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from gateway.web.links import rating_links
from gateway.web.tokens import link_keys
from store.models import Rating
from tests.conftest import SECRET
from tests.mailbuild import make_mail, send

KEYS = link_keys(SECRET.encode())


async def _gateway_with_ticket(make_gateway: Any) -> Any:
    gw = await make_gateway()
    assert (await send(gw.inbound_port, make_mail(subject="Printer on fire"))).code == 250
    return gw


def _links(gw: Any, closed_at: datetime | None = None) -> dict[str, str]:
    base = f"http://127.0.0.1:{gw.web_port}"
    return rating_links(base, 1, closed_at or datetime.now(UTC), 30, KEYS)


async def _ratings(gw: Any) -> list[tuple[str, str | None]]:
    async with gw.store.transaction() as session:
        return [(r.value, r.comment) for r in await session.scalars(select(Rating))]


async def test_one_click_records_repeat_is_idempotent_and_a_later_click_changes(
        make_gateway: Any) -> None:
    gw = await _gateway_with_ticket(make_gateway)
    links = _links(gw)
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.get(links["good"]) as response:
                page = await response.text()
                assert response.status == 200
        assert "Printer on fire" in page and "Good" in page
        assert await _ratings(gw) == [("good", None)]
        async with http.get(links["bad"]) as response:
            assert response.status == 200
        assert await _ratings(gw) == [("bad", None)]
        async with http.post(links["bad"], data={"comment": "Took <b>two</b> weeks."}) as r:
            saved = await r.text()
        assert "Took &lt;b&gt;two&lt;/b&gt; weeks." in saved  # escaped, not rendered
    assert await _ratings(gw) == [("bad", "Took <b>two</b> weeks.")]


async def test_page_speaks_the_ticket_language(make_gateway: Any) -> None:
    gw = await make_gateway()
    await send(gw.inbound_port, make_mail(), rcpts=("billing@example.test",))  # German dept
    async with aiohttp.ClientSession() as http, http.get(_links(gw)["okay"]) as response:
        page = await response.text()
    assert '<html lang="de">' in page and "Danke für Ihre Bewertung" in page


@pytest.mark.parametrize(("mutate", "status", "words"), [
    (lambda url: url.replace("/rate/1.", "/rate/2.", 1), 403, "not valid"),
    (lambda url: url[:-10] + "AAAA" + url[-6:], 403, "not valid"),
    (lambda url: url.rsplit("/", 1)[0] + "/excellent", 404, "not valid")])
async def test_forged_links_are_refused_and_change_nothing(make_gateway: Any, mutate: Any,
                                                           status: int, words: str) -> None:
    gw = await _gateway_with_ticket(make_gateway)
    async with aiohttp.ClientSession() as http, http.get(mutate(_links(gw)["good"])) as response:
        assert response.status == status
        assert words in await response.text()
    assert await _ratings(gw) == []


async def test_expired_link_is_refused_with_a_clear_page(make_gateway: Any) -> None:
    gw = await _gateway_with_ticket(make_gateway)
    old = _links(gw, closed_at=datetime.now(UTC) - timedelta(days=31))
    async with aiohttp.ClientSession() as http, http.get(old["good"]) as response:
        assert response.status == 410
        assert "expired" in await response.text()
    assert await _ratings(gw) == []


async def test_metrics_parse_and_move_when_mail_arrives(make_gateway: Any) -> None:
    gw = await make_gateway()
    url = f"http://127.0.0.1:{gw.web_port}/metrics"

    async def stored() -> float:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        samples = families["deskgate_mails"].samples
        return sum(s.value for s in samples if s.labels.get("outcome") == "stored" and
                   s.name.endswith("_total"))

    before = await stored()
    await send(gw.inbound_port, make_mail())
    await send(gw.inbound_port, make_mail(), rcpts=("nobody@example.test",))
    assert await stored() == before + 1
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    assert 'deskgate_recipients_refused_total{reason="unknown"} 1.0' in text
    assert 'deskgate_ticket_events{type="created"} 1.0' in text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # aiosqlite's failed connect, see
async def test_healthz_turns_503_when_the_database_is_gone(make_gateway: Any, sqlite_url: str
                                                           ) -> None:
    gw = await make_gateway(url=sqlite_url)
    url = f"http://127.0.0.1:{gw.web_port}/healthz"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert (response.status, (await response.json())["ok"]) == (200, True)
        database = Path(sqlite_url.split("///", 1)[1])
        await gw.store.engine.dispose()
        database.rename(database.with_suffix(".moved"))
        database.mkdir()
        try:
            async with http.get(url) as response:
                body = await response.json()
                assert (response.status, body["checks"]["database"]) == (503, False)
            gc.collect()  # test_smtp_inbound.test_store_gone_answers_451
        finally:
            database.rmdir()
            database.with_suffix(".moved").rename(database)
        async with http.get(url) as response:
            assert response.status == 200


async def test_csat_report_matches_the_ratings(make_gateway: Any) -> None:
    from store import queries

    gw = await make_gateway()
    for i, (value, comment) in enumerate([("good", None), ("good", "Quick!"), ("bad", "Slow"),
                                          ("okay", None)]):
        await send(gw.inbound_port, make_mail(subject=f"Case {i}"),
                   rcpts=("support@example.test" if i < 3 else "billing@example.test",))
        link = rating_links(f"http://127.0.0.1:{gw.web_port}", i + 1, datetime.now(UTC), 30,
                            KEYS)[value]
        async with aiohttp.ClientSession() as http:
            method = http.post(link, data={"comment": comment}) if comment else http.get(link)
            async with method as response:
                assert response.status == 200
    async with gw.store.transaction() as session:
        rows = await queries.csat_report(session, datetime.now(UTC) - timedelta(days=1),
                                         "department")
    by_department = {r["department"]: r for r in rows}
    support = by_department["support"]
    assert (support["good"], support["okay"], support["bad"], support["score"]) == (
        2, 0, 1, 0.667)
    assert [c["comment"] for c in support["comments"]] == ["Quick!", "Slow"]
    assert (by_department["billing"]["okay"], by_department["billing"]["score"]) == (1, 0.0)
