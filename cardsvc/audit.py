"""`cardsvc audit`: invariant checks on a live database, each PASS or FAIL with its counts.

Every check is a set-based statement (joins and GROUP BY, no per-row round trips), and all of them read
one REPEATABLE READ, read-only snapshot, so a tap committing during the audit is seen entirely or not at
all. The purse check walks the card-id space in chunks (one GROUP BY join each) to report progress; at
40 million cards that is 40 statements of 1 million cards. The snapshot is held for the whole run: run it
at a quiet hour or on a replica, since a long snapshot holds back vacuum. `record_run` (`--record`, the
nightly timer) then keeps the outcome in `audit_run`, the one write, which /metrics reads.

Checks (docs/operations.md explains each and what to do when it fails):

- purse_balances: each purse balance equals the sum of its journal rows; no journal rows without a purse;
- journal_postings (read in the same pass): every row approved and of a known kind; every fare, penalty,
  offline or ride-code debit credited to an operator clearing knows (or `hotlisted:<operator>`), and every
  row credited to an operator of a kind clearing lists: otherwise the purse paid and no operator is paid;
- purse_overdraft: no purse below -purse_overdraft_fen. Two kinds of purse may be lower and are counted
  separately, not failed: a purse whose card, or a card it replaced, has a ride-code certificate, down to
  -ride_credit_limit_fen (post-paid rides, charged to the new card when taken before a replacement); and a
  purse whose accepted offline debits explain the rest (without them it would be within its limit: the
  card's own balance allowed them, and the back office purse is a shadow of the card's that can fall
  behind it). Such offline shadow overdraft is shown as a count and the amount owed beyond the limit. A
  purse lower than its offline debits explain fails: an online debit took it there;
- replacement_transfers: transfers through the 'replacement' account net to zero, each with its pair;
- terminal_txn_journal: every approved terminal transaction has its journal row, and every fare or penalty
  journal row of the tap engine (online taps, uploaded ride-code rides) inside the terminal transactions'
  retention has its terminal transaction;
- fare_corrections: every fare correction (kind 8) is booked twice, as its journal row and its
  fare_correction row (same card, amount; the journal's count and sum of kind 8 rows, read in the purse
  pass, equal the table's), corrects an approved fare debit of the same card paid to the same
  counterparty and of the clearing source (purse or ridecode) it names, and the corrections of one fare
  do not exceed it;
- clearing_reports: every clearing report's counts and totals (fares, and corrections) equal the journal
  aggregate for its operator and day (the rows posted that day, the clearing run's own rule). Not its digest: that is SM3 over the
  file's lines, which would mean streaming every cleared row of every report through the audit (the whole
  cleared journal, each run) instead of one aggregate per report in PostgreSQL. A change that keeps a
  day's count and total (two amounts swapped, a row's card or line rewritten) is seen by running the
  clearing for that day again (MISMATCH);
- hotlist_versions: hotlist entries are versions 1..head with no gap;
- hotlist_card_status: a card's newest hotlist entry blocks it exactly when the card is in circulation and
  not usable (lost, replaced, cancelled, temporarily lost, or its application locked): what validators
  refuse offline is what the service refuses online. A range of card ids at a time, like the purse pass.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg

from cardsvc import metrics
from cardsvc.config import Settings
from cardsvc.transit import clearing, fares
from cardsvc.transit.taps import (
    KIND_CORRECTION,
    KIND_FARE,
    KIND_OFFLINE,
    KIND_OPENING,
    KIND_PENALTY,
    KIND_RIDECODE,
    KIND_TOPUP,
    KIND_TRANSFER,
    SOURCE_OFFLINE,
    SOURCE_ONLINE,
    SOURCE_RIDECODE,
)
from protocols.card import CardStatus, HotlistAction

__all__ = ["CHUNK_CARDS", "Check", "record_run", "refresh_metrics", "run_audit"]

CHUNK_CARDS = 1_000_000
_KINDS = (
    KIND_FARE, KIND_PENALTY, KIND_TOPUP, KIND_OPENING, KIND_OFFLINE, KIND_RIDECODE, KIND_TRANSFER, KIND_CORRECTION,
)  # fmt: skip
SAMPLES_MAX = 5  # offending card ids shown (internal ids only, never card numbers or holder data)


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    counts: dict[str, int]
    detail: str = ""
    samples: tuple[int, ...] = ()

    def line(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        extra = f" — {self.detail}" if self.detail else ""
        sample = f" (e.g. card_id {', '.join(map(str, self.samples))})" if self.samples else ""
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {counts}{extra}{sample}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "counts": self.counts, "detail": self.detail,
                "samples": list(self.samples)}


# Also, in the same pass over the journal, the rows clearing would not pay out as the purse paid them
# (`stray`): not approved (result <> 1), of an unknown kind, a fare-like debit (the kinds clearing lists)
# credited to no operator clearing knows ($5: the fare table's and transit_operator's; `hotlisted:<op>` is
# offline debits the validator should have refused, listed apart), or a row credited to an operator under a
# kind clearing does not list. Each of these keeps the purse's balance right and the operator unpaid.
_PURSE_CHUNK_SQL = """
SELECT count(p.card_id) AS purses,
       count(*) FILTER (WHERE p.card_id IS NOT NULL AND p.balance_fen <> coalesce(j.total, 0)) AS mismatched,
       count(*) FILTER (WHERE p.card_id IS NULL) AS journal_without_purse,
       coalesce(sum(j.rows), 0)::bigint AS journal_rows,
       coalesce(sum(j.stray), 0)::bigint AS stray_rows,
       (array_agg(coalesce(p.card_id, j.card_id) ORDER BY coalesce(p.card_id, j.card_id))
            FILTER (WHERE p.card_id IS NULL OR p.balance_fen <> coalesce(j.total, 0)))[1:5] AS samples,
       (array_agg(j.card_id ORDER BY j.card_id) FILTER (WHERE j.stray > 0))[1:5] AS stray_samples,
       coalesce(sum(j.corrections), 0)::bigint AS correction_rows,
       coalesce(sum(j.correction_fen), 0)::bigint AS correction_fen
FROM (SELECT card_id, balance_fen FROM purse WHERE card_id >= $1 AND card_id < $2) p
FULL JOIN (SELECT card_id, sum(amount_fen) AS total, count(*) AS rows,
                  count(*) FILTER (WHERE kind = $6) AS corrections,
                  coalesce(sum(amount_fen) FILTER (WHERE kind = $6), 0) AS correction_fen,
                  count(*) FILTER (WHERE result <> 1 OR NOT kind = ANY($3::smallint[])
                                      OR (kind = ANY($4::smallint[]) AND amount_fen <> 0
                                          AND NOT (counterparty = ANY($5::text[]) OR counterparty LIKE 'hotlisted:%'))
                                      OR (counterparty = ANY($5::text[]) AND NOT kind = ANY($4::smallint[]))) AS stray
           FROM txn_journal WHERE card_id >= $1 AND card_id < $2 GROUP BY card_id) j
       ON j.card_id = p.card_id
"""


def _card_id_ranges(
    check: str, top: int, chunk: int, progress: Callable[[str], None] | None
) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of card ids 0..top, `chunk` ids each; a progress line after each range is read."""
    chunks = top // chunk + 1
    for n, lo in enumerate(range(0, top + 1, chunk), 1):
        yield lo, lo + chunk
        if progress is not None and chunks > 1:
            progress(f"{check}: card ids {min(lo + chunk, top + 1)}/{top + 1} ({n}/{chunks} chunks)")


async def _purse_balances(
    conn: asyncpg.Connection, table: fares.FareTable, chunk: int, progress: Callable[[str], None] | None
) -> tuple[Check, Check, tuple[int, int]]:
    """The purse and journal-postings checks, and the journal's count and sum of correction rows (for
    `_fare_corrections`), from one pass over the journal."""
    top: int = await conn.fetchval(
        """SELECT greatest((SELECT max(card_id) FROM purse), (SELECT max(card_id) FROM txn_journal),
                           0)"""
    )
    operators = await clearing.operators(conn, table)
    totals = {"purses": 0, "journal_rows": 0, "mismatched": 0, "journal_without_purse": 0, "stray_rows": 0,
              "correction_rows": 0, "correction_fen": 0}  # fmt: skip
    samples: list[int] = []
    stray: list[int] = []
    for lo, hi in _card_id_ranges("purse_balances", top, chunk, progress):
        r = await conn.fetchrow(
            _PURSE_CHUNK_SQL, lo, hi, list(_KINDS), list(clearing.CLEARING_KINDS), operators, KIND_CORRECTION,
        )  # fmt: skip
        assert r is not None
        for k in totals:
            totals[k] += r[k]
        samples.extend(r["samples"] or ())
        stray.extend(r["stray_samples"] or ())
    ok = totals["mismatched"] == 0 and totals["journal_without_purse"] == 0
    rows = totals.pop("stray_rows")
    corrections = (totals.pop("correction_rows"), totals.pop("correction_fen"))
    balances = Check("purse_balances", ok, totals, "" if ok else "balance differs from the sum of its journal rows",
                     tuple(samples[:SAMPLES_MAX]))  # fmt: skip
    postings = Check(
        "journal_postings",
        rows == 0,
        {"stray_rows": rows, "operators": len(operators)},
        "" if rows == 0 else (
            "journal rows clearing would not pay as the purse paid them: not approved, of an unknown kind, "
            "a fare-like debit credited to no known operator, or an operator's row of a kind clearing skips"
        ),
        tuple(stray[:SAMPLES_MAX]),
    )  # fmt: skip
    return balances, postings, corrections


# Each fare_correction row (few: the card office's) with its journal row and the fare it corrects, both
# found through the journal's primary key (card_id first).
_CORRECTIONS_SQL = """
WITH c AS (
    SELECT f.txn_id, f.card_id, f.corrects_txn_id, f.amount_fen, f.fare_ridecode, j.counterparty,
           j.txn_id IS NOT NULL AS booked
    FROM fare_correction f
    LEFT JOIN txn_journal j ON j.card_id = f.card_id AND j.txn_id = f.txn_id AND j.kind = $1 AND j.result = 1
                           AND j.amount_fen = f.amount_fen
), per_fare AS (
    SELECT c.card_id, sum(c.amount_fen) AS given,
           -- the fare exists, paid the correction's counterparty, and has the clearing source the correction's
           -- line names (clearing.clearing_source: a ride-code kind or source)
           bool_and(coalesce(o.counterparty = c.counterparty
                             AND c.fare_ridecode = (o.kind = $3 OR o.source = $4), false)) AS matched,
           min(-o.amount_fen) AS fare
    FROM c
    LEFT JOIN txn_journal o ON o.card_id = c.card_id AND o.txn_id = c.corrects_txn_id
                           AND o.kind = ANY($2::smallint[]) AND o.result = 1 AND o.amount_fen < 0
    WHERE c.booked  -- a correction without its journal row is counted once, as unbooked
    GROUP BY c.card_id, c.corrects_txn_id
)
SELECT (SELECT count(*) FROM c) AS corrections,
       (SELECT coalesce(sum(amount_fen), 0) FROM c)::bigint AS correction_fen,
       (SELECT count(*) FROM c WHERE NOT booked) AS unbooked,
       (SELECT count(*) FROM per_fare WHERE NOT matched) AS without_fare,
       (SELECT count(*) FROM per_fare WHERE matched AND given > fare) AS over_fare,
       (SELECT (array_agg(card_id ORDER BY card_id))[1:5] FROM
           (SELECT card_id FROM c WHERE NOT booked
            UNION SELECT card_id FROM per_fare WHERE NOT matched OR given > fare) bad) AS samples
"""


async def _fare_corrections(conn: asyncpg.Connection, journal: tuple[int, int]) -> Check:
    r = await conn.fetchrow(
        _CORRECTIONS_SQL, KIND_CORRECTION, list(clearing.FARE_KINDS), KIND_RIDECODE, SOURCE_RIDECODE
    )
    assert r is not None
    counts = {"corrections": r["corrections"], "correction_fen": r["correction_fen"],
              "journal_rows": journal[0], "journal_fen": journal[1], "unbooked": r["unbooked"],
              "without_fare": r["without_fare"], "over_fare": r["over_fare"]}  # fmt: skip
    problems = []
    if journal != (r["corrections"], r["correction_fen"]):
        problems.append("the journal's correction rows and the fare_correction table disagree")
    if r["unbooked"]:
        problems.append(f"{r['unbooked']} correction(s) without their journal row")
    if r["without_fare"]:
        problems.append(f"{r['without_fare']} fare(s) corrected that are not an approved fare of the card paid "
                        "to the correction's counterparty, with the clearing source it names")  # fmt: skip
    if r["over_fare"]:
        problems.append(f"{r['over_fare']} fare(s) given back more than they cost")
    return Check("fare_corrections", not problems, counts, "; ".join(problems), tuple(r["samples"] or ()))


# Each elderly quota ride given back (few: the card office's) names a fare row of its card that used one
# (quota_ride, approved), on a card of the holder whose quota got it back.
_QUOTA_RETURNS_SQL = """
SELECT count(*) AS returns,
       count(*) FILTER (WHERE j.txn_id IS NULL) AS without_ride,
       count(*) FILTER (WHERE c.holder_id IS DISTINCT FROM r.holder_id) AS other_holder,
       (array_agg(r.card_id ORDER BY r.card_id)
            FILTER (WHERE j.txn_id IS NULL OR c.holder_id IS DISTINCT FROM r.holder_id))[1:5] AS samples
FROM quota_ride_return r
LEFT JOIN txn_journal j ON j.card_id = r.card_id AND j.txn_id = r.fare_txn_id AND j.quota_ride AND j.result = 1
LEFT JOIN card c ON c.card_id = r.card_id
"""


async def _quota_ride_returns(conn: asyncpg.Connection) -> Check:
    r = await conn.fetchrow(_QUOTA_RETURNS_SQL)
    assert r is not None
    counts = {"returns": r["returns"], "without_ride": r["without_ride"], "other_holder": r["other_holder"]}
    problems = []
    if r["without_ride"]:
        problems.append(f"{r['without_ride']} quota ride(s) given back for a transaction that used none")
    if r["other_holder"]:
        problems.append(f"{r['other_holder']} quota ride(s) given back to a holder other than the card's")
    return Check("quota_ride_returns", not problems, counts, "; ".join(problems), tuple(r["samples"] or ()))


# The purses below the online limit, each with what may explain it (only those few purses are looked at,
# each through indexes). Its card's lineage: the card and the cards it replaced, following card.replaced_by
# back through the holder's cards (index card_holder); a replacement moves the purse, debt included.
# - ride_credit: a ride-code certificate anywhere in the lineage. A ride taken before a replacement is
#   charged post-paid to the new card (docs/transit.md), which has no certificate of its own.
# - offline_fen: the accepted offline debits (kind 5, negative) posted after the purse's last online
#   debit (the balance that debit was checked at had paid the earlier ones) that are in its balance: the
#   card's own (a replaced card's only after its replacement transfer, which moved the earlier ones on), and
#   those of each earlier card before its replacement transfer (the transfer carried them here). txn_id
#   orders one purse's rows: every writer holds the purse row lock. A card replaced with a zero balance
#   has no move to split its rows at: none of its debits are counted (stricter), or, once one of its
#   debits was carried over after the replacement, that carry is the split (the carried debit may then
#   count twice: looser by at most that one debit). A fare correction carried from such a card is a split
#   too, equally loose.
#   A replaced card's offline debits uploaded after its replacement are carried to the card that replaced
#   it (cardsvc/transit/offline.py): there they are its negative 'replacement' rows written by an upload
#   (source offline; a replacement's own transfers are the card office's), counted like its own debits.
_OVERDRAFT_SQL = """
SELECT p.card_id, p.balance_fen, f.ride_credit, f.offline_fen
FROM purse p
CROSS JOIN LATERAL (
    WITH RECURSIVE lineage (card_id, holder_id, replaced_by, depth) AS (
        SELECT c.card_id, c.holder_id, c.replaced_by, 0 FROM card c WHERE c.card_id = p.card_id
        UNION ALL
        SELECT o.card_id, o.holder_id, o.replaced_by, l.depth + 1 FROM lineage l
        JOIN card o ON o.holder_id = l.holder_id AND o.replaced_by = l.card_id
        WHERE l.depth < 100
    )
    , held AS (  -- the rows in this purse's balance, each marked offline or not
        SELECT l.card_id, j.txn_id, j.amount_fen,
               (j.kind = $2::smallint
                OR (j.counterparty = 'replacement' AND j.source = $3::smallint AND j.amount_fen < 0)) AS offline,
               j.counterparty
        FROM lineage l
        LEFT JOIN LATERAL (
            SELECT min(k.txn_id) AS txn_id FROM txn_journal k
            WHERE k.card_id = l.card_id AND k.counterparty = 'replacement' AND k.terminal_seq = l.replaced_by
        ) t ON true
        JOIN txn_journal j ON j.card_id = l.card_id
         AND CASE WHEN l.depth = 0 THEN l.replaced_by IS NULL OR j.txn_id > t.txn_id
                  ELSE j.txn_id < t.txn_id END
    ), last_online AS (  -- the last debit checked against the balance online (tap, ride, refund, sweep)
        SELECT coalesce(max(txn_id), 0) AS txn_id FROM held
        WHERE NOT offline AND amount_fen < 0 AND counterparty <> 'replacement'
    )
    SELECT (SELECT bool_or(EXISTS (SELECT 1 FROM ride_cert r WHERE r.card_id = l.card_id)) FROM lineage l)
               AS ride_credit,
           -- only the offline debits after it: those before were paid from the balance it was checked at
           coalesce((SELECT sum(h.amount_fen) FROM held h, last_online o WHERE h.offline AND h.txn_id > o.txn_id),
                    0)::bigint AS offline_fen
) f
WHERE p.balance_fen < -$1::bigint
ORDER BY p.card_id
"""


async def _overdraft(conn: asyncpg.Connection, settings: Settings) -> Check:
    limit = settings.purse_overdraft_fen
    credit = max(limit, settings.ride_credit_limit_fen)
    below: list[int] = []
    on_credit = shadow = shadow_fen = 0
    for r in await conn.fetch(_OVERDRAFT_SQL, limit, KIND_OFFLINE, SOURCE_OFFLINE):
        floor = -credit if r["ride_credit"] else -limit
        if r["balance_fen"] >= floor:
            on_credit += 1
        elif r["balance_fen"] - r["offline_fen"] >= floor:
            # Without its offline debits the purse would be within its limit: every online debit was
            # checked against a balance at least as low as this one, so the offline debits alone (allowed
            # by the card's own balance, uploaded later) explain the overdraft beyond the limit.
            shadow += 1
            shadow_fen += floor - r["balance_fen"]
        else:
            below.append(r["card_id"])
    counts = {"below_limit": len(below), "on_ride_credit": on_credit, "offline_shadow": shadow,
              "offline_shadow_fen": shadow_fen, "overdraft_limit_fen": limit}
    if below:
        detail = (f"{len(below)} purse(s) below -{limit} fen (-{credit} fen with a ride-code certificate) "
                  "by more than their offline debits explain")
    elif shadow:
        detail = f"{shadow} purse(s) owe {shadow_fen} fen beyond their limit, all of it from accepted offline debits"
    else:
        detail = ""
    return Check("purse_overdraft", not below, counts, detail, tuple(below[:SAMPLES_MAX]))


_REPLACEMENT_SQL = """
SELECT count(*) AS transfer_rows, coalesce(sum(j.amount_fen), 0)::bigint AS net_fen,
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM txn_journal k
           WHERE k.card_id = j.terminal_seq AND k.counterparty = 'replacement'
             AND k.terminal_seq = j.card_id AND k.amount_fen = -j.amount_fen)) AS unpaired
FROM txn_journal j WHERE j.counterparty = 'replacement'
"""


async def _replacement(conn: asyncpg.Connection) -> Check:
    r = await conn.fetchrow(_REPLACEMENT_SQL)
    assert r is not None
    counts = dict(r)
    ok = r["net_fen"] == 0 and r["unpaired"] == 0
    return Check("replacement_transfers", ok, counts, "" if ok else "the replacement account does not net to zero")


_TXN_WITHOUT_JOURNAL_SQL = """
SELECT count(*) FILTER (WHERE t.txn_id IS NULL OR NOT EXISTS (
           SELECT 1 FROM txn_journal j WHERE j.card_id = t.card_id AND j.txn_id = t.txn_id)) AS missing,
       count(*) AS approved,
       (array_agg(t.card_id ORDER BY t.card_id) FILTER (WHERE t.txn_id IS NULL OR NOT EXISTS (
           SELECT 1 FROM txn_journal j WHERE j.card_id = t.card_id AND j.txn_id = t.txn_id)))[1:5] AS samples
FROM terminal_txn t WHERE t.result = 'approved'
"""

_JOURNAL_WITHOUT_TXN_SQL = """
SELECT count(*) AS checked,
       count(*) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM terminal_txn t
           WHERE t.terminal_id = j.terminal_id AND t.terminal_seq = j.terminal_seq AND t.card_id = j.card_id)) AS missing,
       (array_agg(j.card_id ORDER BY j.card_id) FILTER (WHERE NOT EXISTS (
           SELECT 1 FROM terminal_txn t
           WHERE t.terminal_id = j.terminal_id AND t.terminal_seq = j.terminal_seq AND t.card_id = j.card_id)))[1:5]
           AS samples
FROM txn_journal j
WHERE j.source = ANY($1::smallint[]) AND j.kind = ANY($2::smallint[]) AND j.at >= now() - make_interval(days => $3)
"""


async def _terminal_txns(conn: asyncpg.Connection, settings: Settings) -> Check:
    a = await conn.fetchrow(_TXN_WITHOUT_JOURNAL_SQL)
    # Terminal answers are pruned after their retention: only journal rows well inside it are checked.
    days = max(0, settings.terminal_txn_retention_days - 1)
    b = await conn.fetchrow(_JOURNAL_WITHOUT_TXN_SQL, [SOURCE_ONLINE, SOURCE_RIDECODE], [KIND_FARE, KIND_PENALTY], days)
    assert a is not None and b is not None
    counts = {"approved_txns": a["approved"], "approved_without_journal": a["missing"],
              "online_journal_rows": b["checked"], "journal_without_txn": b["missing"],
              "window_days": days}
    ok = a["missing"] == 0 and b["missing"] == 0
    samples = tuple([*(a["samples"] or ()), *(b["samples"] or ())][:SAMPLES_MAX])
    return Check("terminal_txn_journal", ok, counts, "" if ok else "terminal answers and journal disagree", samples)


_DAY_START = "(r.business_date::timestamp - make_interval(secs => $2)) AT TIME ZONE 'UTC'"
_DAY_END = "(r.business_date::timestamp + interval '1 day' - make_interval(secs => $2)) AT TIME ZONE 'UTC'"
_REPORTS_SQL = f"""
SELECT r.operator_id, r.business_date, r.txn_count, r.total_fen, r.correction_count, r.correction_fen,
       a.txn_count AS journal_count, a.total_fen AS journal_total,
       a.correction_count AS journal_corrections, a.correction_fen AS journal_correction_fen,
       a.reversals
FROM clearing_report r
CROSS JOIN LATERAL (
    SELECT {clearing.AGGREGATE_COLUMNS}
    FROM txn_journal j
    WHERE j.counterparty = r.operator_id AND j.kind = ANY($1::smallint[]) AND j.result = 1
      AND {clearing.in_day_sql(_DAY_START, _DAY_END, "j")}
) a
WHERE (a.txn_count, a.total_fen, a.correction_count, a.correction_fen)
      IS DISTINCT FROM (r.txn_count, r.total_fen, r.correction_count, r.correction_fen)
   OR a.reversals > 0
ORDER BY r.business_date, r.operator_id
"""


async def _clearing_reports(conn: asyncpg.Connection, table: fares.FareTable) -> Check:
    reports: int = await conn.fetchval("SELECT count(*) FROM clearing_report")
    bad = await conn.fetch(_REPORTS_SQL, list(clearing.CLEARING_KINDS), float(table.rules.utc_offset_s))
    detail = "; ".join(
        f"{r['operator_id']} {r['business_date']}: report {r['txn_count']}/{r['total_fen']} fen "
        f"(corrections {r['correction_count']}/{r['correction_fen']} fen), journal "
        f"{r['journal_count']}/{r['journal_total']} fen (corrections {r['journal_corrections']}/"
        f"{r['journal_correction_fen']} fen)"
        + (f", {r['reversals']} row(s) crediting a purse that the file cannot name" if r["reversals"] else "")
        for r in bad[:SAMPLES_MAX]
    )
    return Check("clearing_reports", not bad, {"reports": reports, "mismatched": len(bad)}, detail)


async def _hotlist(conn: asyncpg.Connection) -> Check:
    r = await conn.fetchrow(
        """SELECT (SELECT version FROM hotlist_head) AS head, count(*) AS entries,
                  coalesce(min(version), 0) AS first, coalesce(max(version), 0) AS last
           FROM hotlist_entry"""
    )
    assert r is not None
    head, n = r["head"], r["entries"]
    ok = n == head and (head == 0 or (r["first"] == 1 and r["last"] == head))
    detail = "" if ok else f"expected versions 1..{head}; found {n} between {r['first']} and {r['last']}"
    return Check("hotlist_versions", ok, {"head": head, "entries": n, "missing": max(0, head - n)}, detail)


# The hotlist and the cards' status, a range of card ids at a time: a card is on the hotlist (its newest entry
# blocks it) exactly when it is in circulation and not usable (flows.lifecycle.CardState.listed: not issued,
# and not active or its application locked). Validators refuse what the hotlist blocks, so a lost card whose
# newest entry unblocks it is accepted offline, and a usable card blocked is refused.
_HOTLIST_STATUS_SQL = f"""
SELECT count(*) AS cards,
       count(*) FILTER (WHERE c.listed) AS listed,
       count(*) FILTER (WHERE c.listed AND h.action IS DISTINCT FROM {int(HotlistAction.BLOCK)}) AS unusable_not_blocked,
       count(*) FILTER (WHERE NOT c.listed AND h.action = {int(HotlistAction.BLOCK)}) AS usable_blocked,
       (array_agg(c.card_id ORDER BY c.card_id)
            FILTER (WHERE c.listed <> coalesce(h.action = {int(HotlistAction.BLOCK)}, false)))[1:5] AS samples
FROM (SELECT card_id,
             status <> {int(CardStatus.ISSUED)} AND (status <> {int(CardStatus.ACTIVE)} OR app_locked) AS listed
      FROM card WHERE card_id >= $1 AND card_id < $2) c
LEFT JOIN (SELECT DISTINCT ON (card_id) card_id, action FROM hotlist_entry
           WHERE card_id >= $1 AND card_id < $2 ORDER BY card_id, version DESC) h ON h.card_id = c.card_id
"""


async def _hotlist_status(
    conn: asyncpg.Connection, chunk: int, progress: Callable[[str], None] | None
) -> Check:
    top: int = await conn.fetchval("SELECT coalesce(max(card_id), 0) FROM card")
    totals = {"cards": 0, "listed": 0, "unusable_not_blocked": 0, "usable_blocked": 0}
    samples: list[int] = []
    for lo, hi in _card_id_ranges("hotlist_card_status", top, chunk, progress):
        r = await conn.fetchrow(_HOTLIST_STATUS_SQL, lo, hi)
        assert r is not None
        for k in totals:
            totals[k] += r[k]
        samples.extend(r["samples"] or ())
    ok = totals["unusable_not_blocked"] == 0 and totals["usable_blocked"] == 0
    detail = "" if ok else (
        "cards whose newest hotlist entry disagrees with their status: validators would accept a card that is "
        "not usable, or refuse one that is"
    )
    return Check("hotlist_card_status", ok, totals, detail, tuple(samples[:SAMPLES_MAX]))


async def run_audit(
    conn: asyncpg.Connection,
    settings: Settings,
    table: fares.FareTable,
    *,
    chunk_cards: int = CHUNK_CARDS,
    progress: Callable[[str], None] | None = None,
) -> tuple[dt.datetime, list[Check]]:
    """Run every check on one snapshot; returns the snapshot time and the checks in order."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        at: dt.datetime = await conn.fetchval("SELECT now()")
        balances, postings, corrections = await _purse_balances(conn, table, max(1, chunk_cards), progress)
        checks = [
            balances,
            postings,
            await _fare_corrections(conn, corrections),
            await _quota_ride_returns(conn),
            await _overdraft(conn, settings),
            await _replacement(conn),
            await _terminal_txns(conn, settings),
            await _clearing_reports(conn, table),
            await _hotlist(conn),
            await _hotlist_status(conn, max(1, chunk_cards), progress),
        ]
    return at, checks


async def record_run(conn: asyncpg.Connection, snapshot_at: dt.datetime, checks: list[Check]) -> int:
    """Keep a run's outcome (`cardsvc audit --record`, migration 0014); returns its run id. `conn` is set
    up like every connection of the service (`store.pool.init_connection`)."""
    run_id: int = await conn.fetchval(
        """INSERT INTO audit_run (snapshot_at, ok, failed, checks) VALUES ($1, $2, $3, $4::jsonb)
           RETURNING run_id""",
        snapshot_at,
        all(c.ok for c in checks),
        [c.name for c in checks if not c.ok],
        [c.to_json() for c in checks],  # jsonb through the connection's codec (store.pool.init_connection)
    )
    return run_id


async def refresh_metrics(conn: asyncpg.Connection) -> None:
    """Set the audit gauges from the recorded runs (at each scrape): when the last one finished and when
    the last one that passed did. Both only move forward, so the workers' values aggregate by max."""
    row = await conn.fetchrow(
        "SELECT max(finished_at) AS run, max(finished_at) FILTER (WHERE ok) AS passed FROM audit_run"
    )
    if row["run"] is not None:
        metrics.AUDIT_LAST_RUN.set(row["run"].timestamp())
    if row["passed"] is not None:
        metrics.AUDIT_LAST_SUCCESS.set(row["passed"].timestamp())
