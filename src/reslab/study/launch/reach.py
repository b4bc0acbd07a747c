"""Is the Ray cluster there? Before anything is written (reach it within a bounded time, or say
in one line why not), and while the grid runs (notice within seconds that it is gone).

Connecting is done in three steps, each bounded by ``--connect-timeout``:

1. a plain TCP connection to the address: nothing listening (refused), or no answer at all
   (host down, firewall), is known at once, without Ray's own retries (by default about 20
   attempts of 40 s each when nothing listens);
2. a probe: a short child process that calls ``ray.init(address)`` with one attempt and its
   output captured, killed when the time is up. Ray's retry warnings stay in it, and what
   they say tells a token mismatch (``Unauthenticated``) from a port that is not Ray's;
3. only then ``ray.init`` in this process, which now answers in about a second.

While the grid runs, :class:`GcsWatch` opens a TCP connection to the cluster's GCS every
:data:`POLL_S` seconds; when none has succeeded for :data:`LOST_AFTER_S` seconds the cluster is
lost (left alone, Ray's driver would go on waiting for its tasks and end the process after
a minute, with status 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reslab.errors import UsageError
from reslab.study.launch.common import POLL_S, ClusterLost

#: seconds without a successful connection to the GCS after which the cluster counts as lost
#: (Ray itself gives up on a GCS after 60 s and ends the driver; a restarted GCS answers sooner)
LOST_AFTER_S = 8.0

# The probe run in a child process: one ray.init, the outcome as one JSON line on stdout.
_PROBE = """
import json, sys
try:
    import ray
    ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    out = {"ok": True}
except BaseException as e:
    out = {"ok": False, "type": type(e).__name__, "message": str(e)}
print(json.dumps(out), flush=True)
"""


def split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` of ``host:port`` or ``ray://host:port``; None for ``auto`` and other forms
    Ray resolves itself."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def tcp_problem(host: str, port: int, timeout: float) -> str | None:
    """Why no TCP connection to ``host:port`` opens within ``timeout`` seconds (a short
    phrase), or None when one does."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "refused"
    except socket.gaierror:
        return "unknown host"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return e.strerror or type(e).__name__


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


def auth_hint(address: str) -> str:
    """The one line for a cluster that refused this process's (missing or wrong) token."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if _token_available() and mode != "token":
        return (
            f"the Ray cluster at {address} requires token authentication and this process sent no token: "
            "set RAY_AUTH_MODE=token (a token is in ~/.ray/auth_token or RAY_AUTH_TOKEN; it must be the cluster's)"
        )
    if _token_available():
        return (
            f"the Ray cluster at {address} rejected this machine's authentication token: use the cluster's token "
            "('ray get-auth-token' on the head node) in ~/.ray/auth_token or RAY_AUTH_TOKEN, with RAY_AUTH_MODE=token"
        )
    return (
        f"the Ray cluster at {address} requires token authentication: copy its token ('ray get-auth-token' on "
        "the head node) to ~/.ray/auth_token (or RAY_AUTH_TOKEN) and set RAY_AUTH_MODE=token"
    )


def _is_auth(text: str) -> bool:
    return any(w in text for w in ("Unauthenticated", "InvalidAuthToken", "AuthenticationError", "auth token"))


def probe(address: str, timeout: float) -> str | None:
    """Try ``ray.init(address)`` in a child process for at most ``timeout`` seconds; None when
    it connected, else the one-line usage error to show."""
    env = {**os.environ, "RAY_NUM_REDIS_GET_RETRIES": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, address],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        said = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        if _is_auth(said):
            return auth_hint(address)
        return (
            f"{address} accepts connections but no Ray cluster answered within {timeout:g} s: give the head's "
            "GCS port (the --port of 'ray start --head', 6379 by default), or a longer --connect-timeout for a slow "
            "cluster"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    try:
        out = json.loads(lines[-1]) if lines else {}
    except ValueError:
        out = {}
    if out.get("ok"):
        return None
    message = str(out.get("message") or proc.stderr.strip() or f"exit status {proc.returncode}")
    if _is_auth(message + proc.stderr) or out.get("type") == "AuthenticationError":
        return auth_hint(address)
    if address == "auto" and "Could not find any running Ray instance" in message:
        return (
            "--ray-address auto found no running Ray cluster on this machine: start one ('ray start --head') "
            "or give the head's address, e.g. --ray-address HEAD_IP:6379"
        )
    first = next((ln.strip() for ln in message.splitlines() if ln.strip()), message)
    return f"cannot connect to the Ray cluster at {address}: {first}"


def reach_problem(address: str, timeout: float) -> str | None:
    """Why the Ray cluster at ``address`` cannot be used (one line naming the address, the
    likely cause and the fix), found within about ``timeout`` seconds; None when it answers."""
    hostport = split_address(address)
    if hostport is not None:
        host, port = hostport
        why = tcp_problem(host, port, min(timeout, 5.0))
        if why == "refused":
            return (
                f"nothing listens at {address} (connection refused): start the cluster there "
                f"('ray start --head --port {port}') or give the head's address, e.g. --ray-address HEAD_IP:6379"
            )
        if why == "unknown host":
            return f"--ray-address {address}: the host {host} is not known here; check the name"
        if why is not None:
            why = "no answer" if why == "timeout" else why
            return (
                f"cannot reach {address} ({why}): check the address, that the head node is up and that this "
                f"machine may connect to its port {port}"
            )
    return probe(address, timeout)


def connect(ray: Any, address: str | None, timeout: float) -> bool:
    """Connect this process to Ray: to ``address`` once :func:`reach_problem` found it answers
    (else :class:`UsageError`), or to a new instance of this machine without one. True when this
    call started the connection (and should end it); False when the caller had one already."""
    if ray.is_initialized():
        return False
    if address is not None:
        problem = reach_problem(address, timeout)
        if problem is not None:
            raise UsageError(problem)
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,  # the workers' output stays in Ray's session logs
            logging_level="WARNING",
        )
    except Exception as e:  # noqa: BLE001 - whatever Ray raises, the user gets one line
        where = address or "a new local instance"
        text = str(e).strip()
        if _is_auth(text) or type(e).__name__ == "AuthenticationError":
            raise UsageError(auth_hint(where)) from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise UsageError(f"cannot start or reach Ray at {where}: {first}") from None
    return True


class GcsWatch:
    """Tells, from the driver, that the cluster's GCS stopped answering (see the module)."""

    def __init__(self, ray: Any, address: str | None) -> None:
        gcs = None
        try:
            gcs = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - Ray Client has none: watch the address given
            gcs = address
        self.where = gcs or address or "?"
        self.hostport = split_address(gcs) if gcs else None
        self.last_ok = time.monotonic()

    def check(self) -> None:
        """Raise :class:`ClusterLost` once the GCS has not answered for :data:`LOST_AFTER_S` s."""
        if self.hostport is None:
            return
        if tcp_problem(*self.hostport, timeout=POLL_S) is None:
            self.last_ok = time.monotonic()
        elif time.monotonic() - self.last_ok >= LOST_AFTER_S:
            silent = time.monotonic() - self.last_ok
            raise ClusterLost(f"the Ray cluster at {self.where} (its head stopped answering {silent:.0f} s ago)")
