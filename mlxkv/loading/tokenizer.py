"""A Hugging Face tokenizer for a GGUF file, built by transformers' own GGUF conversion.

transformers' ``convert_gguf_tokenizer`` turns the ``tokenizer.ggml.*`` vocabulary into the
tokenizer class the model family uses (GPT-2 byte-level BPE, Llama and Gemma SentencePiece,
T5 unigram), with the pre-tokenizer split the merges were learned with. Its file reader
needs torch, which mlxkv does not install, so the metadata comes from ``gguf`` instead and
is grouped here the way ``get_gguf_tokenizer`` groups it.

Gemma vocabularies go through transformers' Gemma builder, which adds no prefix space, as
Gemma's own SentencePiece model does, even where the file says ``add_space_prefix`` (llama.cpp
wrote that for early Gemma 3 files, the packaged 270M included): on the 270M's vocabulary it
tokenizes like SentencePiece's own encoder run on the same pieces and scores.

What mlxkv adds, because transformers lacks it:
- for a plain SentencePiece vocabulary (Llama 2, TinyLlama), the prefix space before every
  text as llama.cpp and SentencePiece add it, through transformers' own Phi-3 builder;
- SmolLM's and StarCoder's digit splitting (``tokenizer.ggml.pre`` = smollm, starcoder,
  refact): every digit its own piece, as llama.cpp and the original tokenizer.json do;
  transformers falls back to GPT-2's split and would merge "2024" into one token.
- a refusal, in one line, of any other pre-tokenizer neither knows (transformers silently
  falls back to GPT-2's split, which gives token sequences the model never saw);
- BOS added as the file says (``add_bos_token``), EOS never appended to a prompt (Gemma 3
  files set ``add_eos_token``, which would end every prompt with <eos>);
- the end-of-generation ids llama.cpp uses: eos plus the file's end-of-turn tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers

from mlxkv.errors import UserError

TOKEN_TYPE_CONTROL = 3  # tokenizer.ggml.token_type values (llama_token_type in llama.h)
DIGIT_SPLIT_PRE_TOKENIZERS = ("smollm", "starcoder", "refact")
PLAIN_BYTE_LEVEL_PRE_TOKENIZERS = ("default", "gpt2")
END_OF_TURN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<EOT>")
"""Control tokens llama.cpp ends generation on when the file names no end-of-turn id (llama-vocab.cpp)."""


def _digits_then_byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def tokenizer_dict(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer fields, tokenizer_config fields) under transformers' names, as its
    ``get_gguf_tokenizer`` makes them from a file."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    groups = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    fields, config = groups["tokenizer"], groups["tokenizer_config"]
    if fields.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for SentencePiece vocabularies
    tokens = fields.get("tokens") or []
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    return fields, config


def _check_pre_tokenizer(fields: dict[str, Any]) -> None:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = fields.get("pre_tokenizer_type", "default")
    known = (*GGUF_PRE_TOKENIZER_SPLITS, *DIGIT_SPLIT_PRE_TOKENIZERS, *PLAIN_BYTE_LEVEL_PRE_TOKENIZERS)
    if fields.get("tokenizer_type") == "gpt2" and pre not in known:
        raise UserError(f"GGUF tokenizer pre-tokenizer '{pre}' is not supported; supported: "
                        + ", ".join(sorted(known)))


def backend_tokenizer(architecture: str, fields: dict[str, Any]) -> Tokenizer:
    """The ``tokenizers`` object transformers builds for this vocabulary, with mlxkv's additions."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    if not fields.get("tokens") or "tokenizer_type" not in fields:
        raise UserError("the GGUF has no tokenizer (tokenizer.ggml.model / tokens missing)")
    _check_pre_tokenizer(fields)
    try:
        with _quiet_transformers():
            backend, _ = convert_gguf_tokenizer(_builder_architecture(architecture, fields), fields)
    except ValueError as e:  # a tokenizer type transformers has no builder for
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot build the GGUF's tokenizer: {reason}") from None
    if fields.get("pre_tokenizer_type") in DIGIT_SPLIT_PRE_TOKENIZERS:
        backend.pre_tokenizer = _digits_then_byte_level()
    return backend


def _builder_architecture(architecture: str, fields: dict[str, Any]) -> str:
    """The architecture whose builder transformers should use. A plain SentencePiece vocabulary
    that asks for a prefix space gets it the way llama.cpp and SentencePiece add it, before
    every text, even one starting with spaces ("  hi" -> "▁▁▁hi"); transformers' Llama builder
    uses Metaspace, which skips it there, and its Phi-3 builder is the SentencePiece one."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_SENTENCEPIECE_BUILDERS

    plain_sentencepiece = fields.get("tokenizer_type") == "llama" and architecture not in GGUF_SENTENCEPIECE_BUILDERS
    return "phi3" if plain_sentencepiece and fields.get("add_prefix_space", True) else architecture


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` for the vocabulary in this GGUF metadata."""
    from transformers import PreTrainedTokenizerFast

    fields, config = tokenizer_dict(metadata)
    backend = backend_tokenizer(str(metadata.get("general.architecture", "")), fields)
    with _quiet_transformers():
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            chat_template=config.get("chat_template"),
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=False,  # a prompt is not a finished sequence
            clean_up_tokenization_spaces=False,
            **{name: config[name] for name in ("bos_token", "eos_token", "unk_token", "pad_token") if name in config},
        )


def end_of_generation_ids(metadata: dict[str, Any]) -> list[int]:
    """eos plus the end-of-turn tokens llama.cpp stops on: the ids the file names, else the
    control tokens with a known end-of-turn text."""
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    ids = [metadata[k] for k in ("tokenizer.ggml.eos_token_id", *END_OF_TURN_KEYS) if metadata.get(k) is not None]
    if not any(metadata.get(k) is not None for k in END_OF_TURN_KEYS):
        types = metadata.get("tokenizer.ggml.token_type") or []
        ids += [i for i, (token, kind) in enumerate(zip(tokens, types))
                if kind == TOKEN_TYPE_CONTROL and token in END_OF_TURN_TEXTS]
    return [int(i) for i in dict.fromkeys(ids)]


def write_hf_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (and the chat template) into ``out_dir``."""
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 names its own TokenizersBackend, which older versions do not know.
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class _quiet_transformers:
    """transformers logs "PyTorch was not found" and notes on derived merges: not for our users."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("transformers")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
