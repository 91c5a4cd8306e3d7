"""The peak of a run, predicted: weights + KV cache + what a prefill step holds on top, or the load's own peak.

A run (``mlxkv generate``: load, prefill in steps of ``prefill_step_size`` tokens without
logits, the last token's logits, decode) peaks either while loading or during the last
prefill step, when the cache is (nearly) full and one step's activations are alive:

- **the attention transient** of one layer over a step of ``prefill_step`` queries:
  ``mlxkv.attention.blocks.attention_transient_bytes``, the rule the blockwise attention
  follows (one source of truth); mlx-lm's caches (the ``mlxlm-*`` baselines) attend with
  MLX's fused kernel, which on a CPU holds every score of the step at once
  (``ONE_SHOT_SCORE_COPIES``);
- **or the MLP's**, whichever is larger (a layer's attention and its MLP run one after the
  other): the gate and up projections and their product, ``MLP_WIDTHS`` widths of the MLP
  per token, beside the residual stream and its norm (``HIDDEN_WIDTHS``);
- **the chunk's keys and values held by quantized caches**: a quantized configuration keeps
  about ``HELD_CHUNK_KV`` of every layer's new keys and values, in the model's dtype, until the
  step's end (measured: the transient of a ``q4-kivi-rot`` or ``q8`` step grows by 2.5 MB a
  layer on SmolLM2's shape, 2,048-token steps, from 2 to 30 layers, while a full-precision
  cache's stays flat);
- **the last token's logits** (vocabulary x dtype, and the log-softmax beside them), in a step
  of their own: ``mlxkv.stepping.prefill`` computes no prompt logits.

Decode steps hold a few rows of scores and one token's activations: far below a prefill step.

**Loading** can peak above the weights: on a CPU device mlxkv expands quantized weights to
float32 (``mlxkv.loading.loader``), and the packed weights and their scales are alive until
the expanded ones are evaluated. ``mlxkv generate`` reports MLX's peak since the process
started, the load included (``GenerationStats.peak_bytes``), so the predicted peak is the larger
of the two. A loaded model carries its measured load transient (``LoadInfo.load_transient_bytes``);
before loading, the planner estimates it as ``LOAD_STORED_COPIES`` x the stored bytes when
the weights will be expanded.

The step counted is a full ``prefill_step`` over the whole context: conservative when a
prompt's last step is shorter (3% over on a 2,254-token prompt, MEMORY.md). Calibrated on
SmolLM2-135M (float32 on MLX's CPU backend, 2 cores; MEMORY.md, "Predicted vs measured
peak": within 3% at 2K and 8K tokens): the constants below are measured multiples, as in
``attention.blocks``, except ``MLP_WIDTHS``, counted from shapes. Not measured on Metal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlxkv.attention.blocks import SCORE_ITEMSIZE, attention_transient_bytes
from mlxkv.config import KVConfig
from mlxkv.memory.cache_bytes import FP16_BYTES, as_config, predict_kv_bytes
from mlxkv.memory.layout import ModelLayout
from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE

MLP_WIDTHS = 3
"""Arrays of ``step x mlp width`` alive at the MLP's peak: gate, up, and their product. Counted
from the shapes, not measured: on SmolLM2 (MLP 1,536 wide) the attention's transient is the
larger and sets the peak."""

HIDDEN_WIDTHS = 2
"""Arrays of ``step x hidden`` beside the MLP's: the residual stream and its norm."""

HELD_CHUNK_KV = 0.8
"""Of each layer's new keys and values (``step x kv heads x (key + value dims)`` in the
model's dtype), the part a quantized cache's step still holds at its peak: measured 0.57-0.96
on SmolLM2-135M (steps of 512 to 2,048 tokens, 30 layers), 0.83 from the slope over 2 to 30
layers."""

ONE_SHOT_SCORE_COPIES = 2
"""Score-sized arrays of MLX's fused attention on a CPU (the scores and their softmax): the
planner's rule for mlx-lm's caches, which never attend in blocks (measured: 223-307 MB at
2,048 tokens against 297 predicted, MEMORY.md before blockwise attention)."""

LOGIT_COPIES = 2
"""The last token's logits and their log-softmax (sampling)."""

LOAD_STORED_COPIES = 1.5
"""Bytes loading holds above the expanded weights, per stored byte, when quantized weights are
expanded on load: the packed weights, plus their scales and biases cast to float32 (measured
on SmolLM2-135M's Q4_1 GGUF: 140.5 MiB above the weights for 93.8 MiB stored)."""


@dataclass(frozen=True)
class PeakPrediction:
    """The parts of a run's predicted peak, in bytes. ``load``: what loading holds above the
    weights at its own peak (0 when nothing is expanded)."""

    weights: int
    kv: int
    attention: int
    activations: int
    logits: int
    load: int = 0
    held_kv: int = 0

    @property
    def prefill(self) -> int:
        """What one prefill step holds above the weights and the cache."""
        return max(self.attention, self.activations) + self.held_kv

    @property
    def run(self) -> int:
        """The peak after loading: weights, the cache, and the larger of a prefill step and the logits."""
        return self.weights + self.kv + max(self.prefill, self.logits)

    @property
    def load_peak(self) -> int:
        return self.weights + self.load

    @property
    def peak(self) -> int:
        """The peak since the process started, as ``mlxkv generate`` reports it."""
        return max(self.run, self.load_peak)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefill": self.prefill, "run": self.run, "peak": self.peak}


def prefill_transient_bytes(config: KVConfig | str, layout: ModelLayout, context: int,
                            prefill_step: int = DEFAULT_PREFILL_STEP_SIZE, dtype_bytes: int = FP16_BYTES,
                            batch: int = 1) -> tuple[int, int, int]:
    """(attention, MLP activations, held chunk KV) of the largest prefill step of a
    ``context``-token prompt. mlx-lm's caches on a CPU device (``dtype_bytes`` 4: mlxkv
    computes in float32 only there) attend in one shot; elsewhere MLX's fused kernel works in
    tiles, taken as our blocks' rule."""
    config = as_config(config)
    rows = max(1, min(prefill_step, context)) * batch
    attention = held = 0
    for layer in layout.attention_layers:
        score_rows = rows * (layer.query_heads or layer.kv_heads)
        keys = context if layer.window is None else min(context, layer.window + rows)
        if config.backend == "mlx-lm" and dtype_bytes == 4:
            need = ONE_SHOT_SCORE_COPIES * SCORE_ITEMSIZE * score_rows * keys
        else:
            need = attention_transient_bytes(score_rows, keys, layer.key_dim)
        attention = max(attention, need)
        if config.quantized:
            held += rows * layer.elements_per_token * dtype_bytes
    mlp = MLP_WIDTHS * max(layout.mlp_widths, default=0) + HIDDEN_WIDTHS * (layout.hidden_size or 0)
    return attention, rows * mlp * dtype_bytes, round(HELD_CHUNK_KV * held)


def predict_peak(config: KVConfig | str, layout: ModelLayout, context: int, weights_bytes: int, *,
                 dtype_bytes: int = FP16_BYTES, batch: int = 1,
                 prefill_step: int = DEFAULT_PREFILL_STEP_SIZE, load_bytes: int = 0) -> PeakPrediction:
    """The predicted peak of prefilling ``context`` tokens (then decoding) with ``config``: the
    cache allocated token by token (``predict_kv_bytes``), the largest prefill step's transient,
    the last token's logits, and ``load_bytes`` above the weights while loading."""
    attention, activations, held = prefill_transient_bytes(config, layout, context, prefill_step, dtype_bytes, batch)
    return PeakPrediction(
        weights=weights_bytes,
        kv=predict_kv_bytes(config, layout, context, dtype_bytes=dtype_bytes, batch=batch),
        attention=attention,
        activations=activations,
        logits=LOGIT_COPIES * batch * (layout.vocab_size or 0) * dtype_bytes,
        load=load_bytes,
        held_kv=held,
    )


def load_transient_estimate(stored_bytes: int | None, weights_bytes: int) -> int:
    """Bytes loading holds above the weights, before loading: ``LOAD_STORED_COPIES`` x the
    stored bytes when the loaded weights are larger than stored (expanded on load), else 0."""
    if not stored_bytes or stored_bytes >= weights_bytes:
        return 0
    return round(LOAD_STORED_COPIES * stored_bytes)


def model_load_bytes(model: Any) -> int:
    """What loading ``model`` held above its weights, as ``mlxkv.load`` measured it (0 when
    unknown). 0 for a model split over ranks: ``mlxkv.distributed.setup`` resets the peak
    after sharding, so the run's reported peak starts there."""
    from mlxkv.loading.loader import load_info

    if getattr(model, "mlxkv_sharding", None) is not None:
        return 0
    info = load_info(model)
    return (info.load_transient_bytes or 0) if info is not None else 0
