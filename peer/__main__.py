"""``python -m peer`` is the ``hivemarket`` command (useful when the console script is not on PATH)."""

from peer.cli import main

main()
