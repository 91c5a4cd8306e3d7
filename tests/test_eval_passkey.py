"""mlxkv eval passkey: prompts built as asked, answers read strictly, and the real model
finding a key at full precision but not once a window has evicted it."""

from __future__ import annotations

import pytest

from mlxkv.errors import UserError
from mlxkv.eval.passkey import FILLER, evaluate_passkey, found, make_prompt, pass_key


def test_found_reads_the_first_number_only():
    assert found(" 12345.", "12345")
    assert found("The key is 12345, yes", "12345")
    assert not found(" 1234", "12345")
    assert not found(" 123456", "12345")
    assert not found(" 54321 or 12345", "12345")
    assert not found(" a magical key", "12345")


def test_keys_are_five_digits_and_stable():
    keys = {pass_key(0, 512, d, t) for d in (0, 0.5, 1) for t in range(3)}
    assert all(len(k) == 5 and k.isdigit() for k in keys)
    assert len(keys) > 1
    assert pass_key(0, 512, 0.5, 1) == pass_key(0, 512, 0.5, 1)


@pytest.mark.real_model
def test_prompt_length_and_depth(real_model):
    _, tokenizer = real_model
    unit = len(tokenizer.encode(" " + FILLER))
    for length in (256, 1024):
        positions = []
        for depth in (0.0, 0.5, 1.0):
            prompt = make_prompt(tokenizer, length, depth, "24680")
            assert length - 2 * unit <= len(prompt.tokens) <= length
            text = tokenizer.decode(prompt.tokens)
            assert text.count("24680") == 2  # "The pass key is K. Remember it. K is the pass key."
            assert text.rstrip().endswith("The pass key is")
            positions.append(text.index("24680") / len(text))
        assert positions[0] < 0.35 < positions[1] < 0.65 < positions[2]
    with pytest.raises(UserError, match="too short"):
        make_prompt(tokenizer, 40, 0.5, "24680")


@pytest.mark.real_model
def test_real_model_finds_the_key_at_full_precision(real_model):
    model, tokenizer = real_model
    rows = evaluate_passkey(model, tokenizer, ["fp16", "fp16:max_kv=64"], lengths=[256],
                            depths=[0.5], trials=1)
    by_config = {r["config"]: r for r in rows}
    assert by_config["fp16"]["accuracy"] == 1.0
    assert by_config["fp16"]["accuracy_ref"] == 1.0  # mlx-lm's own cache, on the same prompt
    # A 64-token window has evicted the key (and the instruction): the answer cannot hold it.
    assert by_config["fp16:max_kv=64"]["accuracy"] == 0.0
