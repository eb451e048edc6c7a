"""Configuration: defaults from `cardsvc.limits`, then an optional TOML file, then CARDSVC_* variables.

Precedence (last wins): built-in defaults < file named by CARDSVC_CONFIG (or --config) < environment.
Every field is documented in docs/configuration.md; `cardsvc config` prints the effective values
(secrets are never part of Settings: they live in the key file, see `cardsvc.security.keys`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cardsvc import limits
from protocols import ridecode, transit

__all__ = ["ConfigError", "Settings", "load_settings"]

ENV_PREFIX = "CARDSVC_"


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the setting."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # Empty: start (or reuse) the embedded PostgreSQL in data_dir/pg.
    database_url: str = ""
    data_dir: Path = Path(".data")
    # Default: data_dir/keys.json (created on first start of the embedded default only).
    key_file: Path | None = None
    log_level: str = "INFO"
    log_format: str = "json"
    # Access log lines: "all" requests, only "errors" (status >= 400 or slower than 1 s), or "off".
    access_log: str = "errors"

    body_bytes_max: int = limits.BODY_BYTES_MAX
    request_timeout_s: float = limits.REQUEST_TIMEOUT_S
    shutdown_grace_s: float = limits.SHUTDOWN_GRACE_S
    db_pool_min: int = limits.DB_POOL_MIN
    db_pool_max: int = limits.DB_POOL_MAX
    db_connect_timeout_s: float = limits.DB_CONNECT_TIMEOUT_S
    db_command_timeout_s: float = limits.DB_COMMAND_TIMEOUT_S
    clock_skew_s: int = limits.CLOCK_SKEW_S
    # The city's local time (cardsvc/localtime.py): card expiry dates; must equal the fare table's.
    utc_offset_minutes: int = limits.UTC_OFFSET_MINUTES
    ecard_code_lifetime_s: int = limits.ECARD_CODE_LIFETIME_S
    card_challenge_age_s: int = limits.CARD_CHALLENGE_AGE_S
    temp_loss_days: int = limits.TEMP_LOSS_DAYS
    key_rotation_overlap_s: int = limits.KEY_ROTATION_OVERLAP_S
    key_cache_refresh_s: float = limits.KEY_CACHE_REFRESH_S
    sweep_interval_s: float = limits.SWEEP_INTERVAL_S
    hotlist_block_entries_max: int = limits.HOTLIST_BLOCK_ENTRIES_MAX
    batch_items_max: int = limits.BATCH_ITEMS_MAX
    batch_wait_ms_max: float = limits.BATCH_WAIT_MS_MAX
    signature_threads_max: int = limits.SIGNATURE_THREADS_MAX
    # Transit. Empty fare_table: the demo table shipped with cardsvc (cardsvc/transit/tables).
    fare_table: Path | None = None
    purse_overdraft_fen: int = limits.PURSE_OVERDRAFT_FEN
    purse_balance_max_fen: int = limits.PURSE_BALANCE_MAX_FEN
    terminal_txn_retention_days: int = limits.TERMINAL_TXN_RETENTION_DAYS
    ride_cert_days: int = limits.RIDE_CERT_DAYS
    ride_credit_limit_fen: int = limits.RIDE_CREDIT_LIMIT_FEN
    ride_max_fare_fen: int = limits.RIDE_MAX_FARE_FEN

    @property
    def embedded(self) -> bool:
        return not self.database_url

    @property
    def key_path(self) -> Path:
        return self.key_file if self.key_file is not None else self.data_dir / "keys.json"

    @property
    def pg_data_dir(self) -> Path:
        return self.data_dir / "pg"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """The effective settings, for `cardsvc config`; the database password is masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "database_url" and value:
                value = _mask_password(value)
            if f.name == "key_file":
                value = self.key_path  # the one used, default included
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


_SECRET_PARAMS = ("password", "sslpassword")


def _mask_password(url: str) -> str:
    """The URL with its secrets shown as ***: the password in the user part, and the `password=` and
    `sslpassword=` (the client key's passphrase) parameters, their names percent-decoded as the driver
    reads them."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest.split("?", 1)[0]:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in creds else rest
    path, qsep, query = rest.partition("?")
    if qsep:
        query = "&".join(
            f"{p.split('=', 1)[0]}=***" if unquote(p.split("=", 1)[0]).lower() in _SECRET_PARAMS else p
            for p in query.split("&")
        )
    return f"{scheme}://{path}{qsep}{query}"


def _coerce(name: str, raw: Any, target: Any) -> Any:
    kind = target if isinstance(target, type) else None
    if not isinstance(raw, str | int | float):  # a config file's array, table or date: no setting takes one
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: cannot read a TOML {type(raw).__name__} as {target}")
    text = str(raw).strip()
    try:
        if kind is bool or target == "bool":
            if isinstance(raw, bool):
                return raw
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if target in (int, "int"):
            if isinstance(raw, bool):
                raise ValueError(text)
            return int(text)
        if target in (float, "float"):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        if target == "Path":  # a setting that must name a directory or file
            if not text:
                raise ValueError(text)
            return Path(text).expanduser()
        if target == "Path | None":
            return Path(text).expanduser() if text else None
        return text
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: cannot read {text!r} as {target}") from None


# Upper bounds, each with what a larger value would do: most would overflow a date, a wire field or a
# database column on the first request that uses them (a temporary loss ending in the year 30000 is a 500 on
# every loss report), the others would keep a forged or replayed credential usable for longer than any
# terminal needs.
_MOST: dict[str, tuple[int, str]] = {
    "clock_skew_s": (3600, "a signed request or credential older than that is a replay window, not a clock"),
    "ecard_code_lifetime_s": (3600, "an e-card code is shown for seconds; a long life is a replay window"),
    "card_challenge_age_s": (3600, "a card's answer is used within seconds; a long age is a replay window"),
    "temp_loss_days": (366, "a temporary loss longer than a year is a loss report"),
    "ride_cert_days": (366, "a ride-code certificate is renewed while the app is used"),
    "terminal_txn_retention_days": (3660, "answers kept for retries, not an archive: the journal is that"),
    "key_rotation_overlap_s": (366 * 86400, "an old terminal key accepted for over a year is not rotated"),
    "purse_balance_max_fen": (transit.BALANCE_FEN_MAX, "the card's purse balance is an unsigned 32-bit field"),
    "purse_overdraft_fen": (transit.BALANCE_FEN_MAX, "the card's purse balance is an unsigned 32-bit field"),
    "ride_credit_limit_fen": (ridecode.FEN_MAX, "the ride-code certificate's field is 32 bits"),
    "ride_max_fare_fen": (ridecode.FEN_MAX, "the ride-code certificate's field is 32 bits"),
}


def _validate(s: Settings) -> None:
    positive = [
        "body_bytes_max",
        "request_timeout_s",
        "db_pool_max",
        "db_connect_timeout_s",
        "db_command_timeout_s",
        "clock_skew_s",
        "ecard_code_lifetime_s",
        "card_challenge_age_s",
        "temp_loss_days",
        "hotlist_block_entries_max",
        "batch_items_max",
        "workers",
        "signature_threads_max",
        "purse_balance_max_fen",
        "terminal_txn_retention_days",
        "ride_cert_days",
        "shutdown_grace_s",
        "sweep_interval_s",
        "key_cache_refresh_s",
    ]
    for name in positive:
        if getattr(s, name) <= 0:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be > 0")
    for name in ("purse_overdraft_fen", "ride_credit_limit_fen", "ride_max_fare_fen", "key_rotation_overlap_s"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be >= 0")
    for name, (most, why) in _MOST.items():
        if getattr(s, name) > most:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be at most {most} ({why})")
    if s.db_pool_max < 2:  # one connection listens for terminal changes; requests need at least one more
        raise ConfigError("CARDSVC_DB_POOL_MAX must be >= 2")
    if s.db_pool_min < 0 or s.db_pool_min > s.db_pool_max:
        raise ConfigError("CARDSVC_DB_POOL_MIN must be between 0 and CARDSVC_DB_POOL_MAX")
    if s.log_level.upper() not in logging.getLevelNamesMapping():
        raise ConfigError(f"CARDSVC_LOG_LEVEL must be one of {', '.join(logging.getLevelNamesMapping())}")
    if not s.host.strip():
        # aiohttp would listen on every interface: say so explicitly (0.0.0.0), never by an empty value.
        raise ConfigError("CARDSVC_HOST is empty: leave it unset (127.0.0.1) or name the address, 0.0.0.0 for all")
    if not 0 < s.port < 65536:
        raise ConfigError("CARDSVC_PORT must be between 1 and 65535")
    if s.access_log not in ("all", "errors", "off"):
        raise ConfigError("CARDSVC_ACCESS_LOG must be all, errors or off")
    if s.log_format not in ("json", "text"):
        raise ConfigError("CARDSVC_LOG_FORMAT must be json or text")
    if s.sweep_interval_s > limits.SWEEP_INTERVAL_S_MAX:
        # The maintenance alert counts failed rounds in half an hour (deploy/prometheus: five of them).
        raise ConfigError(f"CARDSVC_SWEEP_INTERVAL_S must be at most {limits.SWEEP_INTERVAL_S_MAX}")
    if s.batch_wait_ms_max < 0:
        raise ConfigError("CARDSVC_BATCH_WAIT_MS_MAX must be >= 0")
    if s.database_url:
        _check_database_url(s.database_url)
    lo, hi = limits.UTC_OFFSET_MINUTES_RANGE
    if not lo <= s.utc_offset_minutes <= hi:
        raise ConfigError(f"CARDSVC_UTC_OFFSET_MINUTES must be between {lo} and {hi}")


def _check_database_url(url: str) -> None:
    """A libpq-style URL asyncpg can read: the scheme, and each host's port (several hosts: h1:5432,h2) a number.
    Checked at start: the driver's own parser fails with a bare ValueError at the first connection."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        raise ConfigError("CARDSVC_DATABASE_URL must start with postgresql:// (or postgres://)")
    hosts = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    for host in hosts.split(","):
        port = host.partition("]")[2] if host.startswith("[") else host
        port = port.partition(":")[2]
        if port and not port.isdigit():
            # Not quoted: a password pasted unencoded (holding `/` or `@`) lands here, and this line goes to
            # the journal.
            raise ConfigError(
                "CARDSVC_DATABASE_URL: a host's port is not a number (percent-encode a password's "
                "'/', '@', ':' or '?')"
            )


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: Path | None = None, **overrides: Any
) -> Settings:
    env = os.environ if environ is None else environ
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    path = config_file or (Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        section = data.get("cardsvc", data)
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: cardsvc must be a table ([cardsvc]), not a value")
        if section is not data and len(data) > 1:
            others = ", ".join(sorted(k for k in data if k != "cardsvc"))
            raise ConfigError(f"config file {path}: settings go either at the top or under [cardsvc], not both ({others})")
        for key, raw in section.items():
            if key not in fields:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw, fields[key].type)
    for name, f in fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw, f.type)
    for name, raw in overrides.items():
        if raw is not None:
            values[name] = raw
    settings = Settings(**values)
    _validate(settings)
    return settings
