"""The model owner's registry (SQLite, WAL): data owners, issued bundles, uploads and adapters.

Every write commits before the caller acknowledges anything, with synchronous=FULL, so a crash
loses nothing that was acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offsite.errors import OffsiteError

SCHEMA_VERSION = 3
# schema version -> the statements that bring a registry of that version to the next one
_MIGRATIONS = {1: "ALTER TABLE uploads ADD COLUMN touched REAL NOT NULL DEFAULT 0",
               2: "ALTER TABLE federation_members ADD COLUMN note TEXT NOT NULL DEFAULT ''"}  # fmt: skip
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS data_owners (
    name TEXT PRIMARY KEY, cert_sha256 TEXT NOT NULL, signing_key TEXT NOT NULL,
    enrolled_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS bundles (
    bundle_id TEXT PRIMARY KEY, data_owner TEXT NOT NULL REFERENCES data_owners(name),
    name TEXT NOT NULL, path TEXT NOT NULL, model TEXT NOT NULL, files TEXT NOT NULL, issued_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (
    upload_id TEXT PRIMARY KEY, data_owner TEXT NOT NULL, bundle_id TEXT NOT NULL,
    files TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL, touched REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS adapters (
    adapter_id TEXT PRIMARY KEY, upload_id TEXT NOT NULL, data_owner TEXT NOT NULL, bundle_id TEXT NOT NULL,
    path TEXT NOT NULL, status TEXT NOT NULL, reason TEXT NOT NULL, received_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS federations (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, round INTEGER NOT NULL, round_started REAL NOT NULL,
    state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS federation_members (
    federation TEXT NOT NULL, round INTEGER NOT NULL, data_owner TEXT NOT NULL, bundle_id TEXT NOT NULL,
    status TEXT NOT NULL, adapter_id TEXT, tokens INTEGER, note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (federation, round, data_owner));
"""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class DataOwner:
    name: str
    cert_sha256: str
    signing_key: str  # PEM of the data owner's Ed25519 public key
    enrolled_at: str
    revoked_at: str | None


class Registry:
    """Thread-safe access to the registry database (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        version = int(self._one("SELECT value FROM meta WHERE key='schema_version'")["value"])
        while version in _MIGRATIONS:
            with self._lock:
                try:
                    self._db.execute(_MIGRATIONS[version])
                except sqlite3.OperationalError as e:  # a table created new already has the column
                    if "duplicate column" not in str(e):
                        raise
                version += 1
                self._db.execute(
                    "UPDATE meta SET value=? WHERE key='schema_version'", (str(version),)
                )
        if version != SCHEMA_VERSION:
            raise OffsiteError(
                f"{path}: registry schema {version} is not supported (this tool uses {SCHEMA_VERSION})"
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # data owners
    def add_data_owner(self, name: str, cert_sha256: str, signing_key: str) -> None:
        try:
            self._run(
                "INSERT INTO data_owners VALUES (?, ?, ?, ?, NULL)",
                (name, cert_sha256, signing_key, now()),
            )
        except sqlite3.IntegrityError:
            raise OffsiteError(
                f"data owner {name!r} is already enrolled; pick another `name` or revoke it first"
            ) from None

    def data_owner(self, name: str) -> DataOwner | None:
        row = self._one("SELECT * FROM data_owners WHERE name=?", (name,))
        return DataOwner(**dict(row)) if row else None

    def data_owners(self) -> list[DataOwner]:
        return [DataOwner(**dict(r)) for r in self._all("SELECT * FROM data_owners ORDER BY name")]

    def revoke(self, name: str) -> None:
        if (
            self._run(
                "UPDATE data_owners SET revoked_at=? WHERE name=? AND revoked_at IS NULL",
                (now(), name),
            ).rowcount
            == 0
        ):
            raise OffsiteError(f"no active data owner named {name!r}")

    # bundles
    def add_bundle(
        self, bundle_id: str, data_owner: str, name: str, path: str, model: str, files: list[dict]
    ) -> None:
        self._run("INSERT OR REPLACE INTO bundles VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (bundle_id, data_owner, name, path, model, json.dumps(files), now()))  # fmt: skip

    def bundle(self, bundle_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM bundles WHERE bundle_id=?", (bundle_id,))
        return {**dict(row), "files": json.loads(row["files"])} if row else None

    def bundles_for(self, data_owner: str) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT * FROM bundles WHERE data_owner=? ORDER BY issued_at, rowid", (data_owner,)
        )
        return [{**dict(r), "files": json.loads(r["files"])} for r in rows]

    # uploads
    def open_upload(
        self, upload_id: str, data_owner: str, bundle_id: str, files: list[dict]
    ) -> dict[str, Any]:
        """Create the upload record, or return the existing one (a client resuming)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO uploads VALUES (?, ?, ?, ?, 'open', ?, ?)",
                             (upload_id, data_owner, bundle_id, json.dumps(files), now(), time.time()))  # fmt: skip
        return self.upload(upload_id)

    def upload(self, upload_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM uploads WHERE upload_id=?", (upload_id,))
        return {**dict(row), "files": json.loads(row["files"])} if row else None

    def uploads_in_state(self, state: str) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM uploads WHERE state=? ORDER BY created_at", (state,))
        return [{**dict(r), "files": json.loads(r["files"])} for r in rows]

    def touch_upload(self, upload_id: str) -> None:
        """Record activity on an upload (stale open uploads expire)."""
        self._run("UPDATE uploads SET touched=? WHERE upload_id=?", (time.time(), upload_id))

    def set_upload_state(self, upload_id: str, state: str) -> None:
        self._run("UPDATE uploads SET state=? WHERE upload_id=?", (state, upload_id))

    # adapters
    def add_adapter(
        self,
        adapter_id: str,
        upload_id: str,
        data_owner: str,
        bundle_id: str,
        path: str,
        status: str,
        reason: str,
    ) -> None:
        # INSERT, never REPLACE: a recorded adapter (verified or rejected) is never overwritten
        self._run("INSERT OR IGNORE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (adapter_id, upload_id, data_owner, bundle_id, path, status, reason, now()))  # fmt: skip

    def adapter(self, adapter_id: str) -> dict[str, Any] | None:
        rows = self._all("SELECT * FROM adapters WHERE adapter_id LIKE ? || '%'", (adapter_id,))
        if len(rows) > 1:
            raise OffsiteError(f"adapter id {adapter_id!r} is ambiguous; give more characters")
        return dict(rows[0]) if rows else None

    def adapter_exact(self, adapter_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM adapters WHERE adapter_id=?", (adapter_id,))
        return dict(row) if row else None

    def adapters(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._all("SELECT * FROM adapters ORDER BY received_at")]

    # federations (rounds over several data owners; additive tables, created on open)
    def add_federation(self, name: str, spec: dict, started: float) -> None:
        self._run(
            "INSERT INTO federations VALUES (?, ?, 0, ?, 'running')",
            (name, json.dumps(spec), started),
        )

    def federation(self, name: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM federations WHERE name=?", (name,))
        return {**dict(row), "spec": json.loads(row["spec"])} if row else None

    def set_federation_spec(self, name: str, spec: dict) -> None:
        self._run("UPDATE federations SET spec=? WHERE name=?", (json.dumps(spec), name))

    def set_federation(self, name: str, round_: int, started: float, state: str) -> None:
        self._run("UPDATE federations SET round=?, round_started=?, state=? WHERE name=?",
                  (round_, started, state, name))  # fmt: skip

    def add_member_round(
        self, federation: str, round_: int, data_owner: str, bundle_id: str
    ) -> None:
        self._run("INSERT OR IGNORE INTO federation_members VALUES (?, ?, ?, ?, 'issued', NULL, NULL, '')",
                  (federation, round_, data_owner, bundle_id))  # fmt: skip

    def member_rounds(self, federation: str, round_: int) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM federation_members WHERE federation=? AND round=? ORDER BY data_owner",
                         (federation, round_))  # fmt: skip
        return [dict(r) for r in rows]

    def set_member_round(self, federation: str, round_: int, data_owner: str, status: str,
                         adapter_id: str | None = None, tokens: int | None = None) -> None:  # fmt: skip
        self._run("UPDATE federation_members SET status=?, adapter_id=?, tokens=? "
                  "WHERE federation=? AND round=? AND data_owner=?",
                  (status, adapter_id, tokens, federation, round_, data_owner))  # fmt: skip

    def note_member_round(self, federation: str, round_: int, data_owner: str, note: str) -> None:
        """Why a member's adapter did not count this round (kept beside its status)."""
        self._run("UPDATE federation_members SET note=? WHERE federation=? AND round=? AND data_owner=?",
                  (note, federation, round_, data_owner))  # fmt: skip
