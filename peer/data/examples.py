"""Example datasets built from data that installed packages already ship, so nothing is downloaded at run
time and every machine with the same package versions builds the same dataset version.

    digits  scikit-learn's bundled handwritten digits: 1,797 8x8 images, float32 ``x`` in [0, 1], int ``y``
    text    CPython's own documentation (``pydoc_data.topics``) as fixed-length ``tokens`` of raw bytes:
            byte-level, so a tiny language model needs no tokenizer (vocabulary of 256)
    text-bpe the same text as fixed-length ``tokens`` of byte-level BPE ids, with the tokenizer trained
            when it is packed and stored beside the shards (peer/data/bpe.py says how the version covers it)
    python-code  the standard library's documented functions, each with its docstring's first paragraph:
            (query, passage) pairs tokenized for MiniLM, for the embed-lora task (peer/data/python_code.py)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from peer.data.pack import PackReport, write_dataset
from peer.protocol.dataset import DatasetError, FieldSpec, Schema

TEXT_TOKENS = 128  # bytes per text sample
_MAX_RECORD_BYTES = 1 << 20


def _digits() -> tuple[Schema, Iterator[dict]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetError("the digits example needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # the pixels are counts 0..16
    schema = Schema({"x": FieldSpec("tensor", "float32", (8, 8)), "y": FieldSpec("int")}, label="y")
    return schema, ({"x": x, "y": int(y)} for x, y in zip(images, digits.target, strict=True))


def _text() -> tuple[Schema, Iterator[dict]]:
    """The topics in sorted order, joined; the tail shorter than one sample is left out."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DatasetError("the text example needs pydoc_data, part of CPython's standard library") from None
    corpus = "\n\n".join(topics[key] for key in sorted(topics)).encode()
    count = len(corpus) // TEXT_TOKENS
    tokens = np.frombuffer(corpus, dtype=np.uint8, count=count * TEXT_TOKENS).reshape(count, TEXT_TOKENS)
    schema = Schema({"tokens": FieldSpec("tensor", "uint8", (TEXT_TOKENS,))})
    return schema, ({"tokens": row} for row in tokens)


def _text_bpe() -> tuple[Schema, Iterator[dict], dict[str, bytes]]:
    from peer.data.bpe import text_bpe  # imports tokenizers: only this example needs it

    return text_bpe()


def _python_code() -> tuple[Schema, Iterator[dict], dict[str, bytes]]:
    from peer.data.python_code import python_code  # imports tokenizers: only this example needs it

    return python_code()


# A builder returns (schema, records) or (schema, records, files): files (name -> bytes) are written beside
# the shards, their SHA-256 in the manifest's source, so the version covers them too.
_BUILDERS: dict[str, Callable[[], tuple]] = {
    "digits": _digits,
    "text": _text,
    "text-bpe": _text_bpe,
    "python-code": _python_code,
}
EXAMPLES = tuple(_BUILDERS)


def build_example(name: str, out: Path, shard_bytes: int) -> PackReport:
    """Write the example dataset ``name`` to ``out`` (absent or empty), cleaned like any packed source."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise DatasetError(f"unknown example {name!r}; the examples are {', '.join(EXAMPLES)}")
    schema, records, *extra = builder()
    files: dict[str, bytes] = extra[0] if extra else {}
    hashes = [f" {file}:sha256:{hashlib.sha256(data).hexdigest()}" for file, data in sorted(files.items())]
    report = write_dataset(
        records,
        schema,
        out,
        shard_bytes=shard_bytes,
        max_record_bytes=_MAX_RECORD_BYTES,
        name=name,
        source=f"example:{name}" + "".join(hashes),
    )
    for file, data in files.items():
        (Path(out) / file).write_bytes(data)
    return report
