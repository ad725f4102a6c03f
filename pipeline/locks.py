"""Exclusive locks on stage outputs, so that two runs never write one output at the same time.

A lock is a file `<name>.lock` holding its holder's pid, host, start time and a random token. It is
created whole (written under a unique name, then hard-linked into place, which fails if it exists) and
refreshed (its mtime touched) by a heartbeat thread while held. A lock is stale, and taken over, when its
holder ran on this host and its pid is gone, or when nobody refreshed it for `stale_after_s` (a holder on
another host sharing the filesystem, or a reused pid).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pipeline")


class OutputLockedError(RuntimeError):
    """Another live run holds the lock on an output this run would write."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started_at: float  # time.time() when the lock was taken
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"pid {self.pid} on host {self.host} since {since}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def read_lock(path: Path) -> tuple[LockHolder | None, float] | None:
    """(holder, seconds since its last refresh) of the lock file at `path`; None when there is none.
    The holder is None when the file cannot be parsed (it then goes stale by age alone)."""
    try:
        age = time.time() - path.stat().st_mtime
        fields = json.loads(path.read_text())
        holder = LockHolder(int(fields["pid"]), str(fields["host"]), float(fields["started_at"]), str(fields["token"]))
        return holder, age
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None, age


class OutputLocks:
    """Locks `names` (files `<directory>/<name>.lock`) from `__enter__` to `__exit__`, all or none.

    `describe[name]` says what a lock guards, for the message a second run gets."""

    def __init__(self, directory: Path, names: list[str], describe: dict[str, str], stale_after_s: float):
        self.directory = Path(directory)
        self.names = sorted(names)  # one order for every run: two runs never wait on each other's half
        self.describe = describe
        self.stale_after_s = stale_after_s
        self.holder = LockHolder(os.getpid(), socket.gethostname(), time.time(), secrets.token_hex(8))
        self.held: list[Path] = []
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.lock"

    def __enter__(self) -> OutputLocks:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                self._acquire(name)
        except BaseException:
            self.release()
            raise
        self._heartbeat = threading.Thread(target=self._refresh, name="output-locks", daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        for path in self.held:
            current = read_lock(path)
            if current is not None and current[0] is not None and current[0].token == self.holder.token:
                path.unlink(missing_ok=True)
        self.held = []

    def _acquire(self, name: str) -> None:
        path = self.path(name)
        payload = json.dumps({"pid": self.holder.pid, "host": self.holder.host,
                              "started_at": self.holder.started_at, "token": self.holder.token})
        for _ in range(5):  # each round either takes the lock, refuses, or saw it change hands
            if self._create(path, payload):
                self.held.append(path)
                return
            current = read_lock(path)
            if current is None:  # released between the two calls
                continue
            holder, age = current
            if not self._stale(holder, age):
                self._refuse(name, path, holder)
            self._take_over(name, path, holder)
        raise OutputLockedError(f"{self.describe[name]}: its lock {path} changed hands repeatedly; another run is "
                                "starting on the same output, try again")

    def _create(self, path: Path, payload: str) -> bool:
        staged = path.with_name(f"{path.name}.{self.holder.token}.new")
        staged.write_text(payload)
        try:
            os.link(staged, path)
            return True
        except FileExistsError:
            return False
        finally:
            staged.unlink(missing_ok=True)

    def _stale(self, holder: LockHolder | None, age: float) -> bool:
        if age > self.stale_after_s:
            return True
        return holder is not None and holder.host == self.holder.host and not pid_alive(holder.pid)

    def _take_over(self, name: str, path: Path, stale: LockHolder | None) -> None:
        """Move the stale lock aside; if what was moved is not the lock judged stale (it changed hands in
        between), put it back and refuse."""
        aside = path.with_name(f"{path.name}.{self.holder.token}.stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        moved = read_lock(aside)
        moved_holder = moved[0] if moved else None
        if stale is not None and (moved_holder is None or moved_holder.token != stale.token):
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            self._refuse(name, path, moved_holder)
        aside.unlink(missing_ok=True)
        log.warning("took over the stale lock %s (%s)", path, stale.describe() if stale else "unreadable")

    def _refuse(self, name: str, path: Path, holder: LockHolder | None) -> None:
        who = holder.describe() if holder else "an unknown run (unreadable lock file)"
        raise OutputLockedError(
            f"{self.describe.get(name, name)} is in use by another run: {who} (lock {path}); wait for it to finish "
            f"and rerun; a lock whose holder is gone is taken over (at once on the same host, else after "
            f"{self.stale_after_s:g} s without refresh, locks.stale_after_s)")

    def _refresh(self) -> None:
        interval = max(0.05, min(60.0, self.stale_after_s / 4))
        while not self._stop.wait(interval):
            for path in self.held:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    log.warning("the lock %s was removed while this run held it", path)
