"""A model's KV-cache layout: for each cache, its heads, key and value widths and window.

That is all the planner needs to count bytes. Which layers get which cache is mlx-lm's
decision (``model.make_cache()``: full attention, a sliding window, a recurrent state, or
fewer caches than layers when layers share them), so the layout asks mlx-lm: on a model
built lazily from the config (no weights are allocated) when there is only a config, or by
a one-token shape probe when the model is loaded (nothing is evaluated). Architectures
mlx-lm does not know fall back to rules on the config's fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.errors import UserError


@dataclass(frozen=True)
class LayerSpec:
    """One layer's KV cache: ``kv_heads`` heads of ``key_dim``/``value_dim`` elements per token.

    ``window``: the model's own sliding window (tokens a ``RotatingKVCache`` keeps, sinks
    included), None for full attention; ``keep``: tokens such a window keeps at the start.
    ``query_heads``: the layer's query heads when known; they hold no cache (so they take no
    part in comparisons) but tensor parallelism must split them too.
    """

    kv_heads: int
    key_dim: int
    value_dim: int
    window: int | None = None
    keep: int = 0
    query_heads: int | None = field(default=None, compare=False)

    @property
    def elements_per_token(self) -> int:
        """Key plus value elements one token adds to this layer (all heads)."""
        return self.kv_heads * (self.key_dim + self.value_dim)


@dataclass(frozen=True)
class ModelLayout:
    """One entry per cache the model makes; None where the cache is not a KV cache
    (recurrent or convolution state: constant size, not counted)."""

    layers: tuple[LayerSpec | None, ...]
    model_type: str | None = None
    max_position_embeddings: int | None = None
    dtype_bytes: int | None = None  # the dtype keys and values arrive in, when probed on a loaded model
    source: str = "config"
    ranks: int = 1  # machines the model is spread over; the layout is what one of them holds
    pipeline: bool = False
    mlp_widths: tuple[int, ...] = ()  # the MLPs' hidden widths (intermediate_size): tensor parallel splits them too
    block_share: float = 1.0  # of the transformer blocks' weights, the part one rank holds
    hidden_size: int | None = None  # the residual stream's width (whole on every rank): prefill activations
    vocab_size: int | None = None  # the logits' width

    @property
    def attention_layers(self) -> list[LayerSpec]:
        return [layer for layer in self.layers if layer is not None]

    def per_rank(self, ranks: int, pipeline: bool = False) -> "ModelLayout":
        """What one of ``ranks`` machines holds when mlx-lm shards the model: the one rule the
        planner and ``mlxkv.distributed`` share. Tensor parallel (``model.shard``) splits every
        layer's KV and query heads and its MLP over the ranks, so each keeps ``kv_heads / ranks``
        heads of every cache and that share of every block's weights; pipeline (``model.model.pipeline``)
        gives each rank whole layers, the first ranks one more when they do not divide (mlx-lm's
        even split): the largest part is what must fit. UserError, naming the sizes that work,
        when the model cannot be split that way."""
        check_ranks(self, ranks, pipeline)
        if ranks == 1:
            return self
        if pipeline:
            largest = math.ceil(len(self.layers) / ranks)
            return dataclasses.replace(self, layers=self.layers[:largest], ranks=ranks, pipeline=True,
                                       block_share=largest / len(self.layers))
        layers = tuple(None if layer is None else dataclasses.replace(
            layer, kv_heads=layer.kv_heads // ranks,
            query_heads=None if layer.query_heads is None else layer.query_heads // ranks)
            for layer in self.layers)
        return dataclasses.replace(self, layers=layers, ranks=ranks, pipeline=False, block_share=1 / ranks,
                                   mlp_widths=tuple(width // ranks for width in self.mlp_widths))

    def describe(self) -> str:
        """e.g. '30 layers: 30 full attention; 3 KV heads x 64'."""
        attn = self.attention_layers
        windows = sorted({layer.window for layer in attn if layer.window is not None})
        n_window = sum(layer.window is not None for layer in attn)
        parts = [f"{len(attn) - n_window} full attention"]
        if n_window:
            parts.append(f"{n_window} sliding window ({', '.join(map(str, windows))} tokens)")
        if len(attn) < len(self.layers):
            parts.append(f"{len(self.layers) - len(attn)} without a KV cache")
        shapes = sorted({(layer.kv_heads, layer.key_dim, layer.value_dim) for layer in attn})
        dims = "; ".join(f"{h} KV head{'s' if h != 1 else ''} x {k}" + (f"/{v}" if v != k else "")
                         for h, k, v in shapes)
        text = f"{len(self.layers)} caches: {', '.join(parts)}; {dims}"
        if self.ranks > 1:
            text += f" (one of {self.ranks} ranks, {'pipeline' if self.pipeline else 'tensor parallel'})"
        return text


def check_ranks(layout: ModelLayout, ranks: int, pipeline: bool = False) -> None:
    """UserError unless ``ranks`` machines can split this model: tensor parallel needs every
    layer's KV and query heads, and the MLP's hidden width, to divide by ``ranks``; pipeline
    needs a layer per rank."""
    if ranks < 1:
        raise UserError(f"the number of ranks must be at least 1, got {ranks}")
    if pipeline:
        if ranks > len(layout.layers):
            raise UserError(f"pipeline parallelism gives each rank whole layers and this model has "
                            f"{len(layout.layers)}; use at most {len(layout.layers)} ranks")
        return
    parts = {(0, n, f"{n} KV heads") for n in {layer.kv_heads for layer in layout.attention_layers}}
    parts |= {(1, n, f"{n} query heads") for n in {layer.query_heads for layer in layout.attention_layers} if n}
    parts |= {(2, n, f"an MLP {n} wide") for n in layout.mlp_widths}
    if all(n % ranks == 0 for _, n, _ in parts):
        return
    common = math.gcd(*(n for _, n, _ in parts))
    sizes = [d for d in range(1, common + 1) if common % d == 0]
    named = [text for _, _, text in sorted(parts)]
    named = ", ".join(named[:-1]) + " and " + named[-1] if len(named) > 1 else named[0]
    raise UserError(f"tensor parallelism splits the attention heads and the MLP over the ranks, and this model has "
                    f"{named}, which do not divide by {ranks}; use {' or '.join(map(str, sizes))} ranks")


# -- from a config dict ---------------------------------------------------------------------
def layout_from_config(config: dict[str, Any]) -> ModelLayout:
    """The layout mlx-lm would give this config.json (a Hugging Face or mlx-lm config dict)."""
    if not isinstance(config, dict):
        raise UserError("the model config must be a JSON object (the contents of config.json)")
    fields = _text_config(config)
    _attention_dims(fields)  # the config must name its layers and heads, whatever builds it
    built = _build_lazily(config)
    if built is not None:
        model, args = built
        kinds = [_cache_kind(c) for c in _template(model)]
        fields = {**fields, **args}
    else:
        kinds = _kinds_from_rules(fields)
    dims, queries = _attention_dims(fields), _query_heads(fields)
    layers = tuple(None if kind is None else LayerSpec(*dims[i], *kind, query_heads=queries[i])
                   for i, kind in enumerate(kinds))
    return ModelLayout(
        layers=layers,
        model_type=fields.get("model_type") or config.get("model_type"),
        max_position_embeddings=_int_or_none(fields.get("max_position_embeddings")),
        source="mlx-lm" if built is not None else "config rules",
        mlp_widths=_mlp_widths(fields),
        **_widths(fields),
    )


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's fields under ``text_config``."""
    text = config.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in config:
        return {**{k: v for k, v in config.items() if k != "text_config"}, **text}
    return dict(config)


def _first(fields: dict[str, Any], *names: str) -> Any:
    for name in names:
        if fields.get(name) is not None:
            return fields[name]
    return None


def _per_layer(value: Any, n_layers: int, name: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_layers
    if len(values) < n_layers:
        raise UserError(f"the config's {name} lists {len(values)} values for {n_layers} layers")
    return [int(v) for v in values]


def _attention_dims(fields: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(kv_heads, key_dim, value_dim) per layer from the usual config.json fields."""
    n_layers = _first(fields, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first(fields, "num_attention_heads", "n_head", "num_heads", "n_heads")
    missing = [name for name, value in (("num_hidden_layers", n_layers), ("num_attention_heads", heads))
               if value is None]
    if missing:
        raise UserError(
            f"the model config lacks {' and '.join(missing)}; pass the model's full config.json"
        )
    n_layers = int(n_layers)
    if fields.get("kv_lora_rank"):  # multi-head latent attention: one shared latent + rope key
        latent, rope = int(fields["kv_lora_rank"]), int(fields.get("qk_rope_head_dim") or 64)
        return [(1, latent, rope)] * n_layers
    heads_per_layer = _per_layer(heads, n_layers, "num_attention_heads")
    kv = _first(fields, "num_key_value_heads", "num_kv_heads", "n_head_kv", "num_key_value_groups")
    if kv is None and fields.get("multi_query"):
        kv = 1
    kv_per_layer = _per_layer(kv, n_layers, "num_key_value_heads") if kv is not None else heads_per_layer
    head_dim = _first(fields, "head_dim", "kv_channels", "attention_head_size")
    if head_dim is None:
        hidden = _first(fields, "hidden_size", "n_embd", "d_model", "model_dim")
        if hidden is None:
            raise UserError("the model config lacks head_dim and hidden_size; pass the model's full config.json")
    dims = []
    for h, kv_h in zip(heads_per_layer, kv_per_layer):
        k_dim = int(head_dim) if head_dim is not None else int(hidden) // h
        v_dim = int(fields.get("v_head_dim") or k_dim)
        dims.append((kv_h, k_dim, v_dim))
    return dims


def _mlp_widths(fields: dict[str, Any]) -> tuple[int, ...]:
    """The dense MLPs' hidden widths (``intermediate_size``, one or per layer)."""
    width = fields.get("intermediate_size")
    values = width if isinstance(width, (list, tuple)) else [width]
    return tuple(sorted({int(v) for v in values if isinstance(v, int) and v > 0}))


def _widths(fields: dict[str, Any]) -> dict[str, int | None]:
    """The residual stream's and the vocabulary's widths, when the config says."""
    return {"hidden_size": _int_or_none(_first(fields, "hidden_size", "n_embd", "d_model", "model_dim")),
            "vocab_size": _int_or_none(fields.get("vocab_size"))}


def _query_heads(fields: dict[str, Any]) -> list[int | None]:
    """Query heads per layer, None where the config does not say."""
    n_layers = _first(fields, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first(fields, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if n_layers is None or heads is None:
        return [None] * int(n_layers or 0)
    return list(_per_layer(heads, int(n_layers), "num_attention_heads"))


def _kinds_from_rules(fields: dict[str, Any]) -> list[tuple[int | None, int] | None]:
    """Cache kinds without mlx-lm: ``layer_types`` if given, else a Gemma-style pattern of
    sliding-window layers, else full attention everywhere (mlx-lm ignores a lone
    ``sliding_window``, as for Mistral, so memory grows with every token)."""
    n_layers = int(_first(fields, "num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    window = _int_or_none(fields.get("sliding_window"))
    layer_types = fields.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) >= n_layers:
        kinds: list[tuple[int | None, int] | None] = []
        for kind in layer_types[:n_layers]:
            if kind in ("full_attention", "attention", "global_attention"):
                kinds.append((None, 0))
            elif kind in ("sliding_attention", "local_attention") and window:
                kinds.append((window, 0))
            else:
                kinds.append(None)
        return kinds
    pattern = _int_or_none(fields.get("sliding_window_pattern"))
    if window and pattern:
        return [(None, 0) if i % pattern == pattern - 1 else (window, 0) for i in range(n_layers)]
    return [(None, 0)] * n_layers


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _build_lazily(config: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]] | None:
    """mlx-lm's model for ``config`` with unevaluated random weights (no memory is allocated),
    and its effective arguments (config plus mlx-lm's defaults); None if mlx-lm cannot build it."""
    if "model_type" not in config:
        return None
    try:
        from mlx_lm.utils import _get_classes
    except ImportError:
        return None
    high, low = mx.random.state[0].tolist()  # building draws random weights: keep the user's stream
    try:
        model_class, args_class = _get_classes(config)
        args = args_class.from_dict(config)
        model = model_class(args)
    except Exception:  # unknown model type, or fields mlx-lm needs and the config lacks
        return None
    finally:
        mx.random.seed((high << 32) | low)  # mx.random.key(seed) is exactly [high, low]
    return model, _effective_args(model)


def parameter_count(config: dict[str, Any]) -> int | None:
    """Parameters of the (unquantized) model ``config`` describes, from mlx-lm's lazily built
    model; None when mlx-lm cannot build it."""
    counts = _parameter_counts(config)
    return None if counts is None else counts[0]


def split_modes(config: dict[str, Any]) -> set[str] | None:
    """How mlx-lm can split this model over ranks: "tensor" (the model has ``shard``) and/or
    "pipeline" (``model.model.pipeline``); None when mlx-lm cannot build it."""
    built = _build_lazily(config)
    return None if built is None else model_split_modes(built[0])


def model_split_modes(model: nn.Module) -> set[str]:
    """How mlx-lm can split a built model, as ``split_modes``."""
    return ({"tensor"} if hasattr(model, "shard") else set()) | (
        {"pipeline"} if hasattr(getattr(model, "model", None), "pipeline") else set())


def block_parameter_share(config: dict[str, Any]) -> float | None:
    """Of the parameters, the share inside the transformer blocks (``layers.N.``): what mlx-lm
    shards over ranks (tensor and pipeline alike); the embeddings, final norm and output head
    stay whole on every rank. None when mlx-lm cannot build the model."""
    counts = _parameter_counts(config)
    return None if counts is None or not counts[0] else counts[1] / counts[0]


def _parameter_counts(config: dict[str, Any]) -> tuple[int, int] | None:
    """(all parameters, those in the transformer blocks) of mlx-lm's lazily built model."""
    import re

    from mlx.utils import tree_flatten

    built = _build_lazily(config)
    if built is None:
        return None
    sizes = [(name, v.size) for name, v in tree_flatten(built[0].parameters())]
    in_blocks = sum(size for name, size in sizes if re.search(r"(?:^|\.)layers\.\d+\.", name))
    return sum(size for _, size in sizes), in_blocks


def _effective_args(model: nn.Module) -> dict[str, Any]:
    """The language model's arguments as mlx-lm filled them in (defaults included)."""
    for owner in (getattr(model, "language_model", None), getattr(model, "model", None), model):
        args = getattr(owner, "args", None) or getattr(owner, "config", None)
        if args is not None and dataclasses.is_dataclass(args):
            fields = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
            if _first(fields, "num_attention_heads", "n_head", "num_heads", "n_heads") is not None:
                return _text_config(fields)
    return {}


def _template(model: nn.Module) -> list[Any]:
    """The caches mlx-lm would make for ``model`` (what ``make_kv_cache`` starts from)."""
    from mlx_lm.models.cache import KVCache

    if hasattr(model, "make_cache"):
        return list(model.make_cache())
    return [KVCache() for _ in model.layers]


def _cache_kind(cache: Any) -> tuple[int | None, int] | None:
    """(window, keep) for mlx-lm's KV caches, None for anything else (mirrors the factory)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    if type(cache) is KVCache:
        return (None, 0)
    if type(cache) is RotatingKVCache:
        return (int(cache.max_size), int(cache.keep))
    return None


# -- from a loaded model --------------------------------------------------------------------
def layout_from_model(model: nn.Module) -> ModelLayout:
    """The exact layout of a loaded model: one token goes through mlx-lm's own caches and the
    shapes (and dtype) of what they store are read off the graph, never evaluated."""
    template = _template(model)
    model(mx.array([[0]]), cache=template)
    args = _effective_args(model)
    queries = _query_heads(args) if args else []
    shards = _tensor_shards(model)
    layers: list[LayerSpec | None] = []
    dtype_bytes = None
    for i, cache in enumerate(template):
        kind = _cache_kind(cache)
        if kind is None or cache.keys is None:
            layers.append(None)
            continue
        _, kv_heads, _, key_dim = cache.keys.shape
        query_heads = queries[i] // shards if i < len(queries) and queries[i] else None
        layers.append(LayerSpec(kv_heads, key_dim, cache.values.shape[-1], *kind, query_heads=query_heads))
        dtype_bytes = dtype_bytes or cache.keys.dtype.size
    return ModelLayout(
        layers=tuple(layers),
        model_type=args.get("model_type"),
        max_position_embeddings=_int_or_none(args.get("max_position_embeddings")),
        dtype_bytes=dtype_bytes,
        source="probe",
        ranks=shards,
        mlp_widths=tuple(width // shards for width in _mlp_widths(args)),
        **_widths(args),
    )


def _tensor_shards(model: nn.Module) -> int:
    """Ranks a tensor-parallel model was split over (``mlxkv.distributed``); 1 otherwise."""
    from mlxkv.distributed import tensor_shards

    return tensor_shards(model)
