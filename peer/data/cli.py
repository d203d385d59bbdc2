"""``hivemarket data``: pack, verify, inspect and build example datasets.

Exit codes are those of :mod:`peer.console`: 2 for bad arguments (a missing path, a folder that is not a
dataset, an unusable source), 1 for a dataset that fails its checks.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import click

from peer.console import echo_json, print_table
from peer.data.examples import EXAMPLES, build_example
from peer.data.pack import PackReport, pack
from peer.protocol.commands import InputError, serve_until_signal
from peer.protocol.dataset import MANIFEST, VERSION_RE, DatasetError, Manifest, load_manifest, verify_dataset
from peer.protocol.dataset_server import dataset_app, open_datasets

#: The port `hivemarket data serve` listens on unless --port says else.
DEFAULT_PORT = 8471
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1 << 10,
    "mb": 1 << 20,
    "gb": 1 << 30,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


class DatasetCorrupt(click.ClickException):
    """The dataset fails a check: printed as one line, exit status 1."""

    exit_code = 1


@click.group("data")
def data_group() -> None:
    """Pack, verify and inspect versioned datasets (shards + a manifest; version = the manifest's SHA-256).

    \b
    Example:
      hivemarket data pack train.jsonl ./train-ds --label label
      hivemarket data verify ./train-ds && hivemarket data info ./train-ds
    """


@data_group.command("pack")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shard-size", default="64MB", show_default=True, metavar="SIZE", help="Target shard size.")
@click.option(
    "--max-record-size",
    default="16MB",
    show_default=True,
    metavar="SIZE",
    help="Drop records larger than this, encoded.",
)
@click.option("--label", metavar="FIELD", help="The label field [default: a field named y, label or target].")
@click.option("--name", help="The dataset's name [default: the source's name].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def pack_command(
    source: Path,
    out: Path,
    shard_size: str,
    max_record_size: str,
    label: str | None,
    name: str | None,
    as_json: bool,
) -> None:
    """Build a dataset from a file or a folder of files, cleaning it on the way.

    SOURCE is a .npy, .npz, .jsonl or .csv file, or a folder of files (one file a sample, its subfolder
    the label). Empty, incomplete, malformed, oversized and duplicate records are dropped and counted.
    OUT must be absent or empty. Sizes count in powers of 1024 (64MB is 64 MiB).

    \b
    Example:
      hivemarket data pack digits.npz ./digits-ds --shard-size 1MB
      hivemarket data pack ./images ./images-ds --json
    """
    shard_bytes = _size(shard_size, "--shard-size")
    max_record_bytes = _size(max_record_size, "--max-record-size")
    try:
        report = pack(
            source, out, shard_bytes=shard_bytes, max_record_bytes=max_record_bytes, label=label, name=name
        )
    except DatasetError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror}") from None
    _echo_report(report, out, as_json)


@data_group.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--expect", metavar="VERSION", help="Also fail unless the dataset has this version.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_command(path: Path, expect: str | None, as_json: bool) -> None:
    """Check every shard and every record against the manifest.

    Re-checks each shard's size and SHA-256 and decodes every record (ids, fields, kinds). Exit 0 when
    the dataset is intact, 1 when anything differs (the error names the shard and what is wrong).

    \b
    Example:
      hivemarket data verify ./digits-ds
      hivemarket data verify ./ds --expect 18e813cbe718a1df3a548b44a188ffcce29cc684a31e0152384b70625b4be768
    """
    if expect is not None and not VERSION_RE.fullmatch(expect):
        raise InputError(f"--expect {expect!r} is not a version (64 lowercase hex characters)")
    _require_dataset(path)
    try:
        manifest = verify_dataset(path)
    except DatasetError as e:
        raise DatasetCorrupt(str(e)) from None
    if expect is not None and manifest.version != expect:
        raise DatasetCorrupt(f"{path} is version {manifest.version}, expected {expect}")
    if as_json:
        echo_json(
            {
                "ok": True,
                "version": manifest.version,
                "samples": manifest.samples,
                "shards": len(manifest.shards),
            }
        )
    else:
        click.echo(
            f"ok  {manifest.version}: {manifest.samples} samples in {_shards(manifest)}, "
            f"{_human(sum(s.size for s in manifest.shards))}"
        )


@data_group.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info_command(path: Path, as_json: bool) -> None:
    """Show a dataset's version, samples, schema and shards.

    Also its name, source and what cleaning dropped. Reads only the manifest; `verify` checks the shards.

    \b
    Example:
      hivemarket data info ./digits-ds --json
    """
    _require_dataset(path)
    try:
        manifest = load_manifest(path)
    except DatasetError as e:
        raise DatasetCorrupt(str(e)) from None
    if as_json:
        echo_json(_summary(manifest) | {"shards": [vars(s) for s in manifest.shards]})
        return
    _echo_summary(manifest)
    print_table(
        ["SHARD", "SAMPLES", "FIRST ID", "SIZE", "SHA256"],
        [[s.file, s.samples, s.first_id, _human(s.size), s.sha256] for s in manifest.shards],
        right=["SAMPLES", "FIRST ID", "SIZE"],
    )


@data_group.command("example")
@click.argument("name", type=click.Choice(EXAMPLES))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--shard-size", default="64MB", show_default=True, metavar="SIZE", help="Target shard size.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def example_command(name: str, out: Path, shard_size: str, as_json: bool) -> None:
    """Build an example dataset from installed packages, offline.

    digits: scikit-learn's 1,797 labelled 8x8 digit images. text: Python's own documentation as 128-byte
    samples for a byte-level language model. text-bpe: the same text as 64-token samples of a BPE
    tokenizer trained as it is packed (stored beside the shards). python-code: the standard library's
    documented functions paired with their docstrings, tokenized for MiniLM. The last two need pip
    install 'hivemarket[hf]'. Nothing is downloaded.

    \b
    Example:
      hivemarket data example digits ./digits-ds
      hivemarket data example python-code ./python-code
    """
    try:
        report = build_example(name, out, _size(shard_size, "--shard-size"))
    except DatasetError as e:
        raise InputError(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {out}: {e.strerror}") from None
    _echo_report(report, out, as_json)


def _size(text: str, option: str) -> int:
    """Sizes count in powers of 1024: 64MB is 64 MiB."""
    match = _SIZE_RE.fullmatch(text)
    if match and match.group(2).lower() in _UNITS:
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
        if value > 0:
            return value
    raise InputError(f"{option} {text!r} is not a positive size such as 512KB, 64MB or 1GB")


def _require_dataset(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if not (path / MANIFEST).is_file():
        raise InputError(f"{path} is not a dataset: it has no {MANIFEST}")


def _summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "version": manifest.version,
        "name": manifest.name,
        "source": manifest.source,
        "samples": manifest.samples,
        "bytes": sum(s.size for s in manifest.shards),
        "schema": manifest.schema.to_json(),
        "dropped": manifest.dropped,
    }


def _echo_summary(manifest: Manifest) -> None:
    size = _human(sum(s.size for s in manifest.shards))
    click.echo(f"version  {manifest.version}")
    click.echo(f"name     {manifest.name}  (from {manifest.source or 'unknown'})")
    click.echo(f"samples  {manifest.samples} in {_shards(manifest)}, {size}")
    for name, spec in manifest.schema.fields.items():
        shape = f" {list(spec.shape)}" if spec.kind == "tensor" else ""
        role = "  (label)" if name == manifest.schema.label else ""
        click.echo(f"field    {name}: {spec.kind}{f' {spec.dtype}' if spec.dtype else ''}{shape}{role}")
    lost = ", ".join(f"{reason} {n}" for reason, n in sorted(manifest.dropped.items()) if n)
    click.echo(f"dropped  {lost or 'none'}")


def _echo_report(report: PackReport, out: Path, as_json: bool) -> None:
    if as_json:
        echo_json(_summary(report.manifest) | {"path": str(out), "shards": len(report.manifest.shards)})
    else:
        click.echo(f"wrote    {out}")
        _echo_summary(report.manifest)


def _shards(manifest: Manifest) -> str:
    return f"{len(manifest.shards)} shard{'' if len(manifest.shards) == 1 else 's'}"


def _human(size: int) -> str:
    value, unit = float(size), "B"
    for bigger in ("KB", "MB", "GB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


@click.command("serve")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0 picks a free port.",
)
def serve_command(paths: tuple[Path, ...], host: str, port: int) -> None:
    """Serve dataset folders over HTTP (with range requests) until SIGINT/SIGTERM.

    \b
    Example:
      hivemarket data serve ./digits ./tiny-text --port 8471
      hivemarket data info ./digits     # the version a run names with this server's URL
    """
    try:
        datasets = open_datasets(paths)
    except DatasetError as e:
        raise InputError(str(e)) from None

    def ready(url: str) -> None:
        click.echo(f"serving {len(datasets)} dataset{'' if len(datasets) == 1 else 's'} on {url}")
        for version, root in datasets.items():
            click.echo(f"  {version}  {root}")

    asyncio.run(serve_until_signal(dataset_app(datasets), host, port, ready))
    click.echo("stopped", err=True)


data_group.add_command(serve_command)
