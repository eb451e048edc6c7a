"""Every limit of the service, as a named constant with its unit last.

Defaults only: each one that an operator may want to change is also a field of `cardsvc.config.Settings`
(environment variable CARDSVC_<NAME>). Nothing in the service is unbounded.
"""

from __future__ import annotations

__all__ = [
    "AUDIT_PAGE_ROWS_MAX",
    "BATCH_ITEMS_MAX",
    "BATCH_QUEUE_ITEMS_MAX",
    "BATCH_WAIT_MS_MAX",
    "BODY_BYTES_MAX",
    "CARD_CHALLENGE_AGE_S",
    "CLEARING_MARGIN_S",
    "CLEARING_SETTLE_S",
    "CLOCK_SKEW_S",
    "CREDENTIAL_USE_RETENTION_S",
    "DB_COMMAND_TIMEOUT_S",
    "DB_CONNECT_TIMEOUT_S",
    "DB_POOL_MAX",
    "DB_POOL_MIN",
    "ECARD_CODE_LIFETIME_S",
    "HOTLIST_BLOCK_ENTRIES_DEFAULT",
    "HOTLIST_BLOCK_ENTRIES_MAX",
    "KEY_CACHE_REFRESH_S",
    "KEY_ROTATION_OVERLAP_S",
    "NONCE_RETENTION_S",
    "PURSE_BALANCE_MAX_FEN",
    "PURSE_OVERDRAFT_FEN",
    "REQUEST_TIMEOUT_S",
    "RIDE_CERT_DAYS",
    "RIDE_CREDIT_LIMIT_FEN",
    "RIDE_MAX_FARE_FEN",
    "SHUTDOWN_GRACE_S",
    "SIGNATURE_THREADS_MAX",
    "SWEEP_BEHIND_MARGIN_S",
    "SWEEP_INTERVAL_S",
    "SWEEP_INTERVAL_S_MAX",
    "TEMP_LOSS_DAYS",
    "TERMINAL_TXN_RETENTION_DAYS",
    "UPLOAD_AGE_S_MAX",
    "UPLOAD_BODY_BYTES_MAX",
]

BODY_BYTES_MAX = 64 * 1024
# Batch uploads (500 offline records or ride records of up to ~600 bytes each) get a larger body.
UPLOAD_BODY_BYTES_MAX = 512 * 1024
REQUEST_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 15.0
# Daily clearing (cardsvc/transit/clearing.py): a day can be cleared this long after it ended (clocks
# stepped back a little, a transaction that read its start time but is not listed as started yet), and a
# run waits this long for transactions that began before the day ended.
CLEARING_MARGIN_S = 60.0
CLEARING_SETTLE_S = 30.0

DB_POOL_MIN = 2
DB_POOL_MAX = 16
DB_CONNECT_TIMEOUT_S = 5.0
DB_COMMAND_TIMEOUT_S = 5.0

# A signed request is accepted within this window of the server clock; a nonce is remembered at least
# that long (twice, to cover a clock step on either side).
CLOCK_SKEW_S = 300
NONCE_RETENTION_S = 2 * CLOCK_SKEW_S

# The city's fixed UTC offset (cardsvc/localtime.py): UTC+8 for Chongqing. A card's expiry date is local.
UTC_OFFSET_MINUTES = 480
UTC_OFFSET_MINUTES_RANGE = (-12 * 60, 14 * 60)

# Electronic social security card codes refresh about every 60 s and are valid at most that long.
ECARD_CODE_LIFETIME_S = 60
# A card's INTERNAL AUTHENTICATE answer is accepted this long after the terminal stamped its challenge.
CARD_CHALLENGE_AGE_S = 60
# Single-use records of codes and card challenges are kept past every credential lifetime.
CREDENTIAL_USE_RETENTION_S = 2 * CLOCK_SKEW_S

TEMP_LOSS_DAYS = 15
KEY_ROTATION_OVERLAP_S = 7 * 24 * 3600
KEY_CACHE_REFRESH_S = 60.0
SWEEP_INTERVAL_S = 30.0
SWEEP_INTERVAL_S_MAX = 300.0  # the maintenance alert needs five rounds in half an hour
# A tap batch that leaves a card with an open journey or a held exit falling due within this of its own
# clock (a gate's upload hours after the ride) hands the card to the journey sweep directly: the sweep may
# have read that time's journal already (cardsvc/transit/sweep.py). Covers the batch's own duration and
# the clocks of two hosts.
SWEEP_BEHIND_MARGIN_S = CLOCK_SKEW_S

HOTLIST_BLOCK_ENTRIES_DEFAULT = 1000
HOTLIST_BLOCK_ENTRIES_MAX = 10_000
AUDIT_PAGE_ROWS_MAX = 500

# Micro-batcher: coalesce concurrent writes of one kind into one set-based statement.
BATCH_ITEMS_MAX = 256
BATCH_WAIT_MS_MAX = 2.0
BATCH_QUEUE_ITEMS_MAX = 8192

# Transit purse (parameters of the scheme).
PURSE_OVERDRAFT_FEN = 0
PURSE_BALANCE_MAX_FEN = 100_000
# A terminal transaction's answer is kept this long for retries with the same terminal sequence.
TERMINAL_TXN_RETENTION_DAYS = 7
# Ride-code certificates: validity, and the post-paid credit a gate may extend on one.
RIDE_CERT_DAYS = 30
RIDE_CREDIT_LIMIT_FEN = 2_000
RIDE_MAX_FARE_FEN = 1_000
# An uploaded offline record or ride-code ride older than this is refused (the journal's monthly
# partitions cover it; ride-code uses are remembered this long so a code cannot be charged twice).
UPLOAD_AGE_S_MAX = 30 * 86400

# SM2 verification costs ~0.4 ms: it runs on a small thread pool, off the event loop.
SIGNATURE_THREADS_MAX = 2
