"""The documented contract (docs/api.md, protocols/openapi.yaml, docs/operations.md) against the running
service, where an earlier version disagreed: error codes an endpoint answers and lists, the date format of
the clearing report, a card whose temporary loss ran out, and the gauges /metrics adds up over workers."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cardsvc import metrics
from cardsvc.security.keys import KeyRing
from protocols import sm
from tests.helpers import ServiceHarness, new_card_numbers, replacement_body
from tests.service.serving import Service
from tests.service.test_input import assert_problem, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _openapi_errors(method: str, path: str) -> list[str]:
    doc = yaml.safe_load((ROOT / "protocols" / "openapi.yaml").read_text())
    return list(doc["paths"][path][method.lower()].get("x-cardsvc-errors", []))


async def test_replace_for_a_holder_with_another_live_card_is_not_card_exists(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md: `card_exists` means the number or identification code is taken,
    `holder_has_live_card` that the holder already has a live card. A holder whose card A was formally lost
    and who was issued card B meanwhile cannot have A replaced (it would give them two live cards): the
    answer must say so, not claim the fresh new card number is taken."""
    a = await svc.new_card()
    r = await svc.post(f"/v1/cards/{a['card_no']}/formal-loss", {})
    assert r.status == 200, r.body
    no, sn = new_card_numbers()
    r = await svc.post(
        "/v1/cards",
        {
            "holder_id": a["holder"]["holder_id"],
            "card_no": no,
            "card_sn": sn,
            "expires_on": (dt.date.today() + dt.timedelta(days=3650)).isoformat(),
        },
    )
    assert r.status == 201, r.body  # B: issued, live
    before = await snapshot(db)
    body = replacement_body()
    assert await db.fetchval("SELECT count(*) FROM card WHERE card_no = $1 OR card_sn = $2",
                             body["new_card_no"], body["new_card_sn"]) == 0  # fmt: skip
    r = await svc.post(f"/v1/cards/{a['card_no']}/replace", body)
    assert await snapshot(db) == before  # nothing changed
    assert_problem(r, 409, "holder_has_live_card")


async def test_top_up_card_unusable_is_a_documented_code_of_the_endpoint(svc: ServiceHarness) -> None:
    """docs/api.md "Errors": "Which codes each endpoint can answer is listed in its description and
    `x-cardsvc-errors` in the OpenAPI document". A top-up to a cancelled card answers 422 card_unusable
    (docs/api.md); the OpenAPI document did not list it for the top-up endpoint, so a client generated
    from it did not know the code."""
    c = await svc.new_card(has_purse=True)
    r = await svc.post(f"/v1/cards/{c['card_no']}/cancel", {})
    assert r.status == 200, r.body
    r = await svc.post(
        f"/v1/purses/{c['card_no']}/top-ups", {"terminal_seq": 9100001, "amount_fen": 100, "channel": "cash"}
    )
    assert_problem(r, 422, "card_unusable")
    assert "card_unusable" in _openapi_errors("POST", "/v1/purses/{card_no}/top-ups")


@pytest.mark.parametrize("date", ["20261128", "2026-W48-6", "2026W486"])
async def test_clearing_report_date_must_be_yyyy_mm_dd(
    svc: ServiceHarness, db: asyncpg.Connection, date: str
) -> None:
    """docs/api.md: `400 invalid_parameter` for a `date` that is not `YYYY-MM-DD`. The route
    parsed it with datetime.date.fromisoformat alone, which (Python 3.11+) also takes ISO basic and week
    dates: the answer was the 2026-11-28 report itself."""
    await db.execute(
        """INSERT INTO clearing_report (operator_id, business_date, txn_count, total_fen, digest, created_at)
           VALUES ('cq-bus', '2026-11-28', 1, 180, $1, now())""",
        "00" * 32,
    )
    r = await svc.get("/v1/clearing/cq-bus/2026-11-28", as_="ops")
    assert r.status == 200, r.body  # the control: the report is there
    r = await svc.get(f"/v1/clearing/cq-bus/{date}", as_="ops")
    assert_problem(r, 400, "invalid_parameter", "date")


async def test_ride_cert_for_a_card_whose_temporary_loss_ran_out(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md: "A temporary loss whose period has run out shows as `active`" (and every other
    path - card view, e-card issue, taps, credentials - treats it as active). docs/api.md: a ride
    certificate is issued "for an active card with a purse". POST /v1/ride-certs read the stored status
    instead and refused the card `card_not_active` until the sweeper had run."""
    c = await svc.new_card(has_purse=True)
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {})
    assert r.status == 200, r.body
    # The 15 days have passed (maintenance is off in the harness, as between two sweeps).
    await db.execute(
        "UPDATE card SET temp_loss_until = now() - interval '1 second' WHERE card_no = $1", c["card_no"]
    )
    r = await svc.get(f"/v1/cards/{c['card_no']}")
    assert r.body["status"] == "active" and r.body["usable"] is True, r.body
    key = sm.sm2_generate()
    body: dict[str, Any] = {
        "card_no": c["card_no"], "alg": sm.ALG_SM2_SM3, "user_public_key": sm.public_key_bytes(key).hex()
    }  # fmt: skip
    head = await db.fetchval("SELECT version FROM hotlist_head")
    r = await svc.post("/v1/ride-certs", body, as_="ecard_channel")
    assert r.status == 201, r.body
    # The expiry is recorded with it: the hotlist unblocks the card now, so gates accept the new codes.
    assert await db.fetchval("SELECT status FROM card WHERE card_no = $1", c["card_no"]) == 2  # active
    entry = await db.fetchrow("SELECT action, reason FROM hotlist_entry WHERE version = $1", head + 1)
    assert entry is not None and (entry["action"], entry["reason"]) == (2, 7), entry  # unblock, loss expired


def _value(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                return s.value
    return None


async def test_hotlist_version_gauge_moves_when_a_loss_is_recorded(svc: ServiceHarness) -> None:
    """docs/operations.md: `cardsvc_hotlist_version` is the "latest hotlist version", alert when it
    "stalls while loss reports arrive". It was set only when a terminal read the hotlist or /readyz was
    probed, never when a loss report wrote a new version: a loss report, then a scrape, showed the old one."""
    metrics.HOTLIST_VERSION.set(0)  # this process's gauge, as a freshly started worker has it
    c = await svc.new_card()
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {})
    assert r.status == 200, r.body
    r2 = await svc.post(f"/v1/cards/{c['card_no']}/lift-loss", {})
    assert r2.status == 200, r2.body
    resp = await svc.client.get("/metrics")
    assert _value(await resp.text(), "cardsvc_hotlist_version") == 2.0  # versions 1 (block), 2 (unblock)


@pytest.mark.slow
async def test_pool_gauges_count_every_workers_connections(
    db_dsn: str, keys_for_process: KeyRing, tmp_path: Path
) -> None:
    """docs/operations.md "/metrics: ... summed over all workers"; the CardsvcDbPoolSaturated rule divides
    `cardsvc_db_pool_connections_in_use` by `cardsvc_db_pool_connections`, summed per instance. Both gauges
    were set only by the worker serving the scrape: right after start-up, the first scrape counted one
    worker's pool out of two. Each worker now writes its own every second."""
    svc = Service(tmp_path, db_dsn, keys_for_process, workers=2)
    try:
        svc.start()
        await svc.wait_ready()
        conn = await asyncpg.connect(db_dsn)
        try:
            await asyncio.sleep(1.5)  # each worker writes its gauges every second
            in_db = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'cardsvc'"
            )
        finally:
            await conn.close()
        status, _, text = await svc.send("GET", "/metrics")
        assert status == 200
        shown = _value(text, "cardsvc_db_pool_connections")
        assert in_db >= 2  # both workers hold connections
        assert shown == in_db, (shown, in_db)
    finally:
        await svc.close()
