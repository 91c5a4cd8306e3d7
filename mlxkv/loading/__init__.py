"""Getting a model and tokenizer: GGUF import, the cached loader, and tiny test models."""

from mlxkv.loading.gguf import import_gguf
from mlxkv.loading.loader import LoadInfo, default_model_path, load, load_info

__all__ = ["LoadInfo", "default_model_path", "import_gguf", "load", "load_info"]
