"""hivemarket's peer wing: the node on a peer's machine (DHT node, hardware probe, worker, trainer,
averaging, validator, data loader, tasks) and the ``hivemarket`` command line.

:mod:`peer.protocol` is what it shares with the coordinator; nothing here imports ``coordinator/``.
"""
