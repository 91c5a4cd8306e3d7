"""Attention over mlxkv caches: the view caches return, the one attention function, the mlx-lm hook."""

from mlxkv.attention.hook import install, installed, uninstall
from mlxkv.attention.sdpa import attend
from mlxkv.attention.view import KVView, Segment

__all__ = ["KVView", "Segment", "attend", "install", "installed", "uninstall"]
