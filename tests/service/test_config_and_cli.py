"""Settings and the operator's commands: a value that would break the service is refused with a message
that names it, and a command's mistake is one line, not a traceback (nor a half-done change)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import pytest

from cardsvc import cli
from cardsvc.config import ConfigError, Settings, load_settings
from cardsvc.security.keys import KeyFileError, KeyRing
from tests.helpers import ServiceHarness


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CARDSVC_REQUEST_TIMEOUT_S": "nan"}, "REQUEST_TIMEOUT_S"),  # every request answered 500
        ({"CARDSVC_REQUEST_TIMEOUT_S": "inf"}, "REQUEST_TIMEOUT_S"),
        ({"CARDSVC_SWEEP_INTERVAL_S": "0"}, "SWEEP_INTERVAL_S"),  # maintenance in a busy loop
        ({"CARDSVC_KEY_CACHE_REFRESH_S": "0"}, "KEY_CACHE_REFRESH_S"),  # terminal reloads in a busy loop
        ({"CARDSVC_SHUTDOWN_GRACE_S": "-3"}, "SHUTDOWN_GRACE_S"),
        ({"CARDSVC_PURSE_OVERDRAFT_FEN": "-100"}, "PURSE_OVERDRAFT_FEN"),
        ({"CARDSVC_RIDE_MAX_FARE_FEN": "-1"}, "RIDE_MAX_FARE_FEN"),
        ({"CARDSVC_LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),  # serve died with a traceback
        ({"CARDSVC_DATA_DIR": ""}, "DATA_DIR"),  # became None: a traceback
        ({"CARDSVC_DB_POOL_MAX": "1", "CARDSVC_DB_POOL_MIN": "1"}, "DB_POOL_MAX"),  # the listener takes it
        # Values past what a date or a wire field holds: 500 on the first request using them.
        ({"CARDSVC_TEMP_LOSS_DAYS": "10000000"}, "TEMP_LOSS_DAYS"),  # the loss's end past the year 9999
        ({"CARDSVC_RIDE_CERT_DAYS": "100000"}, "RIDE_CERT_DAYS"),  # valid_to past the certificate's u32
        ({"CARDSVC_RIDE_CREDIT_LIMIT_FEN": str(2**32)}, "RIDE_CREDIT_LIMIT_FEN"),
        ({"CARDSVC_PURSE_BALANCE_MAX_FEN": str(2**63)}, "PURSE_BALANCE_MAX_FEN"),  # past bigint
        ({"CARDSVC_CLOCK_SKEW_S": "86400"}, "CLOCK_SKEW_S"),  # a signed request replayable for a day
    ],
)
def test_a_setting_that_would_break_the_service_is_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(environ=env)


def test_each_setting_may_be_set_to_its_upper_bound() -> None:
    """The bounds refuse only what cannot work; a city's longest reasonable values load."""
    from cardsvc import config as config_mod

    at_bound = {f"CARDSVC_{name.upper()}": str(most) for name, (most, _) in config_mod._MOST.items()}
    s = load_settings(environ=at_bound)
    assert (s.temp_loss_days, s.ride_cert_days, s.clock_skew_s) == (366, 366, 3600)
    assert s.ride_credit_limit_fen == 2**32 - 1


@pytest.mark.parametrize("level", ["DEBUG", "warn", "WARNING", "FATAL", "notset"])
def test_python_level_names_are_log_levels(level: str) -> None:
    assert load_settings(environ={"CARDSVC_LOG_LEVEL": level}).log_level == level


def test_settings_at_the_top_and_under_the_section_are_not_mixed(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.toml"
    mixed.write_text("port = 9000\n[cardsvc]\nworkers = 3\n")
    with pytest.raises(ConfigError, match="not both"):  # `port` was silently dropped
        load_settings(environ={}, config_file=mixed)
    section = tmp_path / "section.toml"
    section.write_text("[cardsvc]\nport = 9000\nworkers = 3\n")
    assert (load_settings(environ={}, config_file=section).port, Settings().port) == (9000, 8080)


def test_a_cardsvc_key_that_is_not_a_table_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file whose `cardsvc` key is a value, not a table, ended in an AttributeError traceback; it is a
    configuration error (one line, exit status 2)."""
    path = tmp_path / "cardsvc.toml"
    path.write_text("cardsvc = 5\n")
    with pytest.raises(ConfigError, match="must be a table"):
        load_settings(environ={}, config_file=path)
    path.write_text('cardsvc = "production"\n')
    assert cli.main(["--config", str(path), "config"]) == 2
    assert "configuration error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line", ['data_dir = ["/srv/cardsvc"]', 'host = ["0.0.0.0"]', 'fare_table = { path = "/etc/cardsvc/fares.toml" }']
)
def test_a_list_or_table_for_a_setting_is_refused(tmp_path: Path, line: str) -> None:
    """Every TOML value was read as its text: `data_dir = ["/srv/cardsvc"]` became the directory
    "['/srv/cardsvc']" under the working directory, where the embedded database would have been made."""
    path = tmp_path / "cardsvc.toml"
    path.write_text(f"[cardsvc]\n{line}\n")
    with pytest.raises(ConfigError, match=line.split("=")[0].strip().upper()):
        load_settings(environ={}, config_file=path)


def test_the_configuration_shown_masks_a_password_wherever_the_url_has_it() -> None:
    for url in ("postgresql://u:topsecret@h/db", "postgresql://h/db?user=u&password=topsecret&sslmode=require"):
        shown = load_settings(environ={"CARDSVC_DATABASE_URL": url}).public_dict()["database_url"]
        assert "topsecret" not in shown and "***" in shown, shown


def test_a_database_url_the_driver_cannot_read_is_refused_at_start() -> None:
    for url in ("postgresql://u:p@h/db", "postgres://h:5432/db", "postgresql://postgres@/cardsvc?host=/run/pg&port=5432",
                "postgresql://u@[::1]:5433/db", "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write"):  # fmt: skip
        assert load_settings(environ={"CARDSVC_DATABASE_URL": url}).database_url == url
    with pytest.raises(ConfigError, match="CARDSVC_HOST is empty"):  # not silently every interface
        load_settings(environ={"CARDSVC_HOST": ""})
    # (A port is not quoted: a password pasted unencoded lands there, tests/service/test_operator_mistakes.py.)
    for url, problem in (("postgresql://u@h:54x2/db", "port is not a number"), ("mysql://u@h/db", "postgresql://"),
                         ("h:5432/db", "postgresql://"), ("postgresql://u@h1:5432,h2:x/db", "port is not a number")):  # fmt: skip
        with pytest.raises(ConfigError, match=problem):
            load_settings(environ={"CARDSVC_DATABASE_URL": url})


def test_the_missing_key_file_message_names_a_command_that_exists(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError) as refused:
        KeyRing.load(tmp_path / "nokeys.json")
    command = str(refused.value).split("`")[1].split()
    assert command[0] == "cardsvc"
    cli.build_parser().parse_args(command[1:])  # no SystemExit: the command exists


def test_a_key_file_others_can_read_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.json"
    KeyRing.generate().write(path)
    KeyRing.load(path)
    assert not caplog.records
    os.chmod(path, 0o644)
    KeyRing.load(path)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


def test_a_bad_fare_table_and_bad_arguments_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "table.toml"
    bad.write_text("version = \n")
    monkeypatch.setenv("CARDSVC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CARDSVC_FARE_TABLE", str(bad))
    KeyRing.generate().write(tmp_path / "keys.json")
    assert cli.main(["demo-credential", "tap", "--index", "9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fare table error:") and "Traceback" not in err and err.count("\n") == 1, err
    for args in (["demo-credential", "ecard-code", "--index", "-1"], ["demo-data", "--cards", "-5"]):
        with pytest.raises(SystemExit) as stopped:
            cli.main(args)
        assert stopped.value.code == 2  # argparse's usage error
        assert "must be" in capsys.readouterr().err


async def test_terminal_commands_refuse_mistakes_before_changing_anything(
    db_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CARDSVC_DATABASE_URL", db_dsn)
    monkeypatch.setenv("CARDSVC_KEY_FILE", str(tmp_path / "keys.json"))
    KeyRing.generate().write(tmp_path / "keys.json")
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    async def run(args: list[str]) -> int:
        return await asyncio.to_thread(cli.main, args)  # the commands run their own event loop

    conn = await asyncpg.connect(db_dsn)
    try:
        # The output file cannot be created: the terminal is not registered (its secret would be lost).
        with pytest.raises(SystemExit, match="cannot create"):
            await run(["terminal", "add", "T-CLI-1", "--kind", "transit_validator", "--org", "bus", "--output", str(taken)])
        assert await conn.fetchval("SELECT count(*) FROM terminal WHERE terminal_id = 'T-CLI-1'") == 0
        assert taken.read_text() == "{}"
        for args in (["terminal", "add", "--kind", "transit_validator", "--org", "bus"], ["terminal", "disable"],
                     ["terminal", "add", "T-CLI-2", "--kind", "transit_validator"]):  # fmt: skip
            with pytest.raises(SystemExit, match="needs"):
                await run(args)
        # Done right: registered, the file written once, and a key rotation keeps the old key for the
        # configured overlap.
        out = tmp_path / "t1.json"
        assert await run(["terminal", "add", "T-CLI-1", "--kind", "transit_validator", "--org", "bus", "--output", str(out)]) == 0
        assert out.stat().st_mode & 0o777 == 0o600 and "T-CLI-1" in out.read_text()
        # A key id no request could carry is refused before the working key is given an end.
        bad_out = tmp_path / "bad.json"
        assert await run(["terminal", "rotate-key", "T-CLI-1", "--key-id", "k 2", "--output", str(bad_out)]) == 1
        assert "key id is 1-16 characters" in capsys.readouterr().err
        assert not bad_out.exists()
        assert await conn.fetchval("SELECT count(*) FROM terminal_key WHERE terminal_id = 'T-CLI-1' AND not_after IS NULL") == 1
        monkeypatch.setenv("CARDSVC_KEY_ROTATION_OVERLAP_S", "3600")
        assert await run(["terminal", "rotate-key", "T-CLI-1", "--key-id", "k2", "--output", str(tmp_path / "t2.json")]) == 0
        overlap = await conn.fetchval(
            """SELECT extract(epoch FROM k1.not_after - k2.created_at) FROM terminal_key k1, terminal_key k2
               WHERE k1.terminal_id = 'T-CLI-1' AND k1.key_id = 'k1' AND k2.terminal_id = 'T-CLI-1' AND k2.key_id = 'k2'"""
        )
        assert abs(float(overlap) - 3600) < 60, overlap
        capsys.readouterr()
        # An unknown operator is not cleared (it used to get a clearing file of its own).
        assert await run(["clearing", "run", "--date", "2026-01-05", "--operator", "nope"]) == 1
        assert "no operator 'nope'" in capsys.readouterr().err
    finally:
        await conn.close()


async def test_card_commands_read_a_card_number_as_the_api_does(
    svc: ServiceHarness, db: asyncpg.Connection, db_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The API upper-cases a card number typed in lowercase; `cardsvc card` passed it as typed, so a clerk's
    `cardsvc card lock-pin t00000042` answered `not_found`. A malformed one is an argument error."""
    c = await svc.new_card()
    monkeypatch.setenv("CARDSVC_DATABASE_URL", db_dsn)
    monkeypatch.setenv("CARDSVC_DATA_DIR", str(tmp_path))
    rc = await asyncio.to_thread(cli.main, ["card", "lock-pin", c["card_no"].lower(), "--operator", "clerk-7"])
    assert rc == 0, capsys.readouterr().err
    assert await db.fetchval("SELECT pin_locked FROM card WHERE card_no = $1", c["card_no"]) is True
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(cli.main, ["card", "show", "T-0000042"])
    assert exited.value.code == 2 and "card number" in capsys.readouterr().err
