"""A Hugging Face fast tokenizer rebuilt from a GGUF's ``tokenizer.ggml.*`` metadata.

A GGUF carries no tokenizer.json, only the vocabulary, merges, token types and special
ids under llama.cpp's key names. Writing them back as tokenizer.json and
tokenizer_config.json lets plain ``mlx_lm.load(dir)`` give a working tokenizer with
its chat template and end-of-sequence tokens. The pre-tokenizer must match the one
the merges were learned with (``tokenizer.ggml.pre``), or text splits differently
from llama.cpp and the model sees token sequences it was never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from mlxkv.errors import UserError

# tokenizer.ggml.token_type values (llama_token_type in llama.h)
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _byte_level()]
    )


def _split_then_byte_level(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return build


# tokenizer.ggml.pre -> the pre-tokenizer llama.cpp applies for it (see llama-vocab.cpp).
BYTE_LEVEL_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _byte_level,
    "gpt2": _byte_level,
    "smollm": _digits_then_byte_level,
    "starcoder": _digits_then_byte_level,
    "refact": _digits_then_byte_level,
    "llama-bpe": _split_then_byte_level(_LLAMA3_SPLIT),
    "llama3": _split_then_byte_level(_LLAMA3_SPLIT),
    "llama-v3": _split_then_byte_level(_LLAMA3_SPLIT),
    "smaug-bpe": _split_then_byte_level(_LLAMA3_SPLIT),
    "qwen2": _split_then_byte_level(_QWEN2_SPLIT),
}


def _scalar(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    """A metadata scalar as a Python value (mx.load gives 0-d arrays for numbers and bools)."""
    value = metadata.get(key, default)
    return value.item() if hasattr(value, "item") else value


def _int_list(metadata: dict[str, Any], key: str) -> list[int] | None:
    value = metadata.get(key)
    return None if value is None else [int(x) for x in value.tolist()]


def _byte_level_model(metadata: dict[str, Any], tokens: list[str]) -> Tokenizer:
    merges = metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise UserError("the GGUF's BPE vocabulary has no tokenizer.ggml.merges")
    pre = str(_scalar(metadata, "tokenizer.ggml.pre", "default"))
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise UserError(
            f"GGUF tokenizer pre-tokenizer '{pre}' is not supported; supported: "
            + ", ".join(sorted(BYTE_LEVEL_PRE_TOKENIZERS))
        )
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tokenizer.pre_tokenizer = BYTE_LEVEL_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging, which llama.cpp applies:
    repeatedly join the adjacent pair whose concatenation is a token with the highest score.
    Every split of a token into two tokens becomes a merge ranked by that token's score."""
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, index in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece_model(metadata: dict[str, Any], tokens: list[str]) -> Tokenizer:
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise UserError("the GGUF's SentencePiece vocabulary has no tokenizer.ggml.scores")
    unk_id = _scalar(metadata, "tokenizer.ggml.unknown_token_id", 0)
    model = models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=spm_merges(tokens, [float(s) for s in scores.tolist()]),
        unk_token=tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    add_space_prefix = bool(_scalar(metadata, "tokenizer.ggml.add_space_prefix", True))
    # SentencePiece and llama.cpp prepend a space to every text fragment, even one that already
    # starts with spaces (Metaspace's "first" scheme would not), then make spaces visible.
    prefix = [normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", SPM_SPACE)])
    strip_prefix = [decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip_prefix]
    )
    return tokenizer


TOKENIZER_MODELS: dict[str, Callable[[dict[str, Any], list[str]], Tokenizer]] = {
    "gpt2": _byte_level_model,
    "llama": _sentencepiece_model,
}


def _special_token(metadata: dict[str, Any], tokens: list[str], name: str) -> str | None:
    token_id = _scalar(metadata, f"tokenizer.ggml.{name}_token_id")
    return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None


def _add_special_tokens(tokenizer: Tokenizer, metadata: dict[str, Any], tokens: list[str]) -> None:
    """Control tokens (<|im_start|>, <s>) match whole and are special; user-defined ones
    match whole too, as llama.cpp does, but are decoded like text."""
    token_types = _int_list(metadata, "tokenizer.ggml.token_type") or []
    special = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types)
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)
    ]
    user_defined = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, token_types)
        if kind == TOKEN_TYPE_USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)


def _set_bos_eos_template(tokenizer: Tokenizer, bos: str | None, eos: str | None,
                          add_bos: bool, add_eos: bool) -> None:
    """Add BOS/EOS around encoded text when the GGUF says llama.cpp would."""
    added = [t for t, wanted in ((bos, add_bos), (eos, add_eos)) if t and wanted]
    if not added:
        return
    single = " ".join(([bos] if bos in added else []) + ["$A"] + ([eos] if eos in added else []))
    specials = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(added)]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` equivalent to the one llama.cpp builds from
    this metadata (as returned by ``mx.load(path, return_metadata=True)``)."""
    from transformers import PreTrainedTokenizerFast

    kind = _scalar(metadata, "tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise UserError("the GGUF has no tokenizer (tokenizer.ggml.model / tokens missing)")
    if kind not in TOKENIZER_MODELS:
        raise UserError(
            f"GGUF tokenizer type '{kind}' is not supported; supported: "
            "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE)"
        )
    tokens = list(tokens)
    tokenizer = TOKENIZER_MODELS[kind](metadata, tokens)
    _add_special_tokens(tokenizer, metadata, tokens)

    bos, eos = _special_token(metadata, tokens, "bos"), _special_token(metadata, tokens, "eos")
    add_bos = bool(_scalar(metadata, "tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(_scalar(metadata, "tokenizer.ggml.add_eos_token", False))
    _set_bos_eos_template(tokenizer, bos, eos, add_bos, add_eos)

    special = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": _special_token(metadata, tokens, "unknown"),
        "pad_token": _special_token(metadata, tokens, "padding"),
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=_scalar(metadata, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        **{name: token for name, token in special.items() if token is not None},
    )


def write_hf_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (and the chat template) into ``out_dir``."""
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 names its own TokenizersBackend, which older versions do not know.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
