"""Attention over mlxkv caches: the view caches return, the one attention function (blockwise
over keys, ``blocks`` holding the block-size rule), the mlx-lm hook."""

from mlxkv.attention.blocks import attention_transient_bytes, key_block_size
from mlxkv.attention.hook import install, installed, uninstall
from mlxkv.attention.sdpa import attend
from mlxkv.attention.view import KVView, Segment

__all__ = [
    "KVView", "Segment", "attend", "attention_transient_bytes", "install", "installed", "key_block_size", "uninstall",
]
