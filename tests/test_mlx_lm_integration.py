"""Our caches inside unmodified mlx-lm: its model zoo, generate loop, prompt caches and
speculative decoding. References are mlx-lm's own caches on the same tiny models."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm import generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import ArraysCache, make_prompt_cache, save_prompt_cache
from mlx_lm.sample_utils import make_sampler

import mlxkv
from conftest import random_tokens as tokens
from conftest import run_logits
from mlxkv.caches import QuantizedCache, SinkWindowCache
from mlxkv.loading.tiny import tiny_model

# head_dim 64 everywhere so every group size applies
ARCH_OVERRIDES = {
    "llama": {"head_dim": 64},
    "qwen2": {"hidden_size": 256},
    "qwen3": {"head_dim": 64},
    "phi3": {"hidden_size": 256},
    "gemma3_text": {"head_dim": 64, "query_pre_attn_scalar": 64},
    "gpt_oss": {"head_dim": 64},
    "lfm2": {"hidden_size": 256, "block_dim": 256, "block_ff_dim": 256},
}
ARCHS = list(ARCH_OVERRIDES)


def model_for(arch):
    return tiny_model(arch, **ARCH_OVERRIDES[arch])


def kl(ref, other):
    lp = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    lq = other - mx.logsumexp(other, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(-1).mean().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_full_precision_matches_mlx_lm_caches(arch):
    model = model_for(arch)
    toks = tokens(76)
    ref = run_logits(model, make_prompt_cache(model), toks)
    ours = run_logits(model, mlxkv.make_kv_cache(model, "fp16"), toks)
    assert mx.abs(ours - ref).max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_8bit_cache_is_close_to_full_precision(arch):
    model = model_for(arch)
    toks = tokens(76)
    ref = run_logits(model, make_prompt_cache(model), toks)
    ours = run_logits(model, mlxkv.make_kv_cache(model, mlxkv.KVConfig(bits=8, residual=4)), toks)
    assert kl(ref, ours) < 1e-3
    # and 8-bit is better than 2-bit, or the comparison is not measuring anything
    low = run_logits(model, mlxkv.make_kv_cache(model, mlxkv.KVConfig(bits=2, residual=4)), toks)
    assert kl(ref, ours) < kl(ref, low)


def test_layout_follows_the_models_own_make_cache():
    gemma = model_for("gemma3_text")
    caches = mlxkv.make_kv_cache(gemma, "q4")
    assert [type(c) for c in caches] == [SinkWindowCache, QuantizedCache] * 2
    run_logits(gemma, caches, tokens(20), chunks=(20,))
    assert [c.size() for c in caches] == [8, 20] * 2  # the model's own window: 8 tokens, no sinks
    hybrid = model_for("lfm2")
    caches = mlxkv.make_kv_cache(hybrid, "q4")
    assert [type(c) for c in caches] == [ArraysCache, QuantizedCache] * 2
    llama = model_for("llama")
    assert all(type(c) is SinkWindowCache for c in mlxkv.make_kv_cache(llama, mlxkv.KVConfig(bits=4, max_kv=64)))


@pytest.mark.parametrize("config", ["fp16", "q8"])
def test_unmodified_mlx_lm_generate_gives_the_same_greedy_tokens(config):
    model = model_for("llama")
    prompt = tokens(40).tolist()

    def greedy(cache):
        return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=12, prompt_cache=cache)]

    ref = greedy(make_prompt_cache(model))
    ours = greedy(mlxkv.make_kv_cache(model, config))
    if config == "fp16":
        assert ours == ref
    else:  # quantization may flip a near-tie late; the start must agree
        assert ours[:4] == ref[:4]


def test_sink_window_matches_mlx_lm_rotating_cache_token_by_token():
    """mlx-lm's RotatingKVCache(keep=4) and our full-precision window keep the same tokens."""
    from mlx_lm.models.cache import RotatingKVCache

    model = model_for("llama")
    toks = tokens(60)
    ref_cache = [RotatingKVCache(max_size=20, keep=4) for _ in model.layers]
    ours_cache = mlxkv.make_kv_cache(model, mlxkv.KVConfig(max_kv=20, sinks=4))
    ref = run_logits(model, ref_cache, toks, chunks=(1,) * 60)
    ours = run_logits(model, ours_cache, toks, chunks=(1,) * 60)
    assert mx.abs(ours - ref).max().item() < 1e-4


def test_endless_generation_keeps_kv_bytes_constant():
    model = model_for("llama")
    cache = mlxkv.make_kv_cache(model, mlxkv.KVConfig(bits=4, max_kv=48, sinks=4, residual=8))
    sizes = {}
    for step, _ in zip(range(1, 481), generate_step(tokens(8), model, max_tokens=480, prompt_cache=cache)):
        if step in (48, 480):
            sizes[step] = sum(c.nbytes for c in cache)
    assert sizes[48] == sizes[480] > 0


@pytest.mark.parametrize("config", [mlxkv.KVConfig(bits=4, residual=8), mlxkv.KVConfig(bits=8, max_kv=40, residual=8)])
def test_prompt_cache_round_trip_is_bit_exact(tmp_path, config):
    model = model_for("llama")
    toks = tokens(70)
    cache = mlxkv.make_kv_cache(model, config)
    run_logits(model, cache, toks[:50], chunks=(16, 16, 16, 1, 1))
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(path), cache)
    restored = mlxkv.load_prompt_cache(path)
    assert [type(c) for c in restored] == [type(c) for c in cache]
    for a, b in zip(cache, restored):
        assert a.offset == b.offset and a.meta_state == b.meta_state
        sa, sb = a.state, b.state
        for key in ("keys", "values"):
            for x, y in zip(sa[key], sb[key]):
                assert x.dtype == y.dtype and mx.array_equal(x, y)
    # both continue identically
    cont_a = run_logits(model, cache, toks[50:], chunks=(1,) * 20)
    cont_b = run_logits(model, restored, toks[50:], chunks=(1,) * 20)
    assert mx.array_equal(cont_a, cont_b)


def test_saved_4bit_cache_is_about_a_quarter_of_fp16(tmp_path):
    keys = mx.random.normal((1, 2, 1024, 64)).astype(mx.float16)  # what a Mac's model produces
    files = {}
    for name in ("fp16", "q4"):
        cache = [QuantizedCache(mlxkv.KVConfig.from_name(name)) for _ in range(4)]
        for c in cache:
            c.update_and_fetch(keys, keys)
        path = tmp_path / f"{name}.safetensors"
        mlxkv.save_prompt_cache(path, cache)
        files[name] = path.stat().st_size
    ratio = files["q4"] / files["fp16"]
    # 4.5/16 = 0.281, plus 32 residual tokens and 4 sinks in 16-bit:
    # (988 * 4.5 + 36 * 16) / (1024 * 16) = 0.307, and the file's headers
    assert 0.29 < ratio < 0.32


def test_corrupt_prompt_cache_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(mlxkv.UserError, match="not a readable prompt cache"):
        mlxkv.load_prompt_cache(bad)
    assert bad.read_bytes() == b"not a safetensors file"  # untouched


@pytest.mark.parametrize("config", [mlxkv.KVConfig(), mlxkv.KVConfig(max_kv=60, sinks=4)])
def test_trim_then_continue_equals_never_having_seen_the_tokens(config):
    model = model_for("llama")
    toks = tokens(40)
    other = tokens(10, seed=7)
    a = mlxkv.make_kv_cache(model, config)
    run_logits(model, a, toks, chunks=(16, 16, 8))
    assert all(c.is_trimmable() for c in a)
    for c in a:
        assert c.trim(5) == 5
    out_a = run_logits(model, a, other, chunks=(1,) * 10)
    b = mlxkv.make_kv_cache(model, config)
    run_logits(model, b, toks[:35], chunks=(16, 16, 3))
    out_b = run_logits(model, b, other, chunks=(1,) * 10)
    assert mx.abs(out_a - out_b).max().item() < 1e-4


def test_trim_drops_the_newest_tokens_of_a_quantized_cache():
    cache = QuantizedCache(mlxkv.KVConfig(bits=4, residual=4))
    for _ in range(10):
        cache.update_and_fetch(mx.ones((1, 2, 1, 64)), mx.ones((1, 2, 1, 64)))
    assert cache.trim(6) == 6  # 4 from the residual tier, 2 from the packed store
    assert cache.offset == cache.size() == 4 and cache.is_trimmable()
    window = SinkWindowCache(mlxkv.KVConfig(bits=4, max_kv=12, sinks=2, residual=2))
    for _ in range(30):
        window.update_and_fetch(mx.ones((1, 2, 1, 64)), mx.ones((1, 2, 1, 64)))
    assert not window.is_trimmable()  # evicted tokens cannot come back


def test_speculative_decoding_with_our_caches():
    model = model_for("llama")
    draft = model_for("llama")
    prompt = tokens(20).tolist()
    plain = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=10, prompt_cache=mlxkv.make_kv_cache(model, "fp16"))]
    cache = mlxkv.make_kv_cache(model, "fp16") + mlxkv.make_kv_cache(draft, "fp16")
    from mlx_lm.generate import speculative_generate_step

    spec = [int(t) for t, _, _ in speculative_generate_step(
        mx.array(prompt), model, draft, num_draft_tokens=3, max_tokens=10, prompt_cache=cache
    )]
    assert spec == plain


def test_mlx_lm_generate_text_in_text_out_with_a_quantized_window():
    """mlx_lm.generate end to end on a tiny model with a word-level tokenizer."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = model_for("llama")

    tok = Tokenizer(models.WordLevel({chr(65 + i % 26) + str(i): i for i in range(256)}, unk_token="A0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="A0")
    wrapper = TokenizerWrapper(hf)
    text = generate(
        model, wrapper, "B1 C2 D3 E4 F5", max_tokens=30,
        prompt_cache=mlxkv.make_kv_cache(model, mlxkv.KVConfig(bits=4, max_kv=16, residual=4)),
        sampler=make_sampler(temp=0.0),
    )
    assert isinstance(text, str) and len(text.split()) > 5


def test_hook_reaches_models_imported_before_and_after_mlxkv():
    code = (
        "import mlx_lm.models.llama as before\n"
        "import mlxkv\n"
        "from mlxkv.attention import hook\n"
        "import mlx_lm.models.starcoder2 as after\n"
        "assert before.scaled_dot_product_attention is hook.scaled_dot_product_attention\n"
        "assert after.scaled_dot_product_attention is hook.scaled_dot_product_attention\n"
        "hook.uninstall()\n"
        "import mlx_lm.models.base as base\n"
        "assert before.scaled_dot_product_attention is base.scaled_dot_product_attention is hook._original\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_model_that_bypasses_the_hook_gets_a_clear_error():
    cache = QuantizedCache(mlxkv.KVConfig(bits=4))
    keys, _ = cache.update_and_fetch(mx.ones((1, 2, 3, 64)), mx.ones((1, 2, 3, 64)))
    with pytest.raises(AttributeError, match="does not go through"):
        keys.shape


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bits": 7}, "bits=7 is not supported"),
        ({"bits": 4, "group_size": 48}, "group size 48"),
        ({"max_kv": 4, "sinks": 4}, "larger than the sinks"),
        ({"bits": 4, "max_kv": 32, "residual": 40}, "residual=40"),
        ({"backend": "mlx-lm", "bits": 4, "max_kv": 64}, "cannot hold a window"),
        ({"sinks": -1}, "sinks must be >= 0"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(mlxkv.UserError, match=message):
        mlxkv.KVConfig(**kwargs)


def test_group_size_must_divide_head_dim():
    model = tiny_model("llama")  # head_dim 16
    with pytest.raises(mlxkv.UserError, match="does not divide the model's head_dim 16"):
        mlxkv.make_kv_cache(model, "q4")


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(mlxkv.UserError, match="known: fp16, q8"):
        mlxkv.KVConfig.from_name("q7")


def test_per_layer_bits_reach_the_right_layers():
    model = tiny_model("llama", head_dim=64, num_hidden_layers=4)
    caches = mlxkv.make_kv_cache(model, mlxkv.KVConfig(bits=4, layer_bits=((0, 8), (-1, 16))))
    assert [c.config.key_bits for c in caches] == [8, 4, 4, None]
    run_logits(model, caches, tokens(40), chunks=(40,))
    assert [getattr(c.key_store, "bits", None) for c in caches] == [8, 4, 4, None]


@pytest.mark.parametrize("spec,message", [("0:8,x:4", "LAYER:BITS"), ("3", "LAYER:BITS"), ("0:7", "bits=7 is not supported")])
def test_bad_bit_maps_are_clear_errors(spec, message):
    from mlxkv.config import parse_layer_bits

    with pytest.raises(mlxkv.UserError, match=message):
        mlxkv.KVConfig(bits=4, layer_bits=parse_layer_bits(spec))


def test_bit_map_layer_out_of_range():
    model = tiny_model("llama", head_dim=64)  # 2 layers
    with pytest.raises(mlxkv.UserError, match="layer 5 is out of range"):
        mlxkv.make_kv_cache(model, mlxkv.KVConfig(bits=4, layer_bits=((5, 8),)))


def test_adaptive_precision_keeps_generating_the_same_tokens_up_to_the_switch():
    model = model_for("llama")
    prompt = tokens(20)
    config = mlxkv.KVConfig(adaptive=((60, 8), (100, 4)), residual=4)
    cache = mlxkv.make_kv_cache(model, config)
    ours = [int(t) for t, _ in generate_step(prompt, model, max_tokens=100, prompt_cache=cache)]
    ref = [int(t) for t, _ in generate_step(prompt, model, max_tokens=100, prompt_cache=make_prompt_cache(model))]
    assert ours[:40] == ref[:40]  # positions < 60: full precision, identical
    assert all(c.key_store.bits == 4 for c in cache)  # converted in place twice


def test_adaptive_steps_convert_in_place():
    cache = QuantizedCache(mlxkv.KVConfig(adaptive=((4, 8), (8, 4)), residual=0))
    x = mx.random.normal((1, 2, 1, 64))
    bits = []
    for _ in range(10):
        cache.update_and_fetch(x, x)
        bits.append(getattr(cache.key_store, "bits", None))
    assert bits == [None] * 4 + [8] * 4 + [4] * 2


def test_bad_adaptive_steps():
    with pytest.raises(mlxkv.UserError, match="increasing token counts"):
        mlxkv.KVConfig(adaptive=((4096, 4), (1024, 8)))
    with pytest.raises(mlxkv.UserError, match="steps set the bits"):
        mlxkv.KVConfig(adaptive=((1024, 8),), bits=4)
