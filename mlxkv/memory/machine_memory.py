"""How much memory this machine has, and how much a model may use: the planner's default budget.

On Apple Silicon the GPU shares the system RAM, and Metal recommends a working set (about
70-75% of RAM) beyond which the system starts to swap: MLX reports both. Elsewhere the
OS says how much is installed and how much it can hand out without swapping
(``MemAvailable`` in ``/proc/meminfo``, under a container's cgroup limit if there is one).
The user can override it: ``--memory 16GB`` or ``MLXKV_MEMORY=16GB``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlxkv.errors import UserError
from mlxkv.units import parse_bytes

MEMORY_ENV = "MLXKV_MEMORY"
RECOMMENDED_FRACTION = 0.75
"""Share of RAM taken as the working set when the OS gives nothing better (Metal's ratio)."""


@dataclass(frozen=True)
class DeviceMemory:
    """``total``: installed memory; ``recommended``: what a model may use without swapping
    (the planner's default budget); ``source``: where the numbers came from."""

    total: int
    recommended: int
    source: str


def device_memory(override: str | int | None = None) -> DeviceMemory:
    """This machine's memory. ``override`` (e.g. ``"16GB"``), else ``$MLXKV_MEMORY``, replaces
    the recommended working set (and the total, when larger)."""
    if override is None and os.environ.get(MEMORY_ENV):
        override, label = os.environ[MEMORY_ENV], f"${MEMORY_ENV}"
    else:
        label = "user override"
    if override is not None:
        size = parse_bytes(override, "memory budget")
        return DeviceMemory(total=size, recommended=size, source=label)
    for probe in (_from_mlx, _from_proc_meminfo, _from_sysconf):
        found = probe()
        if found is not None:
            return found
    raise UserError(f"cannot tell how much memory this machine has; pass --memory 16GB or set {MEMORY_ENV}")


def _from_mlx() -> DeviceMemory | None:
    """Apple Silicon (Metal): installed memory and Metal's recommended working set."""
    import mlx.core as mx

    info_fn = getattr(mx, "device_info", None) or getattr(getattr(mx, "metal", None), "device_info", None)
    try:
        info = info_fn() if info_fn is not None else {}
    except Exception:  # no GPU device: MLX may raise rather than return an empty dict
        return None
    total = info.get("memory_size")
    recommended = info.get("max_recommended_working_set_size")
    if not total:
        return None
    recommended = int(recommended or total * RECOMMENDED_FRACTION)
    return DeviceMemory(total=int(total), recommended=min(recommended, int(total)), source="mx.device_info()")


def _from_proc_meminfo(meminfo: Path = Path("/proc/meminfo")) -> DeviceMemory | None:
    """Linux: MemTotal and MemAvailable, bounded by a cgroup v2/v1 memory limit."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        available = int(fields.get("MemAvailable", fields["MemTotal"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    limit, used = _cgroup_limit()
    source = "/proc/meminfo"
    if limit is not None and limit < total:
        total, available = limit, min(available, limit - (used or 0))
        source += " and the cgroup memory limit"
    return DeviceMemory(total=total, recommended=max(available, 0), source=source)


def _cgroup_limit() -> tuple[int | None, int | None]:
    """(limit, current usage) of this process's memory cgroup, or (None, None) when unlimited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if not text.isdigit() or int(text) >= 2**60:  # "max", or v1's "unlimited" sentinel
            return None, None
        try:
            used = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            used = None
        return int(text), used
    return None, None


def _from_sysconf() -> DeviceMemory | None:
    """Any POSIX system: installed pages x page size; a fixed share of it as the working set."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    if total <= 0:
        return None
    return DeviceMemory(total=total, recommended=int(total * RECOMMENDED_FRACTION), source="sysconf")
