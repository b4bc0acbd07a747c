"""Leases on named pieces of work in a shared folder, so that no two workers do one twice.

Any number of processes, on one machine or on several sharing a file system (local disk,
NFS), can work through one results folder: before a worker trains a cell it claims the
cell's name here, and it renews the claim while it works. The mechanism uses only what
every POSIX file system (NFS v3 included) makes atomic: creating a hard link to a name
that does not exist yet, and removing a file.

* **A claim is a generation file** ``NAME.GEN.lease`` holding the holder's host, pid, the
  pid's start time and a unique token. Claiming creates generation 1 by ``os.link`` of a
  freshly written private file; the link fails for every worker but one.
* **Renewal** sets the file's modification time (on NFS the server's clock, so hosts'
  clocks need not agree). A holder whose file has vanished has lost the claim.
* **Takeover.** A claim is stale when its holder is on this host and its process is gone
  (at once: pid absent, or reused by a process started later), or when it was not renewed
  for ``lease_s`` seconds, measured against the file system's own clock (the modification
  time of a file just written). A stale claim is taken over by creating the next
  generation, which again only one worker can do; the winner then removes the older
  generations, which is how a holder that had merely stalled learns it lost the cell.
* **Release** removes the holder's own generation file.

A claim says who works on something now; whether the work is *finished* is recorded
elsewhere (a run's ``summary.json``), and callers check that after claiming.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.engine.runs import process_alive

#: seconds without renewal after which another host may take a claim over. Long enough for
#: an NFS server hiccup or a busy machine; a dead holder on the same host is seen at once.
DEFAULT_LEASE_S = 120.0

_NAME = re.compile(r"^(?P<name>.+)\.(?P<gen>\d+)\.lease$")


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    """:func:`reslab.engine.runs.process_alive`, and started when the holder was (not a reused pid)."""
    if not process_alive(pid):
        return False
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a later process
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a claim; written into the lease file."""

    host: str
    pid: int
    start: str | None
    token: str

    @classmethod
    def me(cls) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _proc_start(pid), uuid.uuid4().hex)

    def to_json(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "start": self.start, "token": self.token})

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), d.get("start"), str(d["token"]))
        except (ValueError, KeyError, TypeError):
            return None


class Lease:
    """A claim this process holds; renew it while working, release it when done."""

    def __init__(self, claims: Claims, name: str, gen: int, holder: Holder) -> None:
        self.claims = claims
        self.name = name
        self.gen = gen
        self.holder = holder
        self.path = claims.root / f"{name}.{gen}.lease"

    def renew(self) -> bool:
        """Mark the claim alive; False when it was taken over (this process must stop)."""
        # by token, not by name: after a takeover and a release, a third worker may hold a
        # file of the same name
        if not self.held():
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:
            return False
        return True

    def held(self) -> bool:
        try:
            return Holder.parse(self.path.read_text()) == self.holder
        except OSError:
            return False

    def release(self) -> None:
        # only our own generation: after a takeover the file is someone else's business
        if self.held():
            self.path.unlink(missing_ok=True)

    @contextmanager
    def renewed(self, on_lost: Callable[[], None] | None = None, every: float | None = None) -> Iterator[Lease]:
        """Renew in a background thread while the block runs; release at the end.

        ``on_lost`` is called (from that thread) if the claim is found taken over, so the
        work can stop: another worker has decided this one was dead and resumed the cell.
        """
        stop = threading.Event()
        period = every if every is not None else max(0.5, self.claims.lease_s / 6)

        def beat() -> None:
            while not stop.wait(period):
                if not self.renew():
                    if on_lost is not None:
                        on_lost()
                    return

        t = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()
            self.release()


class Claims:
    """The claims folder of one results folder (``RESULTS/claims``)."""

    def __init__(self, root: str | os.PathLike[str], lease_s: float = DEFAULT_LEASE_S) -> None:
        self.root = Path(root)
        self.lease_s = float(lease_s)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------

    def _generations(self, name: str) -> list[int]:
        return self._scan().get(name, [])

    def _fs_now(self) -> float:
        """The file system's clock: the modification time of a file written just now."""
        probe = self.root / f".now-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        try:
            return probe.stat().st_mtime
        finally:
            probe.unlink(missing_ok=True)

    def _scan(self) -> dict[str, list[int]]:
        """Every claimed name and its generations, from one listing of the folder."""
        gens: dict[str, list[int]] = {}
        for entry in os.scandir(self.root):
            if m := _NAME.match(entry.name):
                gens.setdefault(m["name"], []).append(int(m["gen"]))
        return {n: sorted(g) for n, g in gens.items()}

    def _inspect(self, name: str, gen: int, now: float) -> tuple[Holder | None, bool] | None:
        """(holder, stale) of one generation file at file-system time ``now``; None when it
        vanished meanwhile."""
        path = self.root / f"{name}.{gen}.lease"
        try:
            text = path.read_text()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        holder = Holder.parse(text)
        if holder is None:
            # torn by a crash mid-write (it is written before it is linked): judge it by its age
            return None, now - mtime > self.lease_s
        if holder.host == socket.gethostname() and not _pid_alive(holder.pid, holder.start):
            return holder, True
        return holder, now - mtime > self.lease_s

    def holder(self, name: str) -> Holder | None:
        """The live holder of ``name``'s claim, None when unclaimed or stale."""
        return self.active([name]).get(name)

    def active(self, names: Iterable[str] | None = None) -> dict[str, Holder]:
        """Every name (of ``names``, if given) with a live claim, and its holder."""
        found = self._scan()
        wanted = found.keys() if names is None else [n for n in names if n in found]
        if not wanted:
            return {}
        now = self._fs_now()
        out = {}
        for n in sorted(wanted):
            state = self._inspect(n, found[n][-1], now)
            if state is not None and not state[1] and state[0] is not None:
                out[n] = state[0]
        return out

    def local_holders(self, names: Iterable[str]) -> dict[str, Holder]:
        """The names of ``names`` whose live claim is held by a process of this host."""
        here = socket.gethostname()
        return {n: h for n, h in self.active(names).items() if h.host == here}

    def release_dead(self, names: Iterable[str]) -> list[str]:
        """Remove the claims of ``names`` whose holder was a process of this host that is gone
        (killed with a lost cluster): what the holder would have done. A claim of another
        host is left to expire (``lease_s``). Safe against a concurrent takeover: only the
        dead holder's own generation file is removed."""
        found = self._scan()
        here = socket.gethostname()
        out = []
        for n in names:
            if n not in found:
                continue
            gen = found[n][-1]
            path = self.root / f"{n}.{gen}.lease"
            try:
                holder = Holder.parse(path.read_text())
            except OSError:
                continue
            if holder is not None and holder.host == here and not _pid_alive(holder.pid, holder.start):
                path.unlink(missing_ok=True)
                out.append(n)
        return out

    # -- claiming ------------------------------------------------------------------------

    def _create(self, name: str, gen: int, holder: Holder) -> bool:
        """Atomically create generation ``gen``; False when another worker got there first."""
        tmp = self.root / f".tmp-{holder.token}-{gen}"
        tmp.write_text(holder.to_json())
        target = self.root / f"{name}.{gen}.lease"
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            # NFS may report a failure for a link that did happen (a retransmitted request
            # answered after the first succeeded); the link count says what really happened
            if e.errno in (errno.EEXIST,):
                return False
            try:
                return tmp.stat().st_nlink == 2
            except OSError:
                raise e from None
        finally:
            tmp.unlink(missing_ok=True)

    def try_claim(self, name: str) -> Lease | None:
        """Claim ``name`` now, or take over a stale claim; None when someone live holds it."""
        holder = Holder.me()
        gens = self._generations(name)
        if not gens:
            gen = 1
        else:
            state = self._inspect(name, gens[-1], self._fs_now())
            if state is None:
                return None  # changed under us: let the caller try again later
            if not state[1]:
                return None
            gen = gens[-1] + 1
        if not self._create(name, gen, holder):
            return None
        for old in self._generations(name):
            if old < gen:
                (self.root / f"{name}.{old}.lease").unlink(missing_ok=True)
        return Lease(self, name, gen, holder)

    def claim_or_wait(
        self,
        name: str,
        done: Callable[[], bool],
        poll_s: float = 1.0,
        on_wait: Callable[[Holder | None], None] | None = None,
    ) -> Lease | None:
        """Claim ``name``, or wait while another live worker holds it; None once ``done()``.

        For one-off work several workers need (e.g. a measurement every worker reads): one
        does it, the others wait for its result, and take over if its holder dies.
        """
        while not done():
            lease = self.try_claim(name)
            if lease is not None:
                if done():  # finished between our check and the claim
                    lease.release()
                    return None
                return lease
            if on_wait is not None:
                on_wait(self.holder(name))
                on_wait = None  # say it once
            time.sleep(poll_s)
        return None


#: in the claims folder: which results state the last report was written for, when and by whom
REPORT_STAMP = "report.stamp"


def write_report_stamp(claims: Claims, state: str) -> None:
    """Record that the report for results ``state`` (a fingerprint) was written now, by this process."""
    from reslab.files import atomic_write_text

    stamp = {"state": state, "time": time.time(), "by": f"pid {os.getpid()} on {socket.gethostname()}"}
    atomic_write_text(claims.root / REPORT_STAMP, json.dumps(stamp))


def read_report_stamp(claims: Claims) -> dict[str, Any]:
    """What :func:`write_report_stamp` last recorded (``{}`` when nothing readable was)."""
    try:
        stamp = json.loads((claims.root / REPORT_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def describe(holder: Holder | None) -> str:
    return "nobody" if holder is None else f"pid {holder.pid} on {holder.host}"
