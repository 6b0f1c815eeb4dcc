"""The model registry in storage: the champion pointer, the history of every nightly decision, and the lock that
keeps two nightly runs from racing.

Layout under the registry root (local folder or ``s3://`` prefix)::

    champion.json          the model in service: checkpoint URI, its holdout metrics, when and why promoted
    history/<time>_<run>.json   one record per nightly run (promoted, kept, nothing new, failed)
    lock.json              held by the running nightly job (owner, expiry)
    data_state.json        the fingerprint of the source data the last completed run saw

Only ``champion.json`` is ever replaced, and only by compare-and-swap against the version a run started from,
so a run killed at any point leaves the previous champion in place, and of two runs racing past the lock only
one can promote.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from dermray import storage
from dermray.errors import DermrayError

CHAMPION = "champion.json"
LOCK = "lock.json"
DATA_STATE = "data_state.json"
HISTORY = "history"


def utc_stamp(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(seconds if seconds is not None else time.time()))


@dataclass
class Lock:
    uri: str
    version: str
    owner: str


@dataclass
class Champion:
    record: dict
    version: str  # the storage version token a promotion must still find


class Registry:
    def __init__(self, root: str):
        self.root = storage.normalize(root)

    def _uri(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # ------------------------------------------------------------------------------------------- lock

    def acquire(self, owner: str, ttl_seconds: float) -> Lock:
        """Take the registry lock, or take over one whose holder's expiry has passed (a killed run);
        raises DermrayError naming the holder otherwise."""
        uri = self._uri(LOCK)
        record = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                  "acquired_at": time.time(), "expires_at": time.time() + ttl_seconds}
        body = json.dumps(record).encode()
        for _ in range(3):
            current, version = storage.read_versioned(uri)
            if current is not None:
                held = json.loads(current)
                if held.get("expires_at", 0) > time.time():
                    raise DermrayError(
                        f"nightly: registry {self.root} is locked by run {held.get('owner')} until "
                        f"{utc_stamp(held['expires_at'])} (another nightly run is in progress; if it was killed, "
                        f"wait for the lock to expire or delete {uri})"
                    )
            if storage.write_if_version(uri, body, version):
                _, new_version = storage.read_versioned(uri)
                return Lock(uri, new_version or "", owner)
        raise DermrayError(f"nightly: could not take the registry lock {uri} (contended)")

    def release(self, lock: Lock) -> None:
        storage.delete_if_version(lock.uri, lock.version)

    # --------------------------------------------------------------------------------------- champion

    def champion(self) -> Champion | None:
        data, version = storage.read_versioned(self._uri(CHAMPION))
        if data is None:
            return None
        return Champion(json.loads(data), version or "")

    def promote(self, record: dict, replacing: Champion | None) -> bool:
        """Make ``record`` the champion if the champion is still ``replacing`` (None: there was none)."""
        body = json.dumps(record, indent=2).encode()
        return storage.write_if_version(self._uri(CHAMPION), body, replacing.version if replacing else None)

    # ------------------------------------------------------------------------------------- history, data

    def record(self, decision: dict) -> str:
        now = time.time()
        # Millisecond stamps keep the history in decision order when listed by name.
        name = f"{utc_stamp(now)}.{int(now * 1000) % 1000:03d}_{decision.get('run', uuid.uuid4().hex[:8])}.json"
        return storage.write_text(self._uri(HISTORY, name), json.dumps(decision, indent=2))

    def history(self) -> list[dict]:
        folder = self._uri(HISTORY)
        if not storage.exists(folder) and not storage.is_dir(folder):
            return []
        return [json.loads(storage.read_text(uri)) for uri in storage.list_files(folder) if uri.endswith(".json")]

    def data_state(self) -> dict | None:
        uri = self._uri(DATA_STATE)
        return json.loads(storage.read_text(uri)) if storage.exists(uri) else None

    def set_data_state(self, state: dict) -> None:
        storage.write_text(self._uri(DATA_STATE), json.dumps(state, indent=2))
