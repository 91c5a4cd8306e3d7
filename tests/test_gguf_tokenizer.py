"""Tokenizers from GGUF metadata: llama.cpp's conventions checked on the real vocabulary and on
a SentencePiece vocabulary against llama.cpp's algorithm written out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from mlxkv.errors import UserError
from mlxkv.loading.gguf_file import GGUFFile
from mlxkv.loading.tokenizer import end_of_generation_ids, tokenizer_from_gguf

SPM_SPACE = "\u2581"  # SentencePiece's visible space
MIXED_TEXT = (
    "Hello, world!  Tabs\t\tand\n\nnewlines   runs of spaces. Numbers 1234567 and 3.14159; "
    "unicode: héllo naïve café — “quotes” ü ß; emoji 😀🚀👍🏽; CJK 中文字符 日本語 한국어; "
    "code: def f(x): return x**2  # ok"
)


@pytest.fixture(scope="session")
def smollm_metadata(default_gguf: Path) -> dict[str, Any]:
    return GGUFFile(default_gguf).metadata


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_metadata: dict[str, Any]):
    return tokenizer_from_gguf(smollm_metadata)


@pytest.mark.real_model
def test_round_trip_on_mixed_text(smollm_tokenizer) -> None:
    for text in (MIXED_TEXT, "<|im_start|>user\nhi<|im_end|>\n", "   leading and trailing   ", ""):
        assert smollm_tokenizer.decode(smollm_tokenizer.encode(text)) == text


@pytest.mark.real_model
def test_special_tokens_encode_to_single_ids(smollm_tokenizer) -> None:
    ids = smollm_tokenizer.encode("<|im_start|>assistant\nParis<|im_end|><|endoftext|>")
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert smollm_tokenizer.eos_token == "<|im_end|>" and smollm_tokenizer.eos_token_id == 2
    assert smollm_tokenizer.encode("hi") == smollm_tokenizer.encode("hi", add_special_tokens=False)  # no BOS


@pytest.mark.real_model
def test_digits_are_split_individually(smollm_tokenizer) -> None:
    """llama.cpp's 'smollm' pre-tokenizer (and SmolLM's tokenizer.json) split every digit."""
    tokens = smollm_tokenizer.convert_ids_to_tokens(smollm_tokenizer.encode("in 2024, 1000000 people"))
    assert tokens[:6] == ["in", "Ġ", "2", "0", "2", "4"]
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tokens if any(c.isdigit() for c in t))


@pytest.mark.real_model
def test_converted_dir_gives_mlx_lm_a_chat_tokenizer(real_model_dir: Path) -> None:
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, load

    tokenizer = load(real_model_dir)
    assert tokenizer.eos_token_ids == {2}
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _byte_level_metadata(pre: str) -> dict[str, Any]:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": alphabet, "tokenizer.ggml.token_type": [1] * len(alphabet),
            "tokenizer.ggml.merges": []}


def test_llama3_pre_tokenizer_groups_digits_in_threes() -> None:
    backend = tokenizer_from_gguf(_byte_level_metadata("llama-bpe")).backend_tokenizer
    assert [p for p, _ in backend.pre_tokenizer.pre_tokenize_str("x 1234567")] == ["x", "Ġ", "123", "456", "7"]


# ---- SentencePiece ("llama") vocabularies ----

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Long context generation needs a small key value cache that keeps the important tokens.",
    "Attention sinks and sliding windows bound the memory of a transformer during decoding.",
    "Quantized caches store keys and values in four or eight bits with a scale per group.",
] * 20


@pytest.fixture(scope="module")
def spm_metadata() -> dict[str, Any]:
    """A SentencePiece-style BPE vocabulary (scores = merge order, <0xNN> byte tokens) as a
    llama-family GGUF stores it."""
    trainer = trainers.BpeTrainer(
        vocab_size=400, show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]],
    )
    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="always", split=False)
    trained.train_from_iterator(SPM_CORPUS, trainer)
    tokens = [token for token, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1])]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def llama_cpp_spm_reference(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """llama.cpp's SPM tokenizer, written out plainly: prefix a space, make spaces visible,
    then repeatedly merge the adjacent pair forming the highest-scoring token (leftmost on
    ties); characters outside the vocabulary become <0xNN> byte tokens."""
    vocab = {token: i for i, token in enumerate(tokens)}
    symbols = list((" " + text).replace(" ", SPM_SPACE))
    while True:
        candidates = [(scores[vocab[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))
                      if a + b in vocab]
        if not candidates:
            break
        _, neg_index = max(candidates)
        symbols[-neg_index:-neg_index + 2] = [symbols[-neg_index] + symbols[-neg_index + 1]]
    ids = []
    for symbol in symbols:
        ids += [vocab[symbol]] if symbol in vocab else [vocab[f"<0x{b:02X}>"] for b in symbol.encode()]
    return ids


@pytest.mark.parametrize("text", [
    "The quick brown fox sleeps.",
    "  two leading spaces and a tab\there",
    "keys, values & caches: 4-bit or 8-bit?",
    "unknown letters: ñ 中文 😀",
    "sliding windows bound memory",
])
def test_sentencepiece_vocab_matches_llama_cpp_algorithm(spm_metadata, text: str) -> None:
    tokenizer = tokenizer_from_gguf(spm_metadata)
    ids = tokenizer.encode(text)
    assert ids[0] == 1  # llama.cpp adds BOS for SentencePiece vocabularies by default
    assert ids[1:] == llama_cpp_spm_reference(text, spm_metadata["tokenizer.ggml.tokens"],
                                              spm_metadata["tokenizer.ggml.scores"])
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_eos_is_never_appended_and_end_of_turn_stops(spm_metadata) -> None:
    """Gemma 3 GGUFs set add_eos_token; a prompt must not end with <eos>. llama.cpp also stops
    on end-of-turn control tokens the file does not name as such."""
    tokens = [*spm_metadata["tokenizer.ggml.tokens"], "<end_of_turn>"]
    metadata = {**spm_metadata, "tokenizer.ggml.add_eos_token": True, "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": [*spm_metadata["tokenizer.ggml.scores"], 0.0],
                "tokenizer.ggml.token_type": [*spm_metadata["tokenizer.ggml.token_type"], 3]}
    assert tokenizer_from_gguf(metadata).encode("The fox")[-1] != 2
    assert end_of_generation_ids(metadata) == [2, len(tokens) - 1]
    assert end_of_generation_ids({**metadata, "tokenizer.ggml.eot_token_id": 1}) == [2, 1]


def test_unsupported_tokenizer_kinds_are_user_errors(spm_metadata) -> None:
    with pytest.raises(UserError, match="cannot build the GGUF's tokenizer: .*'bert'"):
        tokenizer_from_gguf({**spm_metadata, "tokenizer.ggml.model": "bert"})
    with pytest.raises(UserError, match="pre-tokenizer 'made-up' is not supported"):
        tokenizer_from_gguf(_byte_level_metadata("made-up"))
    with pytest.raises(UserError, match="has no tokenizer"):
        tokenizer_from_gguf({})
