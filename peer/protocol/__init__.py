"""The protocol: everything the coordinator and a peer must agree on, and nothing else.

This package imports neither wing (``coordinator/``, the rest of ``peer/``); both import it. A client or
a peer written in another language matches these modules and nothing else (docs/api.md, "The signed
envelope", is the walk-through). Read them in this order:

=============================  ==========================================================================
:mod:`.identity`               accounts: the hex of an Ed25519 public key; the key file (PKCS8 PEM, 0600)
:mod:`.envelope`               the four headers and the signed bytes of every mutating request
:mod:`.money`                  money on the wire: decimal strings with at most 6 places, never floats
:mod:`.spec`                   the run spec a researcher launches (TOML), validated the same everywhere
:mod:`.states`                 run, audit and pay states, and which groups of run states mean what
:mod:`.schemas`                the types every body uses (money, accounts, errors, content types,
                               headers) and the bodies of accounts, offers, leases, peers and the market
:mod:`.run_schemas`            the bodies of runs: creating one, a quote, reports, audits, the model
                               (``/openapi.json`` is built from both)
:mod:`.client`                 the typed async client of that API, with safe retries (same bytes, same
                               nonce), and its settings
:mod:`.sketch`                 the gradient and parameter sketches reports commit to and audits compare:
                               seeds, dimensions, the distance
:mod:`.dataset`                the dataset format: shards, the manifest, the version (the manifest's hash)
:mod:`.assignment`             which samples each peer trains on, per epoch, reproducible by anyone
:mod:`.dataset_server`         the HTTP routes of a data location (the coordinator and ``hivemarket data
                               serve`` mount the same ones)
=============================  ==========================================================================

One module here is not protocol: :mod:`.commands` holds what both wings' commands share (exit status 2
for bad input, how a server binds and reports its URL); its docstring says why it lives here.

``__version__`` is the package's version; the OpenAPI document and DHT records carry it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hivemarket")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
