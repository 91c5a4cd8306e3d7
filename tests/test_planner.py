"""The planner's bytes against the real caches' ``nbytes``, and its plans and recommendations.

References: the caches themselves (run through tiny models of several architectures,
with prefills, decode steps and odd chunkings), mlx-lm's own cache layouts, and the
numbers worked out by hand in the issue (Llama-3-8B)."""

from __future__ import annotations

import functools

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import mlxkv
from mlxkv.config import KVConfig
from mlxkv.errors import UserError
from mlxkv.loading.tiny import TINY_ARCHS, tiny_config, tiny_model
from mlxkv.memory.layout import LayerSpec, ModelLayout, layout_from_config, layout_from_model
from mlxkv.memory.cache_bytes import kv_bytes_per_token, predict_kv_bytes, predict_layer_bytes, stored_bytes_per_token
from mlxkv.memory.peak import predict_peak
from mlxkv.memory.planner import candidate_configs, max_context, plan, recommend, recommend_config

# head_dim 64 or 128 so that every group size tiles it
ARCHS = {
    "llama": {"head_dim": 64},  # GQA: 4 query heads over 2 KV heads
    "qwen3": {"head_dim": 128},  # head_dim != hidden / heads
    "gemma3_text": {"head_dim": 64, "query_pre_attn_scalar": 64},  # sliding-window layers (8 tokens)
    "gpt_oss": {"head_dim": 64},  # sliding + full layers, attention sinks
    "lfm2": {"hidden_size": 256, "block_dim": 256},  # convolution layers without a KV cache
}
CONFIGS = {
    "fp16": KVConfig(),
    "q8": KVConfig.from_name("q8"),
    "q4": KVConfig.from_name("q4"),
    "k8v4": KVConfig.from_name("k8v4"),
    "q4-g32-nores": KVConfig(bits=4, group_size=32, residual=0),
    "q4-kivi": KVConfig.from_name("q4-kivi"),  # keys per channel: stored a group of tokens at a time
    "mxfp4": KVConfig.from_name("mxfp4"),  # one 8-bit scale per 32, no bias
    "nvfp4": KVConfig.from_name("nvfp4"),
    "per-layer-bits": KVConfig(bits=4, layer_bits=((0, 8), (-1, 16))),
    "q4-window": KVConfig(bits=4, max_kv=100),
    "kivi-window-from-40": KVConfig(bits=4, group_size=32, per_channel_keys=True, max_kv=150, quantized_kv_start=40),
    "fp16-window": KVConfig(max_kv=300, sinks=4),
    "q4-from-90": KVConfig(bits=4, quantized_kv_start=90),
    "h2o": KVConfig(max_kv=120, evict="h2o"),
    "q4-h2o": KVConfig(bits=4, rotate=True, max_kv=200, evict="h2o", residual=40),
    "adaptive": KVConfig(adaptive=((30, 8), (100, 4))),
    "kivi-rot": KVConfig.from_name("q4-kivi-rot"),  # the default: Gemma's window layers 8-bit
    "kivi-rot-window-layers-16": KVConfig.from_name("q4-kivi-rot", window_bits=16),
    "kivi-rot-window-layers-same": KVConfig.from_name("q4-kivi-rot", window_bits=None),
    "q4-window-layers-8": KVConfig(bits=4, window_bits=8),
    "k3v2-kivi-rot": KVConfig.from_name("k3v2-kivi-rot"),
    "mxfp8": KVConfig.from_name("mxfp8"),
    "mlxlm-fp16": KVConfig.from_name("mlxlm-fp16"),
    "mlxlm-q4": KVConfig.from_name("mlxlm-q4"),
    "mlxlm-window": KVConfig(backend="mlx-lm", max_kv=100),
}
CORE = ("fp16", "q4", "q4-kivi", "q4-window", "q4-h2o", "mlxlm-q4")
"""What every architecture runs; llama (GQA) and gemma3 (sliding windows) run every config."""
SCHEDULES = {
    "prefill-decode": [250] + [1] * 8,  # decode crosses a 256-token growth step
    "chunks-16": [16] * 18,
    "ragged": [5, 300, 7, 1, 250, 1],  # steps that leave partly filled growth steps
}


PAIRS = [
    (arch, name) for arch in ARCHS for name, config in CONFIGS.items()
    if (arch in ("llama", "gemma3_text") or name in CORE)
    # mlx-lm's quantized attention cannot take gpt-oss's attention sinks
    and not (arch == "gpt_oss" and config.backend == "mlx-lm" and config.bits)
]


@functools.lru_cache(maxsize=None)
def model_for(arch):
    return tiny_model(arch, **ARCHS[arch])


def run_chunks(model, cache, chunks, batch=1):
    tokens = mx.zeros((batch, sum(chunks)), dtype=mx.int32)
    start = 0
    for n in chunks:
        model(tokens[:, start:start + n], cache=cache)
        mx.eval([c.state for c in cache])
        start += n


def measured(cache, layout):
    """nbytes of the KV caches (recurrent state layers are not the planner's business)."""
    return [c.nbytes if spec is not None else 0 for c, spec in zip(cache, layout.layers)]


@pytest.mark.parametrize("arch, config_name", PAIRS)
def test_predicted_bytes_equal_nbytes(arch, config_name):
    model, config = model_for(arch), CONFIGS[config_name]
    layout = layout_from_model(model)
    for schedule, chunks in SCHEDULES.items():
        cache = mlxkv.make_kv_cache(model, config)
        run_chunks(model, cache, chunks)
        predicted = predict_layer_bytes(config, layout, chunks=chunks, dtype_bytes=layout.dtype_bytes)
        assert predicted == measured(cache, layout), f"{arch} {config_name} {schedule}"
        assert sum(predicted) > 0


@pytest.mark.parametrize("config_name", ["fp16", "q4", "kivi-rot", "kivi-rot-window-layers-16", "q4-window",
                                         "fp16-window", "h2o", "q4-h2o", "mlxlm-fp16", "mlxlm-q4", "mlxlm-window"])
def test_bytes_per_token_is_what_a_long_cache_grows_by(config_name):
    """On a model with sliding-window layers, bytes per token is what the real caches grow by
    at long context (the window layers and a max_kv window stop growing), and bits per
    element still counts every layer's stored precision."""
    model, config = model_for("gemma3_text"), CONFIGS[config_name]
    layout = layout_from_model(model)
    cache = mlxkv.make_kv_cache(model, config)
    run_chunks(model, cache, [256] * 2)
    before = sum(measured(cache, layout))
    run_chunks(model, cache, [256] * 2)
    grown = sum(measured(cache, layout)) - before
    assert kv_bytes_per_token(config, layout, layout.dtype_bytes) * 512 == grown
    assert any(spec.window for spec in layout.attention_layers)
    assert stored_bytes_per_token(config, layout, layout.dtype_bytes) > kv_bytes_per_token(config, layout, layout.dtype_bytes)
    if config_name in ("fp16", "mlxlm-fp16"):  # every layer's elements at the model's dtype, as the plan's bits
        elements = sum(spec.elements_per_token for spec in layout.attention_layers)
        assert stored_bytes_per_token(config, layout, layout.dtype_bytes) == elements * layout.dtype_bytes
        row, = plan(layout, 1024, 10**12, 0, {config_name: config}, dtype_bytes=layout.dtype_bytes)
        assert row.bits_per_element == 8 * layout.dtype_bytes


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("config_name", ["fp16", "q4", "k8v4", "mlxlm-fp16", "mlxlm-q4"])
def test_batch_and_dtype(dtype, config_name):
    """Batch 2, and a 16-bit model (a Mac's dtype): dense bytes and mlx-lm's scales follow it."""
    model = tiny_model("llama", head_dim=64)
    model.set_dtype(dtype)
    layout = layout_from_model(model)
    assert layout.dtype_bytes == dtype.size
    config = CONFIGS[config_name]
    chunks = [40, 1, 1, 100]
    cache = mlxkv.make_kv_cache(model, config)
    run_chunks(model, cache, chunks, batch=2)
    assert predict_layer_bytes(config, layout, chunks=chunks, dtype_bytes=dtype.size, batch=2) == measured(cache, layout)


@pytest.mark.parametrize("config_name", ["q4-window", "mlxlm-window", "kivi-window-from-40", "h2o", "q4-h2o",
                                         "adaptive", "q4-kivi", "q4-from-90"])
def test_one_token_at_a_time(config_name):
    """``tokens=`` (the closed form for tokens arriving one by one) against a real decode."""
    model = tiny_model("llama", head_dim=64)
    layout = layout_from_model(model)
    config = CONFIGS[config_name]
    cache = mlxkv.make_kv_cache(model, config)
    for n in range(1, 301):
        run_chunks(model, cache, [1])
        if n in (1, 31, 33, 41, 97, 120, 121, 257, 300):
            assert predict_layer_bytes(config, layout, n, dtype_bytes=4) == measured(cache, layout), n
            if config.backend == "mlxkv":
                filled = predict_layer_bytes(config, layout, n, dtype_bytes=4, allocated=False)
                assert filled == [c.filled_nbytes if s else 0 for c, s in zip(cache, layout.layers)], n


LLAMA3_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
}


def test_llama3_8b_numbers_from_the_issue():
    layout = layout_from_config(LLAMA3_8B)
    assert len(layout.layers) == 32 and set(layout.layers) == {LayerSpec(8, 128, 128)}
    assert kv_bytes_per_token("fp16", layout) == 131_072
    assert kv_bytes_per_token("q4", layout) == 36_864  # 4 bits + 2 x 16 bits per 64 elements
    assert predict_kv_bytes("fp16", layout, 32 * 1024) == 4 * 1024**3
    # 4-bit: packed tokens plus the 32 newest and the 4 sinks in 16-bit, the store in whole
    # 256-token steps (32,732 packed tokens take 32,768 slots)
    assert predict_kv_bytes("q4", layout, 32 * 1024) == 36_864 * 32 * 1024 + (32 + 4) * 131_072
    assert predict_kv_bytes("q4", layout, 32 * 1024, allocated=False) == 36_864 * (32 * 1024 - 36) + 36 * 131_072


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layout_from_config_matches_the_loaded_model(arch):
    """What the config says (mlx-lm built lazily) equals a probe of the real model's caches."""
    config = tiny_config(arch)
    assert layout_from_config(config).layers == layout_from_model(tiny_model(arch)).layers


def test_layout_leaves_the_random_stream_alone():
    mx.random.seed(5)
    expected = mx.random.uniform(shape=(4,))
    mx.random.seed(5)
    layout_from_config(LLAMA3_8B)
    assert mx.array_equal(mx.random.uniform(shape=(4,)), expected)


def test_layout_rules_without_mlx_lm():
    """Unknown architectures: layer_types, a Gemma-style pattern, MLA, text_config, GQA lists."""
    base = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512}
    typed = layout_from_config({**base, "model_type": "unknown-a", "sliding_window": 128,
                                "layer_types": ["sliding_attention", "full_attention", "mamba", "full_attention"]})
    assert typed.source == "config rules"
    assert typed.layers == (LayerSpec(2, 64, 64, 128), LayerSpec(2, 64, 64), None, LayerSpec(2, 64, 64))
    pattern = layout_from_config({**base, "model_type": "unknown-b", "sliding_window": 64, "sliding_window_pattern": 2})
    assert [s.window for s in pattern.layers] == [64, None, 64, None]
    mla = layout_from_config({**base, "model_type": "unknown-c", "kv_lora_rank": 512, "qk_rope_head_dim": 64})
    assert set(mla.layers) == {LayerSpec(1, 512, 64)}
    nested = layout_from_config({"model_type": "unknown-d", "text_config": {**base, "head_dim": 128}})
    assert set(nested.layers) == {LayerSpec(2, 128, 128)}
    per_layer = layout_from_config({**base, "model_type": "unknown-e", "num_key_value_heads": [1, 2, 3, 4]})
    assert [s.kv_heads for s in per_layer.layers] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="lacks num_hidden_layers"):
        layout_from_config({"model_type": "llama"})


def test_mla_layout_matches_mlx_lm():
    """DeepSeek's latent attention caches one latent and one rope key per token."""
    config = {
        "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 16, "v_head_dim": 16,
        "qk_nope_head_dim": 16, "first_k_dense_replace": 1, "max_position_embeddings": 256,
    }
    import importlib

    module = importlib.import_module("mlx_lm.models.deepseek_v3")
    model = module.Model(module.ModelArgs.from_dict(config))
    assert layout_from_config(config).layers == layout_from_model(model).layers == (LayerSpec(1, 32, 16),) * 2


def test_max_context_is_the_boundary():
    layout = layout_from_config(LLAMA3_8B)
    weights, budget = 16 * 1024**3, 24 * 1024**3
    for name in ("fp16", "q4", "mlxlm-q8"):
        config = KVConfig.from_name(name)
        n = max_context(config, layout, budget, weights)
        assert predict_peak(config, layout, n, weights).peak <= budget < predict_peak(config, layout, n + 1, weights).peak
        # the peak is more than weights + KV: the boundary sits below where the cache alone would fill the room
        assert weights + predict_kv_bytes(config, layout, n + 1) < budget
    assert max_context(KVConfig(bits=4, max_kv=4096), layout, budget, weights) is None  # a window always fits
    assert max_context(KVConfig(), layout, budget, budget + 1) == 0  # the weights alone do not fit


def test_plan_rows_and_recommendation():
    layout = layout_from_config(LLAMA3_8B)
    weights = 16 * 1024**3
    fp16_peak = predict_peak("fp16", layout, 32768, weights).peak
    budget = fp16_peak - 1  # fp16 misses by one byte
    rows = plan(layout, 32768, budget, weights, candidate_configs())
    by_name = {r.config: r for r in rows}
    assert not by_name["fp16"].fits and by_name["q8"].fits
    assert by_name["fp16"].bits_per_element == 16 and by_name["q4"].bits_per_element == 4.5
    assert by_name["q8"].kv_bytes_per_token == 69_632  # 8 bits + 2 x 16 bits per 64 elements
    name, reason = recommend(rows, budget, 32768)
    # the choice fits, and every scheme measured better than it does not
    from mlxkv.schemes import SCHEMES

    chosen = SCHEMES[name].measured.kld
    assert by_name[name].fits and "would need" in reason
    better = [r for r in rows if SCHEMES[r.config].measured and SCHEMES[r.config].measured.kld < chosen]
    assert better and not any(r.fits for r in better)
    assert recommend(plan(layout, 32768, weights, weights, candidate_configs()), weights, 32768) is None


def test_recommendation_skips_baselines_and_ranks_unknown_names_by_bits():
    layout = ModelLayout((LayerSpec(2, 64, 64),))
    rows = plan(layout, 1000, 10**9, 0, candidate_configs(["mlxlm-fp16", "q4:residual=0", "q8-nores"]))
    assert recommend(rows, 10**9, 1000)[0] == "q8-nores"  # neither is measured: more bits first
    rows = plan(layout, 1000, 10**9, 0, candidate_configs(["mlxlm-fp16", "q8-nores", "q4-nores"]))
    assert recommend(rows, 10**9, 1000)[0] == "q4-nores"  # a measured scheme before unmeasured ones


def test_recommend_config_for_a_loaded_model_and_a_config():
    model = tiny_model("llama", head_dim=64)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    layout = layout_from_model(model)
    fp16_peak = predict_peak("fp16", layout, 2000, weights, dtype_bytes=4).peak
    name, reason = recommend_config(model, 2000, fp16_peak)
    assert name == "fp16" and "2,000 tokens" in reason
    name, _ = recommend_config(model, 2000, fp16_peak - 1)
    assert name != "fp16" and predict_peak(name, layout, 2000, weights, dtype_bytes=4).peak < fp16_peak
    with pytest.raises(UserError, match="no KV configuration fits"):
        recommend_config(model, 10**6, fp16_peak)
    with pytest.raises(UserError, match="cannot read the memory budget"):
        recommend_config(tiny_config("llama"), 100, "8 parsecs")
    assert recommend_config(LLAMA3_8B, 8192, "24GB")[0] == "fp16"


@pytest.mark.parametrize("store", [
    ("dense", None, False, "affine"), ("q4", 4, False, "affine"), ("q3", 3, False, "affine"),
    ("q4 per-channel", 4, True, "affine"), ("mxfp4", 4, False, "mxfp4"), ("nvfp4", 4, False, "nvfp4"),
    ("mxfp8", 8, False, "mxfp8"),
], ids=lambda s: s[0])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_slot_bytes_price_what_the_buffers_hold(store, dtype):
    """One count for the planner and the allocator: nbytes == capacity x slot_bytes."""
    from mlxkv.caches.storage import make_store
    from mlxkv.config import MICROSCALING

    _, bits, per_channel, mode = store
    group = MICROSCALING[mode][1] if mode in MICROSCALING else 64
    s = make_store(bits, group, None, per_channel=per_channel, mode=mode)
    s.write(0, mx.ones((2, 3, 64 * 5, 128), dtype=dtype))
    assert s.capacity == 512 and s.nbytes == s.capacity * s.slot_bytes(2 * 3, 128, dtype.size)
