"""Quality of a KV cache against full precision: KL divergence, perplexity, pass-key retrieval."""

from mlxkv.eval.configs import DEFAULT_REFERENCE, CacheSpec, parse_specs
from mlxkv.eval.corpus import Corpus, corpus_tokens, load_corpus
from mlxkv.eval.kld import evaluate_kld
from mlxkv.eval.passkey import evaluate_passkey

__all__ = [
    "DEFAULT_REFERENCE", "CacheSpec", "Corpus", "corpus_tokens", "evaluate_kld", "evaluate_passkey", "load_corpus", "parse_specs",
]
