"""hivemarket's peer side: identity, the signed envelope, the DHT node, the hardware probe and the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hivemarket")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
