"""Packing datasets from real files of every source type, cleaning, examples, and `data verify`/`info`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from peer.data.cli import data_group
from peer.data.examples import TEXT_TOKENS, build_example
from peer.data.pack import PackReport, pack
from peer.protocol.dataset import (
    MANIFEST,
    DatasetError,
    FieldSpec,
    Schema,
    ShardWriter,
    check_shard,
    load_manifest,
    read_records,
    verify_dataset,
)


def _pack(source: Path, out: Path, **kwargs: Any) -> PackReport:
    kwargs.setdefault("shard_bytes", 1 << 20)
    kwargs.setdefault("max_record_bytes", 1 << 20)
    return pack(source, out, **kwargs)


def _records(root: Path) -> list[dict[str, Any]]:
    manifest = load_manifest(root)
    records = []
    for shard in manifest.shards:
        check_shard(root / shard.file, shard)
        records.extend(record for _, record in read_records(root / shard.file, shard, manifest.schema))
    return records


def _cli(*args: object) -> Result:
    return CliRunner().invoke(data_group, [str(a) for a in args])


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------------ sources


def test_npy_rows_are_samples_and_duplicates_are_dropped(tmp_path: Path) -> None:
    rows = np.random.default_rng(0).random((40, 3, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", np.concatenate([rows, rows[:2]]))

    report = _pack(tmp_path / "x.npy", tmp_path / "ds", shard_bytes=500)

    assert report.kept == 40 and report.dropped["duplicate"] == 2
    assert report.manifest.dropped == report.dropped
    assert len(report.manifest.shards) > 1
    assert report.manifest.schema.fields == {"x": FieldSpec("tensor", "float32", (3, 4))}
    np.testing.assert_array_equal(np.stack([r["x"] for r in _records(tmp_path / "ds")]), rows)


def test_npz_arrays_become_fields_and_target_is_the_label(tmp_path: Path) -> None:
    x = np.random.default_rng(1).integers(0, 255, (6, 2, 2), dtype=np.uint8)
    target = np.arange(6)[::-1]
    names = np.array(["a", "b", "c", "d", "e", "f"])
    np.savez(tmp_path / "d.npz", x=x, target=target, name=names)

    report = _pack(tmp_path / "d.npz", tmp_path / "ds")

    schema = report.manifest.schema
    assert schema.label == "target"
    assert schema.fields == {
        "x": FieldSpec("tensor", "uint8", (2, 2)),
        "target": FieldSpec("int"),
        "name": FieldSpec("text"),
    }
    records = _records(tmp_path / "ds")
    assert [(r["target"], r["name"]) for r in records] == list(
        zip(target.tolist(), names.tolist(), strict=True)
    )
    for record, image in zip(records, x, strict=True):
        np.testing.assert_array_equal(record["x"], image)


def test_jsonl_kinds_cleaning_and_labels(tmp_path: Path) -> None:
    good = [
        {"text": "a cat", "score": 1, "vec": [[1, 2], [3, 4]], "label": 0},
        {"text": "a dog", "score": 2.5, "vec": [[1, 2], [3, 5]], "label": 1},
        {"text": "a cow", "score": 3, "vec": [[0.5, 2], [3, 4]], "label": 2},
    ]
    source = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            good[0],
            good[1],
            "[1, 2]",  # malformed: not an object
            "{not json",  # malformed
            {
                "text": "b",
                "score": 1,
                "vec": [1, 2, 3],
                "label": 0,
            },  # malformed: not the first record's shape
            {
                "text": "c",
                "score": "high",
                "vec": [[1, 2], [3, 4]],
                "label": 0,
            },  # malformed: text for a number
            dict(reversed(good[0].items())),  # duplicate: the same record with its keys in another order
            {"text": "", "score": 1, "vec": [[1, 2], [3, 4]], "label": 3},  # empty text
            {},  # empty
            "",  # blank line: empty
            {"text": "no label", "score": 1, "vec": [[1, 2], [3, 4]], "label": None},  # incomplete
            {"text": "x" * 2000, "score": 1, "vec": [[1, 2], [3, 4]], "label": 4},  # oversized
            good[2],
        ],
    )

    report = _pack(source, tmp_path / "ds", max_record_bytes=1000)

    assert report.dropped == {"duplicate": 1, "empty": 3, "incomplete": 1, "malformed": 4, "oversized": 1}
    assert load_manifest(tmp_path / "ds").dropped == report.dropped
    schema = report.manifest.schema
    assert schema.label == "label"
    assert schema.fields == {
        "text": FieldSpec("text"),
        "score": FieldSpec("float"),  # widened: 2.5 among ints
        "vec": FieldSpec("tensor", "float32", (2, 2)),  # widened: 0.5 among ints
        "label": FieldSpec("int"),
    }
    records = _records(tmp_path / "ds")
    assert [(r["text"], r["score"], r["label"]) for r in records] == [
        (g["text"], float(g["score"]), g["label"]) for g in good
    ]
    for record, source_record in zip(records, good, strict=True):
        np.testing.assert_array_equal(record["vec"], np.array(source_record["vec"], dtype=np.float32))


def test_csv_columns_cleaning_and_named_label(tmp_path: Path) -> None:
    source = tmp_path / "pets.csv"
    source.write_text(
        "id,weight,name,species\n"
        "1,0.5,Rex,dog\n"
        "2,1,Tom,cat\n"
        '3,2.25,"Smith, Jr",cat\n'
        "4,1.5,Bo\n"  # malformed: a column short
        "2,1,Tom,cat\n"  # duplicate
        ",,,\n"  # empty
        "5,,Kit,cat\n"  # incomplete
        "\n"  # blank line: empty
        "6,3,Max,dog\n"
    )

    report = _pack(source, tmp_path / "ds", label="species")

    assert report.dropped == {"duplicate": 1, "empty": 2, "incomplete": 1, "malformed": 1, "oversized": 0}
    schema = report.manifest.schema
    assert schema.label == "species"
    assert schema.fields == {
        "id": FieldSpec("int"),
        "weight": FieldSpec("float"),
        "name": FieldSpec("text"),
        "species": FieldSpec("text"),
    }
    assert _records(tmp_path / "ds") == [
        {"id": 1, "weight": 0.5, "name": "Rex", "species": "dog"},
        {"id": 2, "weight": 1.0, "name": "Tom", "species": "cat"},
        {"id": 3, "weight": 2.25, "name": "Smith, Jr", "species": "cat"},
        {"id": 6, "weight": 3.0, "name": "Max", "species": "dog"},
    ]


def test_folder_of_files_is_labelled_by_subfolder(tmp_path: Path) -> None:
    files = {
        "cat/1.bin": b"meow1",
        "cat/2.bin": b"meow2",
        "cat/woof.bin": b"woof",  # not a duplicate of dog/1.bin: another label
        "dog/1.bin": b"woof",
        "dog/big.bin": b"x" * 5000,  # oversized
        "dog/copy.bin": b"woof",  # duplicate of dog/1.bin
        "dog/empty.bin": b"",  # empty
        "loose.bin": b"loose",  # incomplete: no subfolder, so no label
        "cat/.DS_Store": b"skipped",
        ".hidden/3.bin": b"skipped",
    }
    for name, data in files.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(data)

    report = _pack(tmp_path / "src", tmp_path / "ds", max_record_bytes=1000)

    assert report.dropped == {"duplicate": 1, "empty": 1, "incomplete": 1, "malformed": 0, "oversized": 1}
    assert report.manifest.schema.label == "label"
    assert [(r["data"], r["label"]) for r in _records(tmp_path / "ds")] == [
        (b"meow1", "cat"),
        (b"meow2", "cat"),
        (b"woof", "cat"),
        (b"woof", "dog"),
    ]


def test_flat_folder_has_no_label(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for name in ("b.txt", "a.txt"):
        (tmp_path / "src" / name).write_bytes(name.encode())

    report = _pack(tmp_path / "src", tmp_path / "ds")

    assert report.manifest.schema.fields == {"data": FieldSpec("bytes")}
    assert report.manifest.schema.label is None
    assert [r["data"] for r in _records(tmp_path / "ds")] == [b"a.txt", b"b.txt"]


def test_packing_is_deterministic_and_path_independent(tmp_path: Path) -> None:
    lines = [{"text": f"line {i}", "label": i % 3} for i in range(200)]
    first = _write_jsonl(tmp_path / "train.jsonl", lines)
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(first, tmp_path / "elsewhere" / "train.jsonl")

    a = _pack(first, tmp_path / "a", shard_bytes=1000)
    b = _pack(first, tmp_path / "b", shard_bytes=1000)
    c = _pack(Path(copy), tmp_path / "c", shard_bytes=1000)

    assert len(a.manifest.shards) > 1
    assert a.version == b.version == c.version
    assert a.version == hashlib.sha256((tmp_path / "a" / MANIFEST).read_bytes()).hexdigest()
    for shard in a.manifest.shards:
        assert (tmp_path / "a" / shard.file).read_bytes() == (tmp_path / "b" / shard.file).read_bytes()
    lines[100]["text"] = "changed"
    changed = _write_jsonl(tmp_path / "elsewhere" / "train.jsonl", lines)
    assert _pack(changed, tmp_path / "d", shard_bytes=1000).version != a.version


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "data.txt").write_text("x"), "unknown source type '.txt'"),
        (lambda d: None, "does not exist"),
        (lambda d: (d / "data.jsonl").write_text(""), "is empty"),
        (lambda d: (d / "data.csv").write_text("a,b\n"), "no rows"),
        (lambda d: (d / "data.npy").write_bytes(b"not numpy"), "cannot read"),
        (lambda d: (d / "data").mkdir(), "holds no files"),
        (lambda d: np.savez(d / "data.npz", x=np.zeros(3), y=np.zeros(4)), "differ in length"),
        (lambda d: (d / "data.jsonl").write_text('{"a": 1}\n'), "label field 'nope' does not exist"),
        (lambda d: (d / "data.jsonl").write_text("[1]\n{}\n"), "no records left after cleaning"),
    ],
)
def test_bad_sources_raise_a_dataset_error_naming_them(
    tmp_path: Path, make: Callable[[Path], object], message: str
) -> None:
    make(tmp_path)
    source = next(tmp_path.glob("data*"), tmp_path / "data.jsonl")
    label = "nope" if "nope" in message else None

    with pytest.raises(DatasetError, match=message) as error:
        _pack(source, tmp_path / "out" / "ds", label=label)

    assert source.name in str(error.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), (
        "a failed pack left files"
    )


def test_pack_refuses_to_overwrite_or_to_write_inside_its_source(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(b"a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")

    with pytest.raises(DatasetError, match="not an empty folder"):
        _pack(source, tmp_path / "full")
    with pytest.raises(DatasetError, match="inside the source folder"):
        _pack(source, source / "ds")

    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no records left"):
        _pack(source, tmp_path / "empty", max_record_bytes=0)
    assert list((tmp_path / "empty").iterdir()) == [], "a failed pack left files in a folder it did not make"
    assert _pack(source, tmp_path / "empty").kept == 1
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [MANIFEST, "shard-00000.msgpack"]


# ----------------------------------------------------------------------------------------------- examples


def test_digits_example_is_the_labelled_scikit_learn_digits(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    report = build_example("digits", tmp_path / "digits", shard_bytes=64 << 10)

    assert report.kept == report.manifest.samples == 1797
    assert len(report.manifest.shards) > 1
    verify_dataset(tmp_path / "digits")
    records = _records(tmp_path / "digits")
    assert sorted({r["y"] for r in records}) == list(range(10))
    assert [r["y"] for r in records] == load_digits().target.tolist()
    images = np.stack([r["x"] for r in records])
    assert images.dtype == np.float32 and images.shape == (1797, 8, 8)
    assert images.min() == 0.0 and images.max() == 1.0


def test_text_example_is_python_documentation_as_byte_tokens(tmp_path: Path) -> None:
    from pydoc_data.topics import topics

    report = build_example("text", tmp_path / "text", shard_bytes=1 << 20)

    assert report.kept > 1000
    records = _records(tmp_path / "text")
    assert all(r["tokens"].dtype == np.uint8 and r["tokens"].shape == (TEXT_TOKENS,) for r in records)
    first_topic = topics[min(topics)].encode()
    assert records[0]["tokens"].tobytes() == first_topic[:TEXT_TOKENS]


def test_unknown_example_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown example 'mnist'"):
        build_example("mnist", tmp_path / "x", shard_bytes=1 << 20)


# ------------------------------------------------------------------------------------ verify, info, pack


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset of 50 labelled samples in several shards, built once; tests tamper with copies."""
    root = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(2)
    np.savez(root / "small.npz", x=rng.random((50, 4), dtype=np.float32), y=np.arange(50) % 10)
    _pack(root / "small.npz", root / "ds", shard_bytes=400)
    assert len(load_manifest(root / "ds").shards) >= 3
    return root / "ds"


@pytest.fixture
def dataset(packed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "ds"))


def _edit_manifest(root: Path, change: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads((root / MANIFEST).read_text())
    change(data)
    (root / MANIFEST).write_text(json.dumps(data))


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _junk_with_a_matching_hash(root: Path, junk: bytes) -> None:
    """A liar that knows the format: shard 1 replaced by junk, the manifest's size and hash updated."""
    (root / "shard-00001.msgpack").write_bytes(junk)

    def change(data: dict[str, Any]) -> None:
        data["shards"][1].update(size=len(junk), sha256=hashlib.sha256(junk).hexdigest())

    _edit_manifest(root, change)


def _lie_about_last_count(data: dict[str, Any]) -> None:
    data["shards"][-1]["samples"] += 1
    data["samples"] += 1


def _lie_about_first_count(data: dict[str, Any]) -> None:
    data["shards"][0]["samples"] -= 1
    data["samples"] -= 1


TAMPERING: dict[str, tuple[Callable[[Path], object], str]] = {
    "flipped byte": (lambda d: _flip_byte(d / "shard-00001.msgpack"), "shard-00001.msgpack has SHA-256"),
    "truncated": (
        lambda d: (d / "shard-00001.msgpack").write_bytes((d / "shard-00001.msgpack").read_bytes()[:-10]),
        r"shard-00001.msgpack has \d+ bytes, the manifest says",
    ),
    "missing shard": (lambda d: (d / "shard-00002.msgpack").unlink(), "shard-00002.msgpack is missing"),
    "size lie": (
        lambda d: _edit_manifest(d, lambda m: m["shards"][1].update(size=m["shards"][1]["size"] + 1)),
        r"shard-00001.msgpack has \d+ bytes, the manifest says",
    ),
    "count lie, last shard": (
        lambda d: _edit_manifest(d, _lie_about_last_count),
        r"shard-\d+.msgpack holds \d+ samples, the manifest says",
    ),
    "count lie, first shard": (
        lambda d: _edit_manifest(d, _lie_about_first_count),
        r"shards\[1\].first_id is \d+, expected",
    ),
    "total lie": (
        lambda d: _edit_manifest(d, lambda m: m.update(samples=m["samples"] + 1)),
        "'samples' says 51",
    ),
    "kind lie": (
        lambda d: _edit_manifest(d, lambda m: m["schema"]["fields"]["y"].update(kind="text")),
        "shard-00000.msgpack record 0: field 'y' does not match the schema: "
        "holds a value of type int, the schema says text",
    ),
    "random junk with a matching hash": (
        lambda d: _junk_with_a_matching_hash(d, np.random.default_rng(3).bytes(300)),
        "shard-00001.msgpack: record 16 is malformed",
    ),
    "undecodable junk with a matching hash": (
        lambda d: _junk_with_a_matching_hash(d, b"\xc1" * 300),  # 0xc1 is never used by msgpack
        "shard shard-00001.msgpack cannot be decoded",
    ),
    "unknown format": (
        lambda d: _edit_manifest(d, lambda m: m.update(format="other/9")),
        "'format' must be 'hivemarket-dataset/1'",
    ),
    "manifest not JSON": (lambda d: (d / MANIFEST).write_text("{"), "is not valid JSON"),
}


def test_verify_accepts_an_intact_dataset(dataset: Path) -> None:
    result = _cli("verify", dataset)
    assert result.exit_code == 0, result.output
    assert load_manifest(dataset).version in result.output
    assert "50 samples" in result.output


@pytest.mark.parametrize("case", list(TAMPERING))
def test_verify_rejects_a_tampered_dataset_with_one_line(dataset: Path, case: str) -> None:
    tamper, message = TAMPERING[case]
    tamper(dataset)

    result = _cli("verify", dataset)

    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert re.search(message, result.output), result.output


def test_verify_checks_the_expected_version(dataset: Path) -> None:
    version = load_manifest(dataset).version
    assert _cli("verify", dataset, "--expect", version).exit_code == 0
    other = _cli("verify", dataset, "--expect", "0" * 64)
    assert other.exit_code == 1 and f"is version {version}, expected {'0' * 64}" in other.output
    assert _cli("verify", dataset, "--expect", "abc").exit_code == 2


def test_verify_and_info_call_a_path_without_a_manifest_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for command in ("verify", "info"):
        missing = _cli(command, tmp_path / "nowhere")
        assert missing.exit_code == 2 and "nowhere does not exist" in missing.output
        no_manifest = _cli(command, tmp_path / "empty")
        assert (
            no_manifest.exit_code == 2 and "is not a dataset: it has no manifest.json" in no_manifest.output
        )


def test_info_json_describes_the_dataset(dataset: Path) -> None:
    manifest = load_manifest(dataset)

    result = _cli("info", dataset, "--json")

    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (
        info["version"] == manifest.version == hashlib.sha256((dataset / MANIFEST).read_bytes()).hexdigest()
    )
    assert (info["name"], info["source"], info["samples"]) == ("small", "npz:small.npz", 50)
    assert info["schema"] == {
        "fields": {"x": {"kind": "tensor", "dtype": "float32", "shape": [4]}, "y": {"kind": "int"}},
        "label": "y",
    }
    assert info["dropped"] == {"duplicate": 0, "empty": 0, "incomplete": 0, "malformed": 0, "oversized": 0}
    assert [s["file"] for s in info["shards"]] == [s.file for s in manifest.shards]
    assert sum(s["samples"] for s in info["shards"]) == 50
    assert (
        info["bytes"]
        == sum(s["size"] for s in info["shards"])
        == sum((dataset / s.file).stat().st_size for s in manifest.shards)
    )
    assert {"sha256", "size", "first_id"} <= set(info["shards"][0])
    text = _cli("info", dataset)
    assert manifest.version in text.output and "shard-00001.msgpack" in text.output


def test_pack_command_prints_the_report_and_rejects_bad_arguments(tmp_path: Path) -> None:
    source = _write_jsonl(
        tmp_path / "t.jsonl", [{"text": f"row {i}", "label": i % 2} for i in range(100)] + ["[]"]
    )

    result = _cli(
        "pack", source, tmp_path / "ds", "--shard-size", "1KB", "--max-record-size", "2kb", "--json"
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["version"] == load_manifest(tmp_path / "ds").version
    assert report["samples"] == 100 and report["shards"] > 1 and report["dropped"]["malformed"] == 1
    text = _cli("pack", source, tmp_path / "ds2", "--name", "rows")
    assert "dropped  malformed 1" in text.output and "name     rows" in text.output
    for args, needle in [
        (("--shard-size", "12XB"), "--shard-size '12XB' is not a positive size"),
        (("--max-record-size", "0"), "--max-record-size '0' is not a positive size"),
        (("--label", "nope"), "label field 'nope' does not exist"),
    ]:
        bad = _cli("pack", source, tmp_path / "ds3", *args)
        assert bad.exit_code == 2 and needle in bad.output
        assert bad.output.startswith("Error: ") and bad.output.count("\n") == 1, bad.output
    assert _cli("pack", source, tmp_path / "ds").exit_code == 2  # not empty any more


def test_example_command_builds_the_text_corpus(tmp_path: Path) -> None:
    result = _cli("example", "text", tmp_path / "text", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["samples"] == load_manifest(tmp_path / "text").samples > 1000
    assert _cli("verify", tmp_path / "text").exit_code == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(shards=5), "'shards' must be a list"),
        (lambda m: m["schema"].update(label=[]), "label [] is not one of the fields"),
        (lambda m: m.update(dropped={"x": "a"}), "'dropped' must map reasons to counts"),
    ],
)
def test_malformed_manifests_are_dataset_errors(tmp_path: Path, edit, message: str) -> None:
    root = tmp_path / "ds"
    writer = ShardWriter(root, Schema({"y": FieldSpec("int")}), 1 << 20)
    writer.add({"y": 1})
    writer.finish("tiny")
    data = json.loads((root / MANIFEST).read_bytes())
    edit(data)
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_manifest(root)
