"""The card lifecycle: the pure state machine (`plan`) as properties, and the API on a real database
(status changes, audit trail, hotlist, temporary-loss expiry, uniqueness refusals)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardsvc.flows import lifecycle
from cardsvc.flows.lifecycle import OPERATIONS, CardState, IllegalTransition, plan
from cardsvc.http.keys import SERVICES
from protocols import ecard, hotlist, sm
from protocols.card import CardStatus, HotlistAction, HotlistReason
from tests.helpers import Response, ServiceHarness, new_card_numbers, new_id_number, replacement_body

S = CardStatus
TERMINAL = frozenset({S.LOST, S.REPLACED, S.CANCELLED})
FLAG_OPS = {"lock-pin", "unlock-pin", "lock-app", "unlock-app"}

states = st.builds(
    CardState,
    st.sampled_from(list(CardStatus)),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 1, 2000]),
)


# ------------------------------------------------------------------------------------ plan() properties


@given(states, st.sampled_from(OPERATIONS))
@settings(max_examples=600, deadline=None)
def test_plan_hotlist_change_matches_usability(state: CardState, op: str) -> None:
    try:
        p = plan(state, op)
    except IllegalTransition as exc:
        assert exc.detail
        return
    before, after = state, p.after
    assert after.purse_balance_fen == before.purse_balance_fen

    def listed(s: CardState) -> bool:  # in circulation (ever activated) and not usable
        return s.status != S.ISSUED and not s.usable

    if listed(after) and not listed(before):
        assert p.hotlist is not None and p.hotlist[0] == HotlistAction.BLOCK
    elif listed(before) and not listed(after):
        assert p.hotlist is not None and p.hotlist[0] == HotlistAction.UNBLOCK
    else:
        # Including activation of a usable card and a card still at the office: nothing to list or lift.
        assert p.hotlist is None
    if op in FLAG_OPS:
        assert after.status == before.status
        flag = "pin_locked" if "pin" in op else "app_locked"
        locking = op.startswith("lock")
        assert getattr(after, flag) is locking and getattr(before, flag) is not locking
    else:
        assert (after.pin_locked, after.app_locked) == (before.pin_locked, before.app_locked)
        assert after.status != before.status


@given(states, st.sampled_from(OPERATIONS))
@settings(max_examples=600, deadline=None)
def test_plan_transitions(state: CardState, op: str) -> None:
    try:
        after = plan(state, op).after.status
    except IllegalTransition:
        after = None
    if state.status in (S.REPLACED, S.CANCELLED):
        assert after is None  # dead cards stay dead
    if state.status == S.LOST:
        # A formal loss is irreversible: it leads only to a replacement (or to cancellation).
        assert after in (None, S.REPLACED, S.CANCELLED)
        assert (after is not None) == (op == "replace" or (op == "cancel" and state.purse_balance_fen == 0))
    if after is not None and after != state.status:
        assert after not in (S.ISSUED,)
    if op == "activate":
        assert (after is not None) == (state.status == S.ISSUED)
    if op == "lift-loss":
        assert (after is not None) == (state.status == S.TEMP_LOST)
    if op == "temporary-loss":
        assert (after is not None) == (state.status == S.ACTIVE)
    if op == "cancel" and state.purse_balance_fen > 0:
        assert after is None
    if op in FLAG_OPS and state.status in TERMINAL:
        assert after is None


@given(st.lists(st.sampled_from(OPERATIONS), max_size=25))
@settings(max_examples=400, deadline=None)
def test_plan_sequences_keep_the_hotlist_in_step(ops: list[str]) -> None:
    """Replaying a card's hotlist changes gives 'on the list' exactly when the card has left the card
    office's 'issued' state and is not usable (no card ever returns to 'issued')."""
    state = CardState(S.ISSUED, False, False)
    on_list = False
    for op in ops:
        try:
            p = plan(state, op)
        except IllegalTransition:
            continue
        if p.hotlist is not None:
            assert (p.hotlist[0] == HotlistAction.BLOCK) != on_list
            on_list = p.hotlist[0] == HotlistAction.BLOCK
        state = p.after
        assert on_list == (state.status != S.ISSUED and not state.usable)


def test_plan_reasons() -> None:
    active = CardState(S.ACTIVE, False, False)
    assert plan(active, "temporary-loss").hotlist == (HotlistAction.BLOCK, HotlistReason.TEMP_LOSS)
    assert plan(active, "formal-loss").hotlist == (HotlistAction.BLOCK, HotlistReason.FORMAL_LOSS)
    assert plan(active, "replace").hotlist == (HotlistAction.BLOCK, HotlistReason.REPLACED)
    assert plan(active, "cancel").hotlist == (HotlistAction.BLOCK, HotlistReason.CANCELLED)
    assert plan(active, "lock-app").hotlist == (HotlistAction.BLOCK, HotlistReason.APP_LOCKED)
    assert plan(active, "lock-pin").hotlist is None
    lost = CardState(S.TEMP_LOST, True, False)
    assert plan(lost, "lift-loss").hotlist == (HotlistAction.UNBLOCK, HotlistReason.LOSS_LIFTED)
    locked = CardState(S.ACTIVE, False, True)
    assert plan(locked, "unlock-app").hotlist == (HotlistAction.UNBLOCK, HotlistReason.APP_UNLOCKED)
    assert plan(CardState(S.ISSUED, False, False), "activate").hotlist is None
    # Activated while application-locked: in circulation and unusable, so listed at once.
    assert plan(CardState(S.ISSUED, False, True), "activate").hotlist == (HotlistAction.BLOCK, HotlistReason.APP_LOCKED)
    # Lost before it was ever activated: listed, so that a found card is refused.
    assert plan(CardState(S.ISSUED, False, False), "formal-loss").hotlist == (
        HotlistAction.BLOCK, HotlistReason.FORMAL_LOSS)
    with pytest.raises(IllegalTransition):
        plan(CardState(S.ACTIVE, False, False, 1), "cancel")


# ------------------------------------------------------------------------------------------ helpers


async def card_op(svc: ServiceHarness, card_no: str, op: str, body: dict[str, Any] | None = None) -> Response:
    return await svc.post(f"/v1/cards/{card_no}/{op}", {"operator": "staff-7", **(body or {})})


async def ok(svc: ServiceHarness, card_no: str, op: str, body: dict[str, Any] | None = None) -> Response:
    r = await card_op(svc, card_no, op, body)
    assert r.status == 200, (op, r.body)
    return r


async def events(svc: ServiceHarness, card_no: str) -> list[dict[str, Any]]:
    r = await svc.get(f"/v1/cards/{card_no}/events")
    assert r.status == 200, r.body
    return list(r.body["events"])


async def get_card(svc: ServiceHarness, card_no: str) -> dict[str, Any]:
    r = await svc.get(f"/v1/cards/{card_no}")
    assert r.status == 200, r.body
    return dict(r.body)


async def read_hotlist(
    svc: ServiceHarness, limit: int
) -> tuple[list[hotlist.HotlistBlock], hotlist.HotlistReplica]:
    replica = hotlist.HotlistReplica()
    blocks = []
    since = 0
    while True:
        r = await svc.get(f"/v1/hotlist?since={since}&limit={limit}", as_="transit_validator")
        assert r.status == 200, r.body
        block = hotlist.decode_block(r.body)
        assert block.since_version == since
        assert len(block.entries) <= limit
        blocks.append(block)
        more = replica.apply(block)
        assert more == (block.to_version < block.latest_version)
        if not more:
            return blocks, replica
        assert len(block.entries) == limit
        since = block.to_version


# --------------------------------------------------------------------------------------- full path


async def test_full_path_to_replacement_and_cancellation(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await svc.new_card(activate=False, has_purse=True)
    no = c["card_no"]
    assert c["status"] == "issued"
    expected = ["issue"]
    for op, status in [
        ("activate", "active"),
        ("temporary-loss", "temporary_loss"),
        ("lift-loss", "active"),
        ("temporary-loss", "temporary_loss"),
        ("formal-loss", "formal_loss"),
    ]:
        r = await ok(svc, no, op)
        assert r.body["status"] == status
        assert (await get_card(svc, no))["status"] == status
        expected.append(op)
    await db.execute(
        """INSERT INTO purse (card_id, balance_fen) SELECT card_id, 1234 FROM card WHERE card_no = $1
           ON CONFLICT (card_id) DO UPDATE SET balance_fen = 1234""", no)
    await db.execute("UPDATE card SET has_purse = true WHERE card_no = $1", no)
    body = replacement_body()
    r = await ok(svc, no, "replace", body)
    new = r.body
    assert (new["card_no"], new["card_sn"], new["status"]) == (
        body["new_card_no"],
        body["new_card_sn"],
        "active",
    )
    assert new["purse_balance_fen"] == 1234 and new["holder"] == c["holder"]
    old = await get_card(svc, no)
    assert (old["status"], old["purse_balance_fen"], old["usable"]) == ("replaced", 0, False)
    expected.append("replace")
    assert [e["op"] for e in await events(svc, no)] == expected

    # Money left on the purse: the new card cannot be cancelled until it is refunded.
    r = await card_op(svc, new["card_no"], "cancel")
    assert r.status == 409 and r.body["code"] == "illegal_transition", r.body
    assert (await get_card(svc, new["card_no"]))["status"] == "active"
    await db.execute(
        "UPDATE purse SET balance_fen = 0 WHERE card_id = (SELECT card_id FROM card WHERE card_no = $1)",
        new["card_no"])
    r = await ok(svc, new["card_no"], "cancel")
    assert r.body["status"] == "cancelled"
    new_events = await events(svc, new["card_no"])
    assert [e["op"] for e in new_events] == ["issue-replacement", "cancel"]
    assert new_events[0]["detail"]["purse_moved_fen"] == 1234


async def test_audit_trail_records_who_what_and_before_after(svc: ServiceHarness) -> None:
    c = await svc.new_card(activate=False)
    no = c["card_no"]
    request_ids = []
    for op in ("activate", "lock-pin", "unlock-pin", "temporary-loss", "lift-loss", "lock-app", "unlock-app"):
        r = await svc.post(
            f"/v1/cards/{no}/{op}", {"operator": f"op-{op}"}, headers={"X-Request-Id": f"rq-{op}"}
        )
        assert r.status == 200, r.body
        assert r.headers["X-Request-Id"] == f"rq-{op}"
        request_ids.append(f"rq-{op}")
    r = await svc.post(f"/v1/cards/{no}/temporary-loss", {}, as_="ecard_channel")
    assert r.status == 200, r.body
    evs = await events(svc, no)
    assert [e["op"] for e in evs] == [
        "issue", "activate", "lock-pin", "unlock-pin", "temporary-loss", "lift-loss", "lock-app", "unlock-app",
        "temporary-loss",
    ]  # fmt: skip
    assert [e["event_id"] for e in evs] == sorted({e["event_id"] for e in evs})
    office = svc.terminals["card_office"].terminal_id
    for e, rid in zip(evs[1:8], request_ids, strict=True):
        assert e["terminal_id"] == office
        assert e["operator"] == f"op-{e['op']}"
        assert e["request_id"] == rid
    assert [(e["status_before"], e["status_after"]) for e in evs] == [
        (None, "issued"),
        ("issued", "active"),
        ("active", "active"),
        ("active", "active"),
        ("active", "temporary_loss"),
        ("temporary_loss", "active"),
        ("active", "active"),
        ("active", "active"),
        ("active", "temporary_loss"),
    ]
    last = evs[-1]
    assert last["terminal_id"] == svc.terminals["ecard_channel"].terminal_id and last["operator"] is None
    assert last["detail"]["temp_loss_until"]


async def test_card_event_is_append_only(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await svc.new_card()
    n = await db.fetchval("SELECT count(*) FROM card_event")
    assert n == 2
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute("UPDATE card_event SET operator = 'mallory'")
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute("DELETE FROM card_event")
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute("TRUNCATE card_event")
    assert await db.fetchval("SELECT count(*) FROM card_event") == n
    assert [e["op"] for e in await events(svc, c["card_no"])] == ["issue", "activate"]



async def test_registering_a_holder_records_who_did_it(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """`HolderCreate.operator`: the clerk, the terminal and the request id are kept with the new holder
    (holder_event, append-only), as card_event keeps them for a card. Before migration 0022 the operator
    was accepted and dropped. A refused registration (the ID number again) records nothing."""
    id_number = new_id_number()
    body = {"id_number": id_number, "name": "王小明", "operator": "clerk-7"}
    r = await svc.post("/v1/holders", body, headers={"X-Request-Id": "rq-register"})
    assert r.status == 201, r.body
    holder_id = r.body["holder_id"]
    r = await svc.post("/v1/holders", {"id_number": id_number, "name": "王小明", "operator": "clerk-8"})
    assert r.status == 409 and r.body["holder_id"] == holder_id, r.body
    rows = await db.fetch(
        "SELECT op, terminal_id, operator, request_id FROM holder_event WHERE holder_id = $1", holder_id
    )
    office = svc.terminals["card_office"].terminal_id
    assert [tuple(x) for x in rows] == [("create", office, "clerk-7", "rq-register")]
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute("UPDATE holder_event SET operator = 'mallory'")
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute("DELETE FROM holder_event")


# ---------------------------------------------------------------------------------- illegal moves

_ILLEGAL = [
    ("issued", "temporary-loss"),
    ("issued", "lift-loss"),
    ("issued", "replace"),
    ("active", "activate"),
    ("active", "lift-loss"),
    ("active", "unlock-pin"),
    ("active", "unlock-app"),
    ("temporary_loss", "temporary-loss"),
    ("temporary_loss", "activate"),
    ("formal_loss", "lift-loss"),
    ("formal_loss", "temporary-loss"),
    ("formal_loss", "activate"),
    ("formal_loss", "lock-pin"),
    ("formal_loss", "formal-loss"),
    ("cancelled", "activate"),
    ("cancelled", "lift-loss"),
    ("cancelled", "replace"),
    ("cancelled", "cancel"),
    ("cancelled", "unlock-app"),
]


async def _card_in(svc: ServiceHarness, status: str) -> dict[str, Any]:
    c = await svc.new_card(activate=status != "issued")
    path = {
        "issued": [],
        "active": [],
        "temporary_loss": ["temporary-loss"],
        "formal_loss": ["formal-loss"],
        "cancelled": ["cancel"],
    }[status]
    for op in path:
        await ok(svc, c["card_no"], op)
    return await get_card(svc, c["card_no"])


async def test_illegal_transitions_change_nothing(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    cards = {s: await _card_in(svc, s) for s in {s for s, _ in _ILLEGAL}}
    for status, op in _ILLEGAL:
        c = cards[status]
        before_events = await events(svc, c["card_no"])
        hotlist_before = await db.fetchval("SELECT version FROM hotlist_head")
        body = replacement_body() if op == "replace" else None
        r = await card_op(svc, c["card_no"], op, body)
        assert r.status == 409 and r.body["code"] == "illegal_transition", (status, op, r.body)
        assert (r.body["status"], r.body["card_status"]) == (409, status)
        after = await get_card(svc, c["card_no"])
        assert after == c, (status, op)
        assert await events(svc, c["card_no"]) == before_events, (status, op)
        assert await db.fetchval("SELECT version FROM hotlist_head") == hotlist_before
        if op == "replace":
            assert (await svc.get(f"/v1/cards/{body['new_card_no']}")).status == 404  # type: ignore[index]


# ------------------------------------------------------------------------------- temporary losses


async def test_temporary_loss_expires(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    c = await svc.new_card()
    no = c["card_no"]
    r = await ok(svc, no, "temporary-loss")
    until = dt.datetime.fromisoformat(r.body["temp_loss_until"])
    days = (until - dt.datetime.now(dt.UTC)).total_seconds() / 86400
    assert svc.settings.temp_loss_days - 1 < days <= svc.settings.temp_loss_days
    await db.execute("UPDATE card SET temp_loss_until = now() - interval '1 minute' WHERE card_no = $1", no)
    # (a) Seen as active at once, before anything has recorded the expiry.
    view = await get_card(svc, no)
    assert (view["status"], view["usable"], view["temp_loss_until"]) == ("active", True, None)
    r = await svc.post("/v1/card-auth", svc.card_auth_body(c["card_sn"]), as_="transit_validator")
    assert r.status == 200, r.body
    # (b) The sweeper records it: an audit event by terminal 'system' and a hotlist UNBLOCK.
    head = await db.fetchval("SELECT version FROM hotlist_head")
    assert await lifecycle.expire_temporary_losses(svc.app[SERVICES].pool) == 1
    evs = await events(svc, no)
    assert [e["op"] for e in evs][-1] == "temporary-loss-expired"
    assert (evs[-1]["terminal_id"], evs[-1]["status_before"], evs[-1]["status_after"]) == (
        "system",
        "temporary_loss",
        "active",
    )
    entry = await db.fetchrow("SELECT * FROM hotlist_entry WHERE version = $1", head + 1)
    assert entry["card_sn"] == c["card_sn"]
    assert (entry["action"], entry["reason"]) == (HotlistAction.UNBLOCK, HotlistReason.LOSS_EXPIRED)
    assert await db.fetchval("SELECT status FROM card WHERE card_no = $1", no) == S.ACTIVE
    # Nothing left to do: a second sweep records nothing.
    assert await lifecycle.expire_temporary_losses(svc.app[SERVICES].pool) == 0
    assert len(await events(svc, no)) == len(evs)


async def test_operation_on_an_expired_temporary_loss_records_the_expiry_first(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    c = await svc.new_card()
    no = c["card_no"]
    await ok(svc, no, "temporary-loss")
    await db.execute("UPDATE card SET temp_loss_until = now() - interval '1 minute' WHERE card_no = $1", no)
    r = await card_op(svc, no, "lift-loss")
    assert r.status == 409 and r.body["code"] == "illegal_transition" and r.body["card_status"] == "active"
    r = await ok(svc, no, "temporary-loss")
    assert [e["op"] for e in await events(svc, no)][-3:] == [
        "temporary-loss",
        "temporary-loss-expired",
        "temporary-loss",
    ]
    actions = await db.fetch("SELECT action FROM hotlist_entry ORDER BY version")
    assert [a["action"] for a in actions] == [HotlistAction.BLOCK, HotlistAction.UNBLOCK, HotlistAction.BLOCK]


# ----------------------------------------------------------------------------------------- hotlist


async def test_hotlist_blocks_rebuild_exactly_the_unusable_cards(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    cards = [await svc.new_card() for _ in range(8)]
    never_activated = await svc.new_card(activate=False)
    a, b, c, d, e, f, g, h = (x["card_no"] for x in cards)
    await ok(svc, a, "temporary-loss")
    await ok(svc, a, "lift-loss")
    await ok(svc, b, "lock-app")
    await ok(svc, c, "formal-loss")
    await ok(svc, c, "replace", replacement_body())
    await ok(svc, d, "temporary-loss")
    await ok(svc, e, "cancel")
    await ok(svc, f, "lock-app")
    await ok(svc, f, "unlock-app")
    await ok(svc, g, "temporary-loss")
    await ok(svc, g, "lock-app")
    await ok(svc, h, "lock-pin")
    await ok(svc, h, "temporary-loss")
    await db.execute("UPDATE card SET temp_loss_until = now() - interval '1 second' WHERE card_no = $1", h)
    await lifecycle.expire_temporary_losses(svc.app[SERVICES].pool)

    all_cards = await db.fetch("SELECT card_no FROM card ORDER BY card_id")
    views = [await get_card(svc, r["card_no"]) for r in all_cards]
    unusable = {v["card_sn"] for v in views if not v["usable"] and v["status"] != "issued"}
    assert never_activated["card_sn"] not in unusable
    assert len(unusable) == 5  # b, c, d, e, g

    latest = await db.fetchval("SELECT version FROM hotlist_head")
    for limit in (1, 3, latest, 1000):
        blocks, replica = await read_hotlist(svc, limit)
        versions = [e.version for blk in blocks for e in blk.entries]
        assert versions == list(range(1, latest + 1))
        assert replica.version == latest
        assert replica.blocked == unusable, limit
    # Up to date: an empty block, nothing more.
    r = await svc.get(f"/v1/hotlist?since={latest}", as_="transit_validator")
    block = hotlist.decode_block(r.body)
    assert (block.entries, block.more, block.to_version) == ((), False, latest)
    r = await svc.get(f"/v1/hotlist?since={latest + 1}", as_="transit_validator")
    assert r.status == 400 and r.body["code"] == "invalid_parameter"


# ------------------------------------------------------------------------------ uniqueness, e-cards


async def _issue(svc: ServiceHarness, holder_id: int, card_no: str, card_sn: str) -> Response:
    return await svc.post(
        "/v1/cards",
        {
            "holder_id": holder_id,
            "card_no": card_no,
            "card_sn": card_sn,
            "expires_on": (dt.date.today() + dt.timedelta(days=3650)).isoformat(),
        },
    )


async def test_registry_uniqueness(svc: ServiceHarness) -> None:
    id_number = new_id_number()
    r = await svc.post("/v1/holders", {"id_number": id_number, "name": "李四"})
    assert r.status == 201, r.body
    holder = r.body["holder_id"]
    r = await svc.post("/v1/holders", {"id_number": id_number, "name": "王五"})
    assert r.status == 409 and r.body["code"] == "holder_exists" and r.body["holder_id"] == holder, r.body

    no, sn = new_card_numbers()
    assert (await _issue(svc, holder, no, sn)).status == 201
    no2, sn2 = new_card_numbers()
    r = await _issue(svc, holder, no2, sn2)
    assert r.status == 409 and r.body["code"] == "holder_has_live_card", r.body

    other = await svc.new_holder()
    r = await _issue(svc, other, no, sn2)
    assert r.status == 409 and (r.body["code"], r.body["field"]) == ("card_exists", "card_no"), r.body
    r = await _issue(svc, other, no2, sn)
    assert r.status == 409 and (r.body["code"], r.body["field"]) == ("card_exists", "card_sn"), r.body
    # A replacement with a number already taken is refused, and the old card is left as it was.
    await ok(svc, no, "activate")
    expires = (dt.date.today() + dt.timedelta(days=3650)).isoformat()
    r = await card_op(svc, no, "replace", {"new_card_no": no, "new_card_sn": sn2, "expires_on": expires})
    assert r.status == 409 and r.body["code"] == "card_exists", r.body
    assert (await get_card(svc, no))["status"] == "active"
    assert [e["op"] for e in await events(svc, no)] == ["issue", "activate"]
    # Once the card is dead, the holder may get a new one.
    await ok(svc, no, "cancel")
    assert (await _issue(svc, holder, no2, sn2)).status == 201


async def test_ecard_issue_and_revoke_rules(svc: ServiceHarness) -> None:
    issued = await svc.new_card(activate=False)
    device = ecard.EcardDevice.generate(1, sm.ALG_ED25519)
    body = {"channel": "gov_app", "alg": sm.ALG_ED25519, "device_public_key": device.public_key_bytes.hex()}
    r = await svc.post("/v1/ecards", {**body, "card_no": issued["card_no"]}, as_="ecard_channel")
    assert r.status == 422 and r.body["code"] == "card_not_active", r.body

    c = await svc.new_card()
    await ok(svc, c["card_no"], "temporary-loss")
    r = await svc.post("/v1/ecards", {**body, "card_no": c["card_no"]}, as_="ecard_channel")
    assert r.status == 422 and r.body["code"] == "card_not_active", r.body
    await ok(svc, c["card_no"], "lift-loss")

    dev = await svc.new_ecard(c["card_no"], sm.ALG_ED25519)
    r = await svc.post("/v1/ecards", {**body, "card_no": c["card_no"]}, as_="ecard_channel")
    assert r.status == 409 and r.body["code"] == "ecard_exists", r.body
    r = await svc.post(f"/v1/ecards/{dev.ecard_id}/revoke", {}, as_="ecard_channel")
    assert r.status == 200 and r.body["status"] == "revoked", r.body
    r = await svc.post(f"/v1/ecards/{dev.ecard_id}/revoke", {}, as_="ecard_channel")
    assert r.status == 409 and r.body["code"] == "ecard_revoked", r.body
    r = await svc.post("/v1/ecards/999999/revoke", {}, as_="ecard_channel")
    assert r.status == 404 and r.body["code"] == "not_found", r.body
    # After revocation a new e-card may be signed for the card.
    again = await svc.new_ecard(c["card_no"])
    assert again.ecard_id != dev.ecard_id
    assert [e["op"] for e in await events(svc, c["card_no"])][-3:] == [
        "ecard-issue",
        "ecard-revoke",
        "ecard-issue",
    ]
    # Cancelling the card revokes its e-card; the cancel event names it (before, only ecard.revoked_at
    # showed it, with no event of its own). A card without one says nothing of e-cards.
    cancelled = await ok(svc, c["card_no"], "cancel")
    assert cancelled.body["status"] == "cancelled"
    last = (await events(svc, c["card_no"]))[-1]
    assert (last["op"], last["detail"].get("ecard_revoked")) == ("cancel", again.ecard_id), last
    r = await svc.post(f"/v1/ecards/{again.ecard_id}/revoke", {}, as_="ecard_channel")
    assert r.status == 409 and r.body["code"] == "ecard_revoked", r.body
    plain = await svc.new_card()
    await ok(svc, plain["card_no"], "cancel")
    assert "ecard_revoked" not in (await events(svc, plain["card_no"]))[-1]["detail"]
