"""Generation over several machines with ``mx.distributed``: what generate, chat, bench (and serve) share.

``mlx.launch`` starts the same command on every rank. ``start()`` finds the group (size > 1)
and keeps the output to rank 0; ``shard()`` splits the loaded model as mlx-lm's
``sharded_load`` does: tensor parallel through the model's own ``shard(group)`` (each rank
holds ``1/N`` of every layer's heads and MLP; two ``all_sum`` per layer), or pipeline through
``model.model.pipeline(group)`` (each rank whole layers). mlxkv's caches then hold each rank's
own KV heads: ``make_kv_cache`` sizes them from the keys that arrive. ``setup()`` does it all
for a command. In one process (no group) nothing changes.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import mlx.core as mx
import mlx.nn as nn

from mlxkv.errors import UserError
from mlxkv.units import format_bytes

TENSOR, PIPELINE = "tensor", "pipeline"

H2O_CAVEAT = ("H2O ranks tokens by the attention of the heads a cache holds; under mlx.launch each rank "
              "holds and scores only its own KV heads, so ranks may keep different heavy hitters and the "
              "text can differ from one process's (the window and quantized caches do not depend on scores)")

PIPELINE_HELP = ("under mlx.launch, give each rank whole layers (pipeline parallel) instead of a share of "
                 "every layer's heads (tensor parallel, the default); only for models mlx-lm can pipeline "
                 "(e.g. Qwen2/3-MoE, DeepSeek; not Llama/SmolLM2)")

QUIET_EXIT_WAIT = 20.0
_group: Any = None  # the group start() found; None in one process
_started = False


@dataclass(frozen=True)
class Sharding:
    """How this process's model was split. ``mode``: None (one process), "tensor" or "pipeline";
    ``layers``: [start, end) of the model's layers this rank runs (pipeline); ``load_peak_bytes``:
    MLX's peak before sharding (loading holds the whole model on every rank); ``weights_bytes``:
    what this rank's weights take after sharding."""

    group: Any = None
    rank: int = 0
    size: int = 1
    mode: str | None = None
    layers: tuple[int, int] | None = None
    load_peak_bytes: int = 0
    weights_bytes: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """One line for rank 0 to print: what each rank holds."""
        if not self.active:
            return "one process"
        if self.mode == PIPELINE:
            start, end = self.layers
            what = f"pipeline parallel: each rank runs whole layers (rank {self.rank}: layers {start}-{end - 1})"
        else:
            what = f"tensor parallel: each rank holds 1/{self.size} of every layer's heads, their KV cache and the MLP"
        return (f"sharded over {self.size} ranks, {what}; weights {format_bytes(self.weights_bytes)} on rank "
                f"{self.rank}; loading peaked at {format_bytes(self.load_peak_bytes)} (the whole model, before sharding)")


# -- the group and who prints ---------------------------------------------------------------
def start() -> Any | None:
    """The group ``mlx.launch`` started (size > 1), or None in one process. From the first call
    on, only rank 0 prints: other ranks' stdout goes to /dev/null and ``is_main()`` is False
    there (their errors still reach stderr). Safe to call again."""
    global _group, _started
    if not _started:
        group = mx.distributed.init()
        _group = group if group.size() > 1 else None
        _started = True
        if _group is not None and _group.rank() != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return _group


def is_main() -> bool:
    """Whether this process prints: rank 0, or the only process."""
    return _group is None or _group.rank() == 0


def rank0_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (mlx-lm's ``rprint``)."""
    if is_main():
        print(*args, **kwargs)


def raise_once(error: UserError) -> NoReturn:
    """Raise ``error`` on rank 0; the other ranks, which checked the same arguments and model and
    found the same, say nothing and wait (up to ``QUIET_EXIT_WAIT`` s) for mlx.launch to stop them
    once rank 0 has printed the error and left: one line, not one per rank, and never lost to a
    rank that left first."""
    if is_main():
        raise error
    time.sleep(QUIET_EXIT_WAIT)
    raise SystemExit(2)


# -- sharding a loaded model ------------------------------------------------------------------
def shard(model: nn.Module, group: Any, pipeline: bool = False) -> Sharding:
    """Split ``model`` over ``group`` as mlx-lm's ``sharded_load`` does, in place, and record it
    on the model (``sharding_of``). UserError, before anything changes, when mlx-lm cannot split
    this model that way or its heads (layers, for a pipeline) do not divide by the group size."""
    from mlxkv.memory.layout import layout_from_model, model_split_modes
    from mlxkv.memory.tracker import model_weights_bytes

    size, name = group.size(), _model_name(model)
    modes = model_split_modes(model)
    can_tensor, can_pipeline = TENSOR in modes, PIPELINE in modes
    if pipeline and not can_pipeline:
        raise UserError(f"mlx-lm cannot pipeline {name} models (no model.pipeline); "
                        + ("drop --pipeline to split their heads over the ranks (tensor parallel)" if can_tensor
                           else "run it in one process"))
    if not pipeline and not can_tensor:
        raise UserError(f"mlx-lm cannot split {name} models over ranks (no shard()); "
                        + ("pass --pipeline to give each rank whole layers" if can_pipeline
                           else "run it in one process, without mlx.launch"))
    layout_from_model(model).per_rank(size, pipeline)  # the rule the planner uses: UserError naming sizes
    load_peak = mx.get_peak_memory()
    layers = None
    try:
        if pipeline:
            model.model.pipeline(group)
            layers = (model.model.start_idx, model.model.end_idx)
        else:
            model.shard(group)
    except ValueError as e:  # a width the layout does not know (mlx's shard_linear names it)
        raise UserError(f"mlx-lm cannot split this {name} model over {size} ranks: {e}") from None
    mx.eval(model.parameters())
    barrier(group)  # as sharded_load: no rank starts (and times out) while another still loads
    gc.collect()  # the unsharded weights go now; the run's peak starts here
    mx.clear_cache()
    mx.reset_peak_memory()
    sharding = Sharding(group, group.rank(), size, PIPELINE if pipeline else TENSOR, layers, load_peak,
                        model_weights_bytes(model))
    model.mlxkv_sharding = sharding
    return sharding


def sharding_of(model: nn.Module) -> Sharding:
    """What ``shard`` did to ``model``; ``Sharding()`` (one process) for a model it did not touch."""
    return getattr(model, "mlxkv_sharding", None) or Sharding()


def tensor_shards(model: nn.Module) -> int:
    """How many ranks share each layer's heads: the group size for a tensor-parallel model, else 1.
    mlx-lm's ``shard`` divides the attention modules' head counts but leaves ``model.args`` whole,
    so readers of ``args`` divide by this."""
    sharding = sharding_of(model)
    return sharding.size if sharding.mode == TENSOR else 1


def setup(model: nn.Module, args: Any = None) -> Sharding:
    """For a command (generate, chat, bench, serve), after loading: under ``mlx.launch``, shard
    ``model`` (``args.pipeline`` picks pipeline over tensor parallel) and give every rank rank 0's
    random stream (each rank samples; one stream draws the same tokens everywhere, as mlx-lm's
    server does). In one process return ``Sharding()`` and change nothing."""
    group = start()
    pipeline = bool(getattr(args, "pipeline", False))
    if group is None:
        return Sharding()
    try:
        sharding = shard(model, group, pipeline)
    except UserError as e:
        raise_once(e)
    share_random_state(group)
    return sharding


def check_config(sharding: Sharding, config: Any) -> None:
    """UserError for a KV config the sharding cannot run. A pipeline splits layers, not heads,
    so every KV config runs on it (mlxkv's caches carry the stage's send on their ``keys``
    anchor); H2O under tensor parallelism scores each rank's own heads (see H2O_CAVEAT)."""
    return None


def _model_name(model: nn.Module) -> str:
    args = getattr(model, "args", None)
    return str(getattr(args, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1])


# -- collectives ------------------------------------------------------------------------------
def barrier(group: Any) -> None:
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def share_random_state(group: Any) -> None:
    """Seed every rank with rank 0's random state."""
    state = mx.random.state[0].astype(mx.uint32) * (1 if group.rank() == 0 else 0)
    high, low = mx.distributed.all_sum(state, group=group, stream=mx.cpu).tolist()
    mx.random.seed((int(high) << 32) | int(low))


def gather_ints(values: Sequence[Sequence[int]]) -> list[list[list[int]]]:
    """Every rank's rows of integers, on every rank (a collective: every rank calls it with the
    same shape); ``[values]`` in one process."""
    if _group is None:
        return [[list(map(int, row)) for row in values]]
    local = mx.array([list(map(int, row)) for row in values], dtype=mx.int64)
    gathered = mx.distributed.all_gather(local[None], group=_group, stream=mx.cpu)
    return gathered.tolist()


def free_loopback_ports(n: int) -> int:
    """The first of ``n`` consecutive loopback ports nothing holds now, for ``mlx.launch
    --starting-port`` on one machine (the ring backend listens on one port per rank from there;
    its default 32323 may be another run's, and it binds with SO_REUSEPORT, so a clash is silent)."""
    import random
    import socket

    for _ in range(100):
        base, held = random.randrange(40000, 60000 - n), []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise UserError(f"found no {n} free consecutive loopback ports; pass mlx.launch --starting-port")


# -- each rank's memory -----------------------------------------------------------------------
@dataclass(frozen=True)
class RankMemory:
    """One rank's KV cache bytes (allocated) and MLX's peak."""

    rank: int
    kv_bytes: int
    peak_bytes: int


def gather_memory(kv_bytes: int, peak_bytes: int) -> list[RankMemory]:
    """Every rank's KV bytes and peak (a collective: every rank calls it)."""
    per_rank = gather_ints([[kv_bytes, peak_bytes]])
    return [RankMemory(rank, rows[0][0], rows[0][1]) for rank, rows in enumerate(per_rank)]


def memory_line(ranks: Sequence[RankMemory]) -> str:
    """'per rank: KV 3.75 MB / 3.75 MB / 3.75 MB (11.2 MB in all) | peak 215 MB / 210 MB / 210 MB'."""
    kv = " / ".join(format_bytes(r.kv_bytes) for r in ranks)
    peak = " / ".join(format_bytes(r.peak_bytes) for r in ranks)
    total = format_bytes(sum(r.kv_bytes for r in ranks))
    return f"per rank (0-{len(ranks) - 1}): KV cache {kv} ({total} in all) | peak memory {peak}"


def add_rank_columns(rows: Sequence[dict[str, Any]], keys: Sequence[str] = ("kv_bytes", "peak_memory_bytes")) -> None:
    """Give each row ``KEY_per_rank``: its ``KEY`` on every rank, rank 0 first (a collective: every
    rank calls it with the same rows, as every rank ran the same bench)."""
    per_rank = gather_ints([[int(row[key]) for key in keys] for row in rows])
    for i, row in enumerate(rows):
        for j, key in enumerate(keys):
            row[f"{key}_per_rank"] = [rank_rows[i][j] for rank_rows in per_rank]


def agreed_budget(memory: int | str | None) -> int | str | None:
    """The memory budget every rank plans with (``--kv-bits auto``): the smallest machine's, so
    all ranks choose the same KV config. In one process ``memory`` as given."""
    if _group is None:
        return memory
    from mlxkv.memory.machine_memory import device_memory

    return min(row[0][0] for row in gather_ints([[device_memory(memory).recommended]]))


def agreed_budgets(budgets: Any) -> Any:
    """A server's budgets (``mlxkv.server.budget.Budgets``), the same on every rank: the smallest
    machine's, so every rank's engine admits the same requests. In one process as given."""
    if _group is None:
        return budgets
    import dataclasses

    kv, prefix = (min(column) for column in zip(*(row[0] for row in gather_ints([[budgets.kv, budgets.prefix]]))))
    return dataclasses.replace(budgets, kv=kv, prefix=prefix,
                               note=budgets.note + f"; the smallest machine's, on every rank: KV budget {format_bytes(kv)}")
