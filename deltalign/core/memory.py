"""This process's memory: the peak a stage reached, and handing freed heap back to the system.

* :func:`reset_peak` / :func:`peak`: the pipeline resets the high-water mark when a stage starts and writes the
  stage's peak into its manifest (``peak_memory``): resident host memory (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``; elsewhere the process's high-water mark since it started), and on a GPU the most
  memory torch's allocator held. Under several processes :func:`peak_of_all_processes` gathers each one's and
  the manifest records the largest (what every process must be given) with each beside it.
* :func:`resident`: what the process holds now (``doctor`` counts a loaded runtime with it); :func:`available`:
  what the machine can still give (``doctor`` warns where a stage's estimated peak is larger); :func:`total`:
  all the memory there is (one GPU's, else the host's), the same on every process of a launch; :func:`on_device`:
  whether those figures are a GPU's (``model.gradient_checkpointing: auto`` budgets from them);
* :func:`release_free_memory`: glibc's ``malloc_trim``, for the stages whose phases allocate differently.
"""

from __future__ import annotations

import ctypes
import resource
import sys

import torch


def reset_peak() -> None:
    """Start a new high-water mark at what is resident now (host and device)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: peak() then reports the process's high-water mark since it started
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _proc_kib(key: str, path: str = "/proc/self/status") -> int | None:
    """A ``key: N kB`` line of a ``/proc`` file (``VmHWM``, ``VmRSS`` of ``/proc/self/status``; ``MemAvailable``
    of ``/proc/meminfo``) in KiB; None where it cannot be read."""
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(f"{key}:")), None)
    except OSError:
        return None


def peak() -> dict[str, float]:
    """The peak since :func:`reset_peak`, in GiB: ``host_gib`` (resident) and, with a GPU, ``device_gib``."""
    kib = _proc_kib("VmHWM")
    if kib is None:  # ru_maxrss: KiB on Linux, bytes on macOS
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    out = {"host_gib": round(kib / 2**20, 3)}
    if torch.cuda.is_available():
        out["device_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def peak_of_all_processes(mine: dict[str, float]) -> dict:
    """Every process's :func:`peak` (collective: all call it): the largest of each figure, and ``processes``, the
    list by rank. One process alone (no process group, or a group of one): ``mine`` unchanged."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    each: list = [None] * dist.get_world_size()
    dist.all_gather_object(each, mine)
    return {key: max(p[key] for p in each) for key in mine} | {"processes": each}


def resident() -> float:
    """This process's resident memory now, GiB (0 where ``/proc`` is unavailable)."""
    return (_proc_kib("VmRSS") or 0) / 2**20


CGROUP = {"/sys/fs/cgroup/memory.max": "/sys/fs/cgroup/memory.current",  # cgroup v2, then v1
          "/sys/fs/cgroup/memory/memory.limit_in_bytes": "/sys/fs/cgroup/memory/memory.usage_in_bytes"}


def _cgroup() -> tuple[float, float] | None:
    """``(limit, usage)`` GiB of this container's memory cgroup, where one sets a limit (``max`` or v1's huge
    number: none)."""
    for limit, usage in CGROUP.items():
        try:
            with open(limit) as f, open(usage) as g:
                cap, used = f.read().strip(), int(g.read().strip())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:
            return int(cap) / 2**30, used / 2**30
    return None


def available() -> float | None:
    """Memory a stage could still take, GiB: free device memory with a GPU, else the host's ``MemAvailable`` (less,
    where a container's cgroup limit leaves less); None where neither can be read."""
    if on_device():
        return torch.cuda.mem_get_info()[0] / 2**30
    kib = _proc_kib("MemAvailable", "/proc/meminfo")
    if kib is None:
        return None
    group = _cgroup()
    return kib / 2**20 if group is None else min(kib / 2**20, max(group[0] - group[1], 0.0))


def on_device() -> bool:
    """Whether :func:`available` and :func:`total` are a GPU's memory (else the host's)."""
    return torch.cuda.is_available()


def total() -> float | None:
    """All the memory a stage's peak is counted against, GiB: this process's GPU with one, else the host's
    ``MemTotal``; None where it cannot be read. Unlike :func:`available` it does not move as processes allocate."""
    if on_device():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    kib = _proc_kib("MemTotal", "/proc/meminfo")
    group = _cgroup()
    return None if kib is None else kib / 2**20 if group is None else min(kib / 2**20, group[0])


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere a no-op). glibc keeps freed
    activations in fragmented heap chunks, so a phase with another allocation pattern (PPO: generation, scoring,
    updates) adds its own on top. For a stage whose steps all look alike it does not lower the peak, and trimming
    every step costs the page faults of re-touching the memory (SFT, batch 8 x 256 tokens: 20% slower), so it runs
    at boundaries only: between stages (the pipeline), after ZeRO-3's partitioned load, and at PPO's and GRPO's
    phase boundaries (PPO also after each training pass of its updates: with checkpointing, each forward leaves
    free heap behind; bench/profile_ppo.py measures the peak by phase)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
