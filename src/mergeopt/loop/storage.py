"""Storage backends: a space file's `storage:` value, or none, to an Optuna storage.

- none: SQLite in the run folder. One node; WAL mode for cheap commits (below).
- `journal` or `journal:PATH`: Optuna's JournalStorage over an append-only file. One driver, on
  one node, or on a shared filesystem, with no database server.
- `postgresql://...` (any SQLAlchemy URL): an RDB server, for studies across nodes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from ..errors import UserError


@dataclass(frozen=True)
class StorageSpec:
    kind: str  # sqlite | journal | rdb
    url: str  # as shown to the user, passwords hidden
    path: Path | None  # the local file (sqlite, journal), else None

    def exists(self) -> bool:
        """Whether the storage may hold a study already (a server always may)."""
        return self.path.exists() if self.path is not None else True


def storage_spec(storage: str | None, run_dir: Path) -> StorageSpec:
    if not storage:
        return StorageSpec("sqlite", f"sqlite:///{run_dir / 'study.db'}", run_dir / "study.db")
    if storage == "journal" or storage.startswith("journal:"):
        rest = storage.partition(":")[2] or "study.journal"
        path = Path(rest).expanduser()
        path = path if path.is_absolute() else run_dir / path
        return StorageSpec("journal", f"journal:{path}", path)
    if storage.startswith("sqlite:///"):
        return StorageSpec("sqlite", storage, Path(storage[len("sqlite:///"):]))
    if "://" not in storage:
        raise UserError(f"storage: cannot read {storage!r}; expected journal, journal:PATH, or a database URL "
                        "such as postgresql://user@host/dbname")
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(storage).render_as_string(hide_password=True)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's parse errors have no common base
        raise UserError(f"storage: cannot read the database URL {storage!r} ({e})") from None
    return StorageSpec("rdb", shown, None)


def open_storage(storage: str | None, run_dir: Path) -> optuna.storages.BaseStorage:
    spec = storage_spec(storage, run_dir)
    if spec.kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        spec.path.parent.mkdir(parents=True, exist_ok=True)
        # the open(O_EXCL) lock works on network filesystems, where the symlink lock may not
        return optuna.storages.JournalStorage(JournalFileBackend(str(spec.path), JournalFileOpenLock(str(spec.path))))
    if spec.kind == "sqlite":
        return sqlite_storage(spec.url)
    try:
        return rdb_storage(storage)
    except ImportError:
        raise UserError(f"storage: {spec.url} needs its database driver, which is not installed; "
                        "pip install 'mergeopt[postgres]' for PostgreSQL (psycopg 3)") from None
    except Exception as e:  # noqa: BLE001 - a server that refuses us: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"storage: cannot open {spec.url}: {first}") from None


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """A database server, with Optuna's trial heartbeat on: the driver beats for every trial in flight
    (loop.lease), and a study resumed after its driver's node vanished fails the trials whose beat
    stopped and enqueues each again, with its seed, through Optuna's own retry callback."""
    import warnings

    from .lease import BEAT_S, STALE_S
    from .store import MAX_RETRIES

    with warnings.catch_warnings():  # experimental (not deprecated) since Optuna 2.8: the feature is the point
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=int(BEAT_S), grace_period=int(STALE_S),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))


def clear_stale_lock(storage: str | None, run_dir: Path) -> bool:
    """A journal's lock file left by a driver killed while it wrote: removed at once when this driver has
    taken the study's lease from a dead one (no other process writes the journal), instead of Optuna
    waiting out its grace period with warnings."""
    spec = storage_spec(storage, run_dir)
    if spec.kind != "journal":
        return False
    lock = Path(f"{spec.path}.lock")  # JournalFileOpenLock's file, made with O_EXCL while it writes
    if lock.exists():
        lock.unlink(missing_ok=True)
        return True
    return False


def sqlite_storage(url: str) -> optuna.storages.RDBStorage:
    """SQLite in write-ahead-log mode with `synchronous=NORMAL`: a commit no longer waits for two disk
    syncs (1.4-2.0x less driver time per trial, `bench/driver_overhead.py`), and a killed process still
    loses no committed trial (only a power cut can undo the last commits). WAL needs a local disk:
    on a shared cluster filesystem use `storage: journal` or a database server instead."""
    import sqlalchemy

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    @sqlalchemy.event.listens_for(storage.engine, "connect")
    def _pragmas(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    storage.engine.dispose()  # connections opened before the hook get the pragmas on reconnect
    return storage
