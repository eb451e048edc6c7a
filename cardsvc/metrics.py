"""Prometheus metrics, named by the Prometheus conventions (base units, _total for counters).

Correct across worker processes: `cardsvc serve --workers N` sets PROMETHEUS_MULTIPROC_DIR before this
module is imported, so every worker writes its samples to shared files and /metrics (in any worker)
aggregates them. Labels never carry personal data: only routes (templates, not paths), status codes,
credential kinds, outcomes and operation names, all from closed sets.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "AUDIT_LAST_RUN",
    "AUDIT_LAST_SUCCESS",
    "CLEARED_THROUGH",
    "CONCESSION_CHANGES",
    "CONTENT_TYPE_LATEST",
    "DB_POOL_CONNECTIONS",
    "DB_POOL_IN_USE",
    "HOTLIST_VERSION",
    "HTTP_REQUESTS",
    "HTTP_REQUESTS_IN_FLIGHT",
    "HTTP_REQUEST_DURATION",
    "JOURNEYS_SWEPT",
    "JOURNEY_SWEEP_THROUGH",
    "LIFECYCLE_OPERATIONS",
    "MAINTENANCE_FAILURES",
    "REQUEST_AUTH_FAILURES",
    "TAPS",
    "UPLOADED_RECORDS",
    "VERIFICATIONS",
    "VERIFICATION_DURATION",
    "render",
]

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "cardsvc_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "cardsvc_http_request_duration_seconds",
    "Time from request received to response sent.",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS_S,
)
HTTP_REQUESTS_IN_FLIGHT = Gauge(
    "cardsvc_http_requests_in_flight",
    "Requests being handled.",
    multiprocess_mode="livesum",
)
VERIFICATIONS = Counter(
    "cardsvc_credential_verifications_total",
    "Credential verifications by kind (card_cryptogram, ecard_code, ride_code; at the credential endpoints, "
    "online taps and ride uploads) and outcome (ok, forged, replayed, expired, malformed, card_unusable, "
    "unknown_card).",
    ["kind", "outcome"],
)
VERIFICATION_DURATION = Histogram(
    "cardsvc_credential_verification_duration_seconds",
    "Time to verify one credential, by kind.",
    ["kind"],
    buckets=_LATENCY_BUCKETS_S,
)
REQUEST_AUTH_FAILURES = Counter(
    "cardsvc_request_auth_failures_total",
    "Signed requests refused, by reason (missing, malformed, unknown_terminal, bad_signature, expired, "
    "replayed, forbidden).",
    ["reason"],
)
LIFECYCLE_OPERATIONS = Counter(
    "cardsvc_card_lifecycle_operations_total",
    "Card and e-card lifecycle operations, by operation and result.",
    ["operation", "result"],
)
CONCESSION_CHANGES = Counter(
    "cardsvc_concession_changes_total",
    "Transit concession changes by the card office, by action (set, extra_quota, end).",
    ["action"],
)
FARE_CORRECTIONS = Counter(
    "cardsvc_transit_fare_corrections_total",
    "Fares given back by the card office (first answers only), by reason (late_entry, terminal_fault, "
    "fare_error, goodwill).",
    ["reason"],
)
FARE_CORRECTION_FEN = Counter(
    "cardsvc_transit_fare_corrections_fen_total",
    "Money given back to purses by fare corrections, in fen, by reason; the operators are debited as much "
    "in their clearing files.",
    ["reason"],
)
QUOTA_RIDES_RETURNED = Counter(
    "cardsvc_transit_quota_rides_returned_total",
    "Elderly quota rides given back to their holders by the card office (first answers only), by reason.",
    ["reason"],
)
LATE_REFUNDS = Counter(
    "cardsvc_transit_late_refunds_total",
    "Penalties given back by the upload of a journey's missing half (first answers only): the ride charged "
    "its fare instead of the maximum fare, by reason (late_entry, late_exit).",
    ["reason"],
)
LATE_REFUND_FEN = Counter(
    "cardsvc_transit_late_refunds_fen_total",
    "Money given back to purses by late halves' refunds, in fen, by reason; the operators are debited as "
    "much in their clearing files (correction lines).",
    ["reason"],
)
LATE_REFUNDS_UNMATCHED = Counter(
    "cardsvc_transit_late_refunds_unmatched_total",
    "Approved uploads that complete a journey charged a penalty whose journal row is not on the card with "
    "something left, nor on a card this one replaced (the card office gave it back in full, or the replaced "
    "card's purse was held at that moment): charged nothing more and given nothing back. Counted per batch "
    "attempt, so a batch retried after a concurrent change counts again.",
)
JOURNEYS_SWEPT = Counter(
    "cardsvc_transit_journeys_swept_total",
    "What the sweep found past the journey timeout: closed (a metro journey, charged the maximum fare), "
    "held_exit (a gate's exit whose entry never came, charged the maximum fare), unpaid (a card whose "
    "purse could not pay what was due; charged at its next tap) or unpriced (a card with something due at "
    "a station the fare table neither serves nor lists under metro.retired; counted again by every sweep "
    "until a fixed table prices it, or its next tap does).",
    ["result"],
)
JOURNEY_SWEEP_THROUGH = Gauge(
    "cardsvc_transit_journey_sweep_through_timestamp_seconds",
    "How far the journey sweep has got (Unix time): every metro journey and held exit that came due before "
    "it has been looked at (its watermark plus the fare table's journey timeout), as of this service's "
    "last sweep. Normally a sweep interval behind the clock; falling further behind means the sweep is "
    "stuck on a window (docs/transit.md \"Open metro journeys\").",
    multiprocess_mode="max",  # the watermark only moves forward; a worker whose sweeps were skipped lags
)
MAINTENANCE_FAILURES = Counter(
    "cardsvc_maintenance_failures_total",
    "Maintenance steps that failed (partitions, temporary_losses, sweep, prune); the others of the round ran, "
    "and the step is tried again next round.",
    ["step"],
)
TAPS = Counter(
    "cardsvc_transit_taps_total",
    "Online transit taps answered by mode, result (approved, declined, conflict) and reason; a retry that gets "
    "its stored answer is not counted again.",
    ["mode", "result", "reason"],
)
UPLOADED_RECORDS = Counter(
    "cardsvc_transit_uploaded_records_total",
    "Uploaded offline purse records and ride-code rides (first answers only), by kind (purse, ridecode), "
    "result and reason.",
    ["kind", "result", "reason"],
)
HOTLIST_VERSION = Gauge(
    "cardsvc_hotlist_version",
    "Latest hotlist version seen by this service.",
    multiprocess_mode="max",
)
AUDIT_LAST_RUN = Gauge(
    "cardsvc_audit_last_run_timestamp_seconds",
    "When the last recorded `cardsvc audit --record` run finished (Unix time; 0: none recorded), read from "
    "audit_run at each scrape.",
    multiprocess_mode="max",
)
AUDIT_LAST_SUCCESS = Gauge(
    "cardsvc_audit_last_success_timestamp_seconds",
    "When the last recorded audit run in which every check passed finished (Unix time; 0: none).",
    multiprocess_mode="max",
)
CLEARED_THROUGH = Gauge(
    "cardsvc_transit_clearing_cleared_through_timestamp_seconds",
    "How far the operator is cleared (Unix time): the start of the first day since its first fare without "
    "a report (a refused or missed day holds it back), or, never cleared, the start of the day of its "
    "first fare. Read from clearing_report at most every 5 minutes.",
    ["operator"],
    multiprocess_mode="mostrecent",  # it goes back when a day is found missing: the latest read wins
)
DB_POOL_CONNECTIONS = Gauge(
    "cardsvc_db_pool_connections",
    "Open database connections in the pools.",
    multiprocess_mode="livesum",
)
DB_POOL_IN_USE = Gauge(
    "cardsvc_db_pool_connections_in_use",
    "Database connections checked out of the pools.",
    multiprocess_mode="livesum",
)


def render() -> bytes:
    """The exposition text: aggregated over all workers in multiprocess mode."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)
