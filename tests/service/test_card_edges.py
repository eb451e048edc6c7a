"""Edges of the card lifecycle, credential checks, request signing and the hotlist that the other tests let a
one-token change of the code pass unnoticed: each test names the change it catches. Also: an e-card issued
for a card whose temporary loss has run out records the expiry first."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from cardsvc.app import _prune
from cardsvc.flows import lifecycle
from cardsvc.http.keys import SERVICES
from protocols import hotlist, sm
from tests.helpers import ServiceHarness, replacement_body
from tests.service.test_auth import until_reloaded
from tests.service.test_credentials import CARD, CODE, accepted, refused
from tests.service.test_input import assert_problem


async def _op(svc: ServiceHarness, card_no: str, name: str, body: dict[str, Any] | None = None) -> Any:
    r = await svc.post(f"/v1/cards/{card_no}/{name}", body or {})
    assert r.status == 200, (name, r.body)
    return r.body


async def _replica(svc: ServiceHarness) -> hotlist.HotlistReplica:
    replica = hotlist.HotlistReplica()
    while True:
        r = await svc.get(f"/v1/hotlist?since={replica.version}", as_="transit_validator")
        assert r.status == 200, r.body
        if not replica.apply(hotlist.decode_block(r.body)):
            return replica


# ------------------------------------------------------------------------------------ lifecycle


async def test_the_end_of_a_temporary_loss_keeps_an_app_locked_card_on_the_hotlist(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md: every change that makes a card unusable or usable again gets a hotlist version; a locked
    card is not usable. A temporary loss that runs out on an application-locked card leaves it unusable, so
    no UNBLOCK may be listed (by the sweeper, or by the next operation on the card).
    Catches lifecycle.expire_one listing UNBLOCK/LOSS_EXPIRED whatever `after.listed` says (mutant L11)."""
    swept = await svc.new_card()
    inline = await svc.new_card()
    for c in (swept, inline):
        await _op(svc, c["card_no"], "temporary-loss")
        await _op(svc, c["card_no"], "lock-app")
    head = await db.fetchval("SELECT version FROM hotlist_head")
    past = "UPDATE card SET temp_loss_until = now() - interval '1 minute' WHERE card_no = $1"
    await db.execute(past, swept["card_no"])
    assert await lifecycle.expire_temporary_losses(svc.app[SERVICES].pool) == 1
    await db.execute(past, inline["card_no"])
    await _op(svc, inline["card_no"], "lock-pin")  # records the expiry first (flows/lifecycle.apply)
    assert await db.fetchval("SELECT version FROM hotlist_head") == head  # nothing unblocked
    replica = await _replica(svc)
    for c in (swept, inline):
        assert c["card_sn"] in replica.blocked
        view = (await svc.get(f"/v1/cards/{c['card_no']}")).body
        assert (view["status"], view["app_locked"], view["usable"]) == ("active", True, False)
        await refused(svc, CARD, "card_unusable", svc.card_auth_body(c["card_sn"]), card_status="active")


async def test_the_sweeper_leaves_a_temporary_loss_alone_until_its_period_ends(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md: temporary-loss ends by itself after CARDSVC_TEMP_LOSS_DAYS; until then the card is lost.
    A loss with an hour left is not ended by the sweeper, nor unblocked on the hotlist.
    Catches expire_temporary_losses selecting `temp_loss_until <= now() + interval '1 day'` (mutant L18)."""
    c = await svc.new_card()
    await _op(svc, c["card_no"], "temporary-loss")
    await db.execute("UPDATE card SET temp_loss_until = now() + interval '1 hour' WHERE card_no = $1", c["card_no"])
    head = await db.fetchval("SELECT version FROM hotlist_head")
    assert await lifecycle.expire_temporary_losses(svc.app[SERVICES].pool) == 0
    assert await db.fetchval("SELECT version FROM hotlist_head") == head
    assert (await svc.get(f"/v1/cards/{c['card_no']}")).body["status"] == "temporary_loss"
    await refused(svc, CARD, "card_unusable", svc.card_auth_body(c["card_sn"]), card_status="temporary_loss")


async def test_a_temporarily_lost_card_can_be_replaced(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """docs/api.md lifecycle table: `replace` is allowed from active, temporary_loss and formal_loss (a holder
    who lost the card gets a new one without a formal loss first); the old card is `replaced` and blocked.
    Catches `replace` losing TEMP_LOST from its allowed statuses (mutant L4)."""
    c = await svc.new_card()
    await _op(svc, c["card_no"], "temporary-loss")
    body = replacement_body()
    new = await _op(svc, c["card_no"], "replace", body)
    assert (new["card_no"], new["status"], new["usable"]) == (body["new_card_no"], "active", True)
    old = (await svc.get(f"/v1/cards/{c['card_no']}")).body
    assert (old["status"], old["usable"]) == ("replaced", False)
    assert c["card_sn"] in (await _replica(svc)).blocked


async def test_a_card_never_activated_can_be_cancelled(svc: ServiceHarness) -> None:
    """docs/api.md lifecycle table: `cancel` is allowed from issued (a card made but never handed out), and
    the holder may then be issued another card. Catches `cancel` losing ISSUED (mutant L3)."""
    c = await svc.new_card(activate=False)
    r = await _op(svc, c["card_no"], "cancel")
    assert (r["status"], r["usable"]) == ("cancelled", False)


# ---------------------------------------------------------------------------------- credentials


async def test_a_card_challenge_past_its_age_limit_is_expired_whatever_the_clock_skew(svc: ServiceHarness) -> None:
    """protocols/card.md: a terminal challenge is refused outside [now - max_age, now + skew]; "the skew is
    allowed on the future side only ... so an old answer cannot be replayed later" (max_age
    CARDSVC_CARD_CHALLENGE_AGE_S = 60, skew 300). An answer 30 s past the age limit is expired.
    Catches verify_card passing (age + skew, skew) (mutant C2) or (skew, age) swapped (mutant C1)."""
    c = await svc.new_card()
    age, skew = svc.settings.card_challenge_age_s, svc.settings.clock_skew_s
    assert age + 30 < skew  # the defaults; the test needs a skew wider than the overshoot
    now = int(time.time())
    await refused(svc, CARD, "expired", svc.card_auth_body(c["card_sn"], now_s=now - age - 30))
    await accepted(svc, CARD, svc.card_auth_body(c["card_sn"], now_s=now - age + 10))


async def test_credential_uses_are_remembered_for_as_long_as_the_credential_is_fresh(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md: a card-authentication answer and an e-card code are accepted once; protocols/card.md:
    remember (card, terminal challenge) until it expires. A challenge or code stamped up to the skew (300 s)
    ahead of the server stays fresh for that plus its age limit (60 s), so pruning must keep its use at
    least that long. Here the first use was 250 s ago (the credential then 200 s ahead), the replay now is
    within the age limit: maintenance must not have forgotten it.
    Catches app._prune keeping credential uses only max(lifetime, age) seconds (mutant A8)."""
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"], sm.ALG_ED25519)
    now = int(time.time())
    body = svc.card_auth_body(c["card_sn"], now_s=now - 50)
    code = dev.next_code(now - 30)
    await accepted(svc, CARD, body)
    await accepted(svc, CODE, code)
    await db.execute("UPDATE credential_use SET used_at = used_at - interval '250 seconds'")
    await _prune(svc.app[SERVICES].pool, svc.settings)
    assert await db.fetchval("SELECT count(*) FROM credential_use") == 2
    await refused(svc, CARD, "replayed", body)
    await refused(svc, CODE, "replayed", code)


# ---------------------------------------------------------------------------------------- e-cards


async def test_no_ecard_for_an_application_locked_card(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """docs/api.md: POST /v1/ecards answers `card_not_active` when "the card is not usable"; an
    application-locked card is not usable. Catches issue_ecard checking only the status (mutant E1)."""
    c = await svc.new_card()
    await _op(svc, c["card_no"], "lock-app")
    r = await svc.post(
        "/v1/ecards",
        {"card_no": c["card_no"], "channel": "gov_app", "alg": sm.ALG_ED25519, "device_public_key": "d7" * 32},
        as_="ecard_channel",
    )
    assert r.status == 422 and r.body["code"] == "card_not_active", r.body
    assert await db.fetchval("SELECT count(*) FROM ecard") == 0


async def test_a_revoked_ecard_reads_unusable_and_leaves_the_card_view(svc: ServiceHarness) -> None:
    """docs/api.md: revoke answers `"status": "revoked", "usable": false`; GET /v1/cards/{card_no} shows the
    *live* electronic card or null. Catches _view answering the card's usability for a revoked e-card
    (mutant E2) and get_card showing a revoked e-card (mutant G1)."""
    c = await svc.new_card()
    dev = await svc.new_ecard(c["card_no"])
    r = await svc.post(f"/v1/ecards/{dev.ecard_id}/revoke", {}, as_="ecard_channel")
    assert r.status == 200 and (r.body["status"], r.body["usable"]) == ("revoked", False), r.body
    r = await svc.get(f"/v1/ecards/{dev.ecard_id}", as_="ecard_channel")
    assert (r.body["status"], r.body["usable"]) == ("revoked", False), r.body
    r = await svc.get(f"/v1/cards/{c['card_no']}")
    assert r.status == 200 and r.body["ecard"] is None, r.body


# ------------------------------------------------------------------------------- request signing


async def test_a_timestamp_just_outside_the_clock_skew_is_refused(svc: ServiceHarness) -> None:
    """docs/api.md: the timestamp "must be within 300 s of the server's" (CARDSVC_CLOCK_SKEW_S); 20 s beyond
    it on either side is `auth_expired`. The existing test stays 60 s away from the edge.
    Catches the middleware allowing skew + 30 s (mutant A2)."""
    skew = svc.settings.clock_skew_s
    for offset in (-skew - 20, skew + 20):
        r = await svc.get("/v1/hotlist", as_="transit_validator", now_s=int(time.time()) + offset)
        assert_problem(r, 401, "auth_expired", "X-Cardsvc-Timestamp", ctx=offset)
    for offset in (-skew + 20, skew - 20):
        r = await svc.get("/v1/hotlist", as_="transit_validator", now_s=int(time.time()) + offset)
        assert r.status == 200, (offset, r.body)


async def test_a_nonce_is_remembered_for_twice_the_clock_skew(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """docs/security.md: a reused nonce is refused, "remembered for twice the skew window". A request
    stamped 290 s ahead of the server when first seen is still within the skew 400 s later: maintenance
    must not have forgotten its nonce by then. (The first use is moved 400 s back in the database.)
    Catches app._prune keeping nonces for one skew window only (mutant A7)."""
    nonce = "review-c-nonce-0001"
    ts = int(time.time()) - 110
    r = await svc.get("/v1/hotlist", as_="transit_validator", now_s=ts, nonce=nonce)
    assert r.status == 200, r.body
    await db.execute("UPDATE request_nonce SET seen_at = seen_at - interval '400 seconds' WHERE nonce = $1", nonce)
    await _prune(svc.app[SERVICES].pool, svc.settings)
    r = await svc.get("/v1/hotlist", as_="transit_validator", now_s=ts, nonce=nonce)
    assert_problem(r, 401, "auth_replayed", "X-Cardsvc-Nonce")


async def test_a_key_not_valid_yet_is_refused(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """protocols/terminal_auth.md: the server needs "a key valid now" (`auth_unknown_terminal` otherwise);
    a key whose validity starts in an hour is not. Catches KeyRecord.valid_at ignoring not_before
    (mutant T2)."""
    t = svc.terminals["transit_validator"]
    await db.execute(
        "UPDATE terminal_key SET not_before = now() + interval '1 hour' WHERE terminal_id = $1", t.terminal_id
    )
    r = await until_reloaded(
        svc, lambda: svc.get("/v1/hotlist", as_="transit_validator"), lambda r: r.status == 401
    )
    assert_problem(r, 401, "auth_unknown_terminal")


# ----------------------------------------------------------------------------------------- hotlist


async def test_a_lost_cards_hotlist_entry_names_the_account_its_ride_codes_carry(svc: ServiceHarness) -> None:
    """protocols/hotlist.md: each entry's `account_id` is "the account the card's ride-code certificates
    name"; a gate denies ride codes by it (HotlistReplica.blocked_accounts). After a loss the gate's replica
    must deny exactly the lost card's certificate account (not some other number).
    Catches the hotlist read filling account_id from another column, e.g. the entry's version (mutant H5)."""
    from tests.transit.test_rides import rider

    other = await svc.new_card(has_purse=True)
    await _op(svc, other["card_no"], "temporary-loss")
    await _op(svc, other["card_no"], "lift-loss")  # versions move on, so version != card_id below
    c, phone, _ = await rider(svc)
    account = phone.cert.account_id
    await _op(svc, c["card_no"], "temporary-loss")
    replica = await _replica(svc)
    assert replica.blocked == {c["card_sn"]}
    assert replica.blocked_accounts == {account}


async def test_the_hotlist_version_served_is_the_one_the_block_brings(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md: the service remembers the versions it served each terminal, and judges an offline record
    the terminal makes afterwards as of that version at least. A validator that fetched a partial block
    (`limit=1`, `more: true`) holds its `to_version`, not the latest: a card blocked only in a version it
    did not download is not `hotlisted` on its records. Catches get_hotlist recording
    `block.latest_version` as served (mutant H6)."""
    from tests.transit.test_offline import debit, funded, tid, upload

    c, chip = await funded(svc, 1000)
    other = await svc.new_card()
    base = (await svc.get("/v1/hotlist?since=0", as_="ops")).body["latest_version"]
    await _op(svc, other["card_no"], "temporary-loss")  # base + 1
    await _op(svc, c["card_no"], "temporary-loss")  # base + 2
    r = await svc.get(f"/v1/hotlist?since={base}&limit=1", as_="transit_validator")
    assert r.status == 200 and (r.body["to_version"], r.body["more"]) == (base + 1, True), r.body
    record = debit(chip, tid(svc), 180, hotlist_version=base + 1, txn_time=int(time.time()) + 2)
    answers = await upload(svc, [record])
    assert [(a["result"], a["reason"]) for a in answers] == [("accepted", None)], answers


# ------------------------------------------------------------------------------- more lifecycle


async def test_a_replacement_must_expire_after_today(svc: ServiceHarness) -> None:
    """docs/api.md: `expires_on` of a card must be in the future (issue and replace answer `invalid_field`
    otherwise, and bad input changes nothing). A replacement expiring today (local date) is refused and
    the old card stays as it was. Catches _replace comparing `<` instead of `<=` (mutant L15)."""
    import datetime as dt

    from cardsvc import localtime

    c = await svc.new_card()
    body = {**replacement_body(), "expires_on": localtime.local_date(dt.datetime.now(dt.UTC)).isoformat()}
    r = await svc.post(f"/v1/cards/{c['card_no']}/replace", body)
    assert_problem(r, 400, "invalid_field", "expires_on")
    assert (await svc.get(f"/v1/cards/{c['card_no']}")).body["status"] == "active"
    assert (await svc.get(f"/v1/cards/{body['new_card_no']}")).status == 404


# ------------------------------------------------------------------------------- more signing


async def test_a_forbidden_request_consumes_no_nonce(svc: ServiceHarness) -> None:
    """docs/api.md: the nonce is checked last, and "a refused request consumes no nonce" - a 403
    forbidden_operation included: the terminal's next, permitted request may carry that nonce.
    Catches the forbidden branch recording the nonce before refusing (mutant N1)."""
    c = await svc.new_card()
    nonce = "review-c-forbidden-01"
    r = await svc.get(f"/v1/cards/{c['card_no']}", as_="transit_validator", nonce=nonce)
    assert_problem(r, 403, "forbidden_operation")
    r = await svc.get("/v1/hotlist", as_="transit_validator", nonce=nonce)
    assert r.status == 200, r.body


async def test_a_rotation_never_revives_a_retired_key(svc: ServiceHarness, db: asyncpg.Connection) -> None:
    """docs/api.md: the old key keeps working for the overlap period (then stops); rotate_key: "every older
    key stays valid for overlap_s more seconds, then stops". A key retired by an earlier rotation (overlap
    0) stays refused when a later rotation grants an hour of overlap to the key it replaces.
    Catches rotate_key setting not_after = GREATEST(...) instead of LEAST(...) (mutant N6)."""
    from cardsvc.security import terminals
    from tests.helpers import Terminal
    from tests.service.test_auth import _signed, send

    kek = svc.keys.terminal_kek
    k1 = svc.terminals["transit_validator"]
    k2 = Terminal(k1.terminal_id, "k2", await terminals.rotate_key(db, kek, k1.terminal_id, "k2", 0))

    async def call(t: Terminal) -> Any:
        return await send(svc, "GET", "/v1/hotlist", b"", _signed(t, "GET", "/v1/hotlist"))

    await until_reloaded(svc, lambda: call(k2), lambda r: r.status == 200)
    assert_problem(await call(k1), 401, "auth_unknown_terminal")
    k3 = Terminal(k1.terminal_id, "k3", await terminals.rotate_key(db, kek, k1.terminal_id, "k3", 3600))
    await until_reloaded(svc, lambda: call(k3), lambda r: r.status == 200)
    assert (await call(k2)).status == 200  # the overlap
    assert_problem(await call(k1), 401, "auth_unknown_terminal")


async def test_ecard_issue_on_a_card_whose_temporary_loss_ran_out_audits_the_status_it_decided_on(
    svc: ServiceHarness, db: asyncpg.Connection
) -> None:
    """docs/api.md: "A temporary loss whose period has run out shows as `active`". POST /v1/ecards, like the
    lifecycle operations and POST /v1/ride-certs, records that expiry first (event
    `temporary-loss-expired`, hotlist UNBLOCK) and then issues on an active card: its event said
    `temporary_loss` -> `temporary_loss`, and the card stayed on the hotlist until the sweeper ran."""
    c = await svc.new_card()
    r = await svc.post(f"/v1/cards/{c['card_no']}/temporary-loss", {})
    assert r.status == 200, r.body
    await db.execute("UPDATE card SET temp_loss_until = now() - interval '1 second' WHERE card_no = $1", c["card_no"])
    assert (await svc.get(f"/v1/cards/{c['card_no']}")).body["status"] == "active"
    await svc.new_ecard(c["card_no"])  # accepted: the card is usable
    events = (await svc.get(f"/v1/cards/{c['card_no']}/events")).body["events"]
    last = events[-1]
    assert last["op"] == "ecard-issue"
    assert (last["status_before"], last["status_after"]) == ("active", "active"), events[-2:]
    assert events[-2]["op"] == "temporary-loss-expired", events[-3:]
    assert await db.fetchval("SELECT status FROM card WHERE card_no = $1", c["card_no"]) == 2  # active
    replica = await _replica(svc)
    assert not replica.is_blocked(c["card_sn"]), "the card left the hotlist with the expiry"
