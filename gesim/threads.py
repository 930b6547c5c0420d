"""How many CPU threads gesim's work gets: one per worker, never more than the machine allows.

gesim's models are tiny (a 4-layer d-128 Transformer, linear-softmax policies): torch's default
of one OpenMP thread per core costs more in synchronisation than it gains, and on a busy
machine every parallel region waits for the slowest core. Measured on a 2-core CPU (issue 17):
a small-GPT step was 8x slower with 2 threads than with 1 next to one busy process, and the
figure runner took 68-71 min with 2 threads against 7.5 min with 1. So the policy is

* torch runs **one intra-op thread** (:func:`configure`, called once by every entry point:
  the command line, the figure runner, the tests, the notebooks);
* parallel work is split into independent **single-threaded workers**
  (:func:`workers`, used by the simulator), as many as the CPUs this process may use;
* the user decides when they say so: ``GESIM_THREADS`` (gesim's own setting), else
  ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (torch's), sets both the torch threads and the
  workers.

"The CPUs this process may use" is the smaller of the affinity mask (``os.sched_getaffinity``)
and the cgroup CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us / cpu.cfs_period_us`` in
v1), rounded up. Numbers never depend on the count: each worker's work is fixed in advance.
This module does not import torch until a function needs it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

from gesim.errors import GesimError

#: Environment variables that set the thread count, first match wins.
ENV = ("GESIM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
CGROUP = Path("/sys/fs/cgroup")


#: Set by :func:`configure` when it (not the user) wrote OMP_NUM_THREADS / MKL_NUM_THREADS.
AUTO = "GESIM_THREADS_AUTO"


def env_threads(environ=None) -> int | None:
    """The thread count the user's environment asks for (:data:`ENV`), or None.

    OMP_NUM_THREADS / MKL_NUM_THREADS written by :func:`configure` (marked by :data:`AUTO`)
    are not the user's and do not count."""
    environ = os.environ if environ is None else environ
    for name in ENV:
        if name != "GESIM_THREADS" and environ.get(AUTO):
            continue
        value = environ.get(name, "").strip()
        if value:
            try:
                n = int(value.split(",")[0])
            except ValueError:
                raise GesimError(f"{name} must be a positive integer, got {value!r}") from None
            if n < 1:
                raise GesimError(f"{name} must be a positive integer, got {value!r}")
            return n
    return None


def _own_paths(proc: Path) -> dict[str, str]:
    """This process's cgroup paths from /proc/self/cgroup: {"v2": path, "cpu": path (v1)}."""
    out = {}
    try:
        for line in proc.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                out["v2"] = path.lstrip("/")
            elif "cpu" in controllers.split(","):
                out["cpu"] = path.lstrip("/")
    except (OSError, ValueError):
        pass
    return out


def _read_quota(path: Path, period_path: Path | None = None) -> float | None:
    try:
        if period_path is None:  # v2: "quota period" or "max period"
            text = path.read_text().split()
            return None if text[0] == "max" else int(text[0]) / int(text[1] if len(text) > 1 else 100_000)
        quota, period = int(path.read_text()), int(period_path.read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, IndexError):
        return None


def cpu_quota(root: Path = CGROUP, proc: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs allowed by the cgroup quota (e.g. 1.5), or None when unlimited or unreadable.

    Reads cgroup v2 ``cpu.max`` and v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, at the root of
    the mount and at this process's own cgroup; the tightest quota wins."""
    own = _own_paths(proc)
    found = []
    for base in {root, root / own.get("v2", ""), root / "unified" / own.get("v2", "")}:
        found.append(_read_quota(base / "cpu.max"))
    for base in {root / "cpu", root / "cpu" / own.get("cpu", "")}:
        found.append(_read_quota(base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us"))
    found = [q for q in found if q is not None]
    return min(found) if found else None


def available_cpus(root: Path = CGROUP) -> int:
    """CPUs this process may use: min(affinity mask, ceil(cgroup quota)), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = cpu_quota(root)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def torch_threads(environ=None) -> int:
    """Intra-op threads for torch: the environment's count, else 1 (tiny models)."""
    n = env_threads(environ)
    return 1 if n is None else n


def workers(tasks: int | None = None, environ=None, root: Path = CGROUP) -> int:
    """Parallel single-threaded workers for ``tasks`` independent pieces of work.

    The environment's count (:data:`ENV`) if set, else :func:`available_cpus`; never more than
    ``tasks``; at least 1.
    """
    n = env_threads(environ) or available_cpus(root)
    if tasks is not None:
        n = min(n, int(tasks))
    return max(1, n)


def set_torch_threads(n: int) -> None:
    """torch.set_num_threads(n) for the calling thread (a worker's initializer)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def configure(environ=None) -> int:
    """Entry points call this once, first: torch gets :func:`torch_threads` intra-op threads.

    If torch is already imported its count is set now; otherwise, unless the user chose a
    count, OMP_NUM_THREADS and MKL_NUM_THREADS are written (torch reads them when first
    imported, and child processes inherit them), marked with :data:`AUTO` so that
    :func:`workers` still sees the CPUs. ``OMP_WAIT_POLICY`` defaults to PASSIVE (idle OpenMP
    threads sleep instead of spinning on a shared core). Torch is never imported here.
    Returns the thread count.
    """
    environ = os.environ if environ is None else environ
    user = env_threads(environ)
    n = 1 if user is None else user
    if user is None:
        environ.update({"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), AUTO: "1"})
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        set_torch_threads(n)
    return n


@contextlib.contextmanager
def single():
    """Run the block with one torch thread in the calling thread, then restore the count."""
    import torch

    before = torch.get_num_threads()
    set_torch_threads(1)
    try:
        yield
    finally:
        set_torch_threads(before)
