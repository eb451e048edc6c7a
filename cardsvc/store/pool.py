"""The asyncpg pool: explicit sizes and timeouts, no per-release reset query (our connections carry no
session state, and asyncpg's default reset costs a round trip per request), and the errors that mean
"the database is unreachable" in one place."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import orjson

from cardsvc.config import Settings

__all__ = ["DB_UNAVAILABLE_ERRORS", "create_pool", "init_connection", "resolve_dsn"]

log = logging.getLogger("cardsvc.store")

DB_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # A connection whose server session ended (pg_terminate_backend, a failover, a cut network) can be
    # handed out in the moment between the server's last message and the socket's close: asyncpg then
    # raises "cannot switch to state …; another operation is in progress" (MagicStack/asyncpg#1069). The
    # operation did not reach the server; the socket's close discards the connection.
    asyncpg.InternalClientError,
)


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb as Python objects (orjson); statements never wait forever on a stuck row lock; a commit is
    durable before the service answers (a server or database configured with `synchronous_commit = off`
    would lose the last answered transactions in a crash; `local`, `remote_write` and the others are kept)."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="text",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
    )
    await conn.execute(
        "SET lock_timeout = '3s'; SET idle_in_transaction_session_timeout = '30s'; "
        "SELECT set_config('synchronous_commit', 'on', false) WHERE current_setting('synchronous_commit') = 'off'"
    )


async def create_pool(dsn: str, settings: Settings) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_connect_timeout_s,
        command_timeout=settings.db_command_timeout_s,
        max_inactive_connection_lifetime=300.0,
        reset=_no_reset,
        init=init_connection,
        server_settings={"application_name": "cardsvc"},
    )
    assert pool is not None
    return pool


def resolve_dsn(settings: Settings) -> str:
    """The database URL: CARDSVC_DATABASE_URL, or the embedded server's (started if needed)."""
    if settings.database_url:
        return settings.database_url
    from .embedded import EmbeddedPostgres

    return EmbeddedPostgres(settings.pg_data_dir).start()
