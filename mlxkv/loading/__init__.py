"""Getting a model and tokenizer: short model names, GGUF import, the cached loader, tiny test models."""

from mlxkv.loading.gguf_import import import_gguf
from mlxkv.loading.loader import LoadInfo, load, load_info
from mlxkv.loading.models import MODEL_HELP, MODELS, default_model_path

__all__ = ["MODELS", "MODEL_HELP", "LoadInfo", "default_model_path", "import_gguf", "load", "load_info"]
