"""The ``text-bpe`` example dataset: the ``text`` example's corpus (CPython's ``pydoc_data.topics``) in
fixed-length samples of byte-level BPE token ids, for ``causal-lm`` (peer/tasks/causal_lm.py).

The tokenizer is trained here, when the dataset is packed, with the ``tokenizers`` library: byte-level BPE
(every byte is a token, so any text encodes and nothing is unknown), a fixed vocabulary of
:data:`VOCABULARY`, no special tokens, the topics in sorted order. Its training is deterministic (same
corpus and library version -> byte-identical ``tokenizer.json``, so the same dataset version on every
machine; tests/test_causal_lm.py packs twice). Peers never tokenize during a run: the samples already
hold the token ids, so every peer trains on the same ids by construction; the tokenizer is what turns the
trained model's ids back into text.

How the version covers the tokenizer: ``tokenizer.json`` is written into the dataset folder beside the
shards and its SHA-256 is part of the manifest's ``source`` string (``example:text-bpe
tokenizer.json:sha256:<hex>``), so the version (the manifest's SHA-256) pins it without a new manifest
field or format change; :func:`load_tokenizer` refuses a file whose hash differs. A peer that fetched only
the shards can rebuild the tokenizer offline with ``hivemarket data example text-bpe`` and check it
against that hash. (A field was the alternative: per-record it would repeat 110 KB in every sample.)

Each sample also stores ``target_bytes``: how many bytes of text its predicted tokens (all but the first)
decode to, so a task can report bits per byte, the unit the byte-level ``bytes-lm`` reports in (nats per
BPE token and nats per byte are not comparable). The tokenizer saw the whole corpus, held-out samples
included (the hold-out is chosen per run by ``test_every``); it learns only which byte pairs are
frequent, not what follows what.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from peer.protocol.dataset import DatasetError, FieldSpec, Schema, load_manifest

VOCABULARY = 4096  # token ids fit int16
BPE_TOKENS = 64  # tokens per sample: about 266 bytes of text (4.15 bytes a token)
TOKENIZER_FILE = "tokenizer.json"


def _topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DatasetError(
            "the text-bpe example needs pydoc_data, part of CPython's standard library"
        ) from None
    return [topics[key] for key in sorted(topics)]


def corpus() -> str:
    """The ``text`` example's corpus: the topics in sorted order, joined by blank lines."""
    return "\n\n".join(_topics())


def train_tokenizer(texts: list[str], vocabulary: int = VOCABULARY) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``; deterministic for the same input."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DatasetError("the text-bpe example needs tokenizers: pip install 'hivemarket[hf]'") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocabulary,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_bytes(tokenizer: Any) -> list[bytes]:
    """Token id -> the bytes it stands for (byte-level BPE: every character of a token is one byte)."""
    vocab = tokenizer.get_vocab()
    table = [b""] * len(vocab)
    alphabet = (
        _byte_alphabet()
    )  # decoders.ByteLevel decodes to str, lossy for a token that splits a character
    for piece, index in vocab.items():
        table[index] = bytes(alphabet[char] for char in piece)
    return table


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (the one ``pre_tokenizers.ByteLevel`` uses): character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def text_bpe(tokens: int = BPE_TOKENS) -> tuple[Schema, Iterator[dict], dict[str, bytes]]:
    """The builder of ``hivemarket data example text-bpe``: schema, records and the files stored beside
    the shards (the tokenizer). The tail shorter than one sample is left out, as in ``text``."""
    texts = _topics()
    tokenizer = train_tokenizer(texts)
    ids = np.asarray(tokenizer.encode("\n\n".join(texts)).ids, dtype=np.int16)
    lengths = np.asarray([len(b) for b in token_bytes(tokenizer)], dtype=np.int64)
    count = len(ids) // tokens
    rows = ids[: count * tokens].reshape(count, tokens)
    target_bytes = lengths[rows[:, 1:]].sum(axis=1)
    schema = Schema({"tokens": FieldSpec("tensor", "int16", (tokens,)), "target_bytes": FieldSpec("int")})
    records = ({"tokens": row, "target_bytes": int(n)} for row, n in zip(rows, target_bytes, strict=True))
    return schema, records, {TOKENIZER_FILE: tokenizer.to_str().encode()}


def load_tokenizer(root: Path) -> Any:
    """The tokenizer stored with the dataset at ``root``, refused unless its SHA-256 is the one the
    manifest (hence the version) names."""
    from tokenizers import Tokenizer

    root = Path(root)
    found = re.search(rf"{re.escape(TOKENIZER_FILE)}:sha256:([0-9a-f]{{64}})", load_manifest(root).source)
    if found is None:
        raise DatasetError(f"{root}: the manifest names no {TOKENIZER_FILE}; this is not a BPE dataset")
    try:
        raw = (root / TOKENIZER_FILE).read_bytes()
    except FileNotFoundError:
        raise DatasetError(
            f"{root}: {TOKENIZER_FILE} is missing; rebuild it with hivemarket data example text-bpe"
        ) from None
    if hashlib.sha256(raw).hexdigest() != found.group(1):
        raise DatasetError(f"{root}: {TOKENIZER_FILE} is not the one this dataset version was packed with")
    return Tokenizer.from_str(raw.decode())
