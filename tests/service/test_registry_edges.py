"""Edges of the card registry (real PostgreSQL):

- demo data never binds a demo e-card (whose key comes from the public demo seed) or an opening purse to a
  card the card office registered: a registry holding the office's people in the demo's ids is refused;
- an ID number's birth date is checked against the city's calendar, not the host's;
- a card issued with `expires_on` 9999-12-31 (a common "no expiry" value) never makes a later request a 500.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import asyncpg
import pytest

from cardsvc import demo
from cardsvc.localtime import local_date
from protocols import ecard, idnumber, sm
from tests.helpers import ServiceHarness
from tests.service.test_input import assert_problem

# ------------------------------------------------------------------ demo data beside real registrations


async def test_demo_data_never_attaches_demo_credentials_or_money_to_cards_the_office_issued(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """demo.load_population loads person i as holder_id = card_id = ecard_id = i + 1. Where the card office
    has registered holders and cards in that id range (`./dev run`, a few registrations through the API,
    then `cardsvc demo-data --cards N` with a larger N), the demo e-card (whose device key derives from the
    public demo seed) and the opening purse must not land on the office's cards. (Before, each table was
    inserted on its own with ON CONFLICT DO NOTHING: they did, and the demo people went missing for good.)"""
    office = [await svc.new_card(has_purse=False) for _ in range(2)]  # holders 1, 2; cards 1, 2
    with pytest.raises(demo.DemoDataConflict, match="card office"):
        await demo.load_population(db, svc.keys, 3)
    problems: list[Any] = []
    for c in office:
        r = await svc.get(f"/v1/cards/{c['card_no']}")
        assert r.status == 200, r.body
        if r.body["ecard"] is not None:
            problems.append(("office card got a demo e-card", c["card_no"], r.body["ecard"]))
        if r.body["purse_balance_fen"] != 0:
            problems.append(
                ("office card without a purse got money", c["card_no"], r.body["purse_balance_fen"])
            )
    stray = await db.fetch(
        "SELECT p.card_id, p.balance_fen FROM purse p JOIN card c USING (card_id) WHERE NOT c.has_purse"
    )
    if stray:
        problems.append(("purse rows on cards issued without a purse", [tuple(s) for s in stray]))
    # The demo phone of person 1 (public seed) must not authenticate as anyone the card office registered.
    code = demo.demo_device(1).next_code(int(time.time()))
    r = await svc.post("/v1/ecard-codes/verify", {"code": code, "business_type": "02"}, as_="merchant_pos")
    if r.status == 200 and r.body["card"]["card_no"] in {c["card_no"] for c in office}:
        problems.append(("demo e-card code accepted as the office's card", r.body["card"]["card_no"]))
    assert await db.fetchval("SELECT count(*) FROM cardholder") == 2  # nothing of the demo loaded
    assert not problems, problems


# ------------------------------------------------------------------ the birth date of an ID number


async def test_an_id_number_birth_date_is_checked_against_the_citys_date_not_the_hosts(
    svc: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """protocols/idnumber.md: the birth date is "not after today", and the service's dates are the city's
    (cardsvc.localtime, UTC+8). On a UTC host, from 00:00 to 08:00 Chongqing time, a child born that day is
    accepted, and on a host east of the city one born tomorrow is refused. Simulated here by a host calendar
    one day behind the city's, then one day ahead."""
    city_today = local_date(dt.datetime.now(dt.UTC))

    def host_calendar(offset_days: int) -> type[dt.date]:
        class HostDate(dt.date):
            @classmethod
            def today(cls) -> dt.date:  # type: ignore[override]
                return city_today + dt.timedelta(days=offset_days)

        return HostDate

    born_today = idnumber.make_id_number("500101", city_today, 17)
    monkeypatch.setattr(idnumber, "date", host_calendar(-1))
    r = await svc.post("/v1/holders", {"id_number": born_today, "name": "王小宝"})
    assert r.status == 201, r.body  # born today in the city: a valid ID number

    born_tomorrow = idnumber.make_id_number("500101", city_today + dt.timedelta(days=1), 19)
    monkeypatch.setattr(idnumber, "date", host_calendar(+1))
    r = await svc.post("/v1/holders", {"id_number": born_tomorrow, "name": "王小宝"})
    assert_problem(r, 400, "invalid_field", "id_number")  # not born yet in the city


# ------------------------------------------------------------------ expiry dates the service cannot handle


async def test_a_card_expiring_on_9999_12_31_gets_a_ride_certificate_never_a_500(svc: ServiceHarness) -> None:
    """POST /v1/cards accepts any future `expires_on`, up to 9999-12-31 (a usual "no expiry" value); a ride
    certificate for such a card is issued (its validity ends with the card's last day, which must not
    overflow): docs/api.md, "The service never answers a 500 for anything a client can send"."""
    c = await svc.new_card(has_purse=True, expires_on=dt.date.max)
    assert c["expires_on"] == "9999-12-31", c
    card_no = c["card_no"]
    device = ecard.EcardDevice.generate(1, sm.ALG_ED25519)
    r = await svc.post(
        "/v1/ride-certs",
        {"card_no": card_no, "alg": sm.ALG_ED25519, "user_public_key": device.public_key_bytes.hex()},
        as_="ecard_channel",
    )
    assert r.status == 201, r.body
