"""The libp2p keys of this peer's DHT nodes: a node's peer id is the hash of its key's public half.

``hivemarket peer start`` keeps one beside the account key (``identity.pem`` -> ``identity.p2p.key``),
made with it and reused at every start, so that the node's peer id, and the multiaddrs handed out to
others, survive restarts; the node also signs its capability record with it, so that the record keeps
one DHT subkey. A trainer writes a fresh key into its run's folder at each start: it then knows its
peer id before its DHT starts (a peer behind a NAT tells the run it is there before it can join the
run's DHT, :mod:`peer.trainer_setup`), and a restarted trainer is a new peer to the swarm, as before.

The file is the libp2p protobuf private key that p2pd's ``-id`` reads (RSA 2048 in PKCS#1, as hivemind
makes them), mode 0600. It is written and read here without hivemind, whose import takes seconds, so
that ``hivemarket identity`` stays quick; the encoding is libp2p's (``crypto.proto``: a key type, 0 for
RSA, then the key's DER bytes; a peer id is the base58 of the sha2-256 multihash of the public key's
encoding).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

if TYPE_CHECKING:
    from hivemind.utils.crypto import RSAPrivateKey

#: What a key file's name adds to the account key's stem.
SUFFIX = ".p2p.key"
_RSA = b"\x08\x00"  # field 1 (the key type), varint 0: RSA
_SHA2_256 = b"\x12\x20"  # the multihash prefix: sha2-256, 32 bytes


class P2PKeyError(ValueError):
    """A libp2p key file that cannot be read; the message names the file."""


def p2p_key_path(identity_file: Path) -> Path:
    """Where the node key of the account key ``identity_file`` lives: beside it."""
    return identity_file.with_name(identity_file.stem + SUFFIX)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key_message(der: bytes) -> bytes:
    """libp2p's ``PrivateKey``/``PublicKey`` message of an RSA key's DER bytes."""
    return _RSA + b"\x12" + _varint(len(der)) + der


def write_p2p_key(path: Path, *, replace: bool) -> bool:
    """Write a new key to ``path`` (mode 0600, created whole or not at all); an existing file is kept
    unless ``replace``. Whether a new key was written."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    der = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    fd, tmp = tempfile.mkstemp(prefix=".p2p-key-", dir=path.parent)  # mkstemp creates it as 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_key_message(der))
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # create only if absent: two starts at once keep one key
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise P2PKeyError(f"cannot read the node key {path}: {e.strerror}") from None
    key = None
    if raw.startswith(_RSA + b"\x12"):
        length, shift, at = 0, 0, len(_RSA) + 1
        while at < len(raw) and shift < 35:  # the DER's length, a varint
            length |= (raw[at] & 0x7F) << shift
            shift, at = shift + 7, at + 1
            if not raw[at - 1] & 0x80:
                break
        with contextlib.suppress(ValueError):
            key = serialization.load_der_private_key(raw[at : at + length], password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise P2PKeyError(f"node key {path} is not a libp2p RSA private key (make a new one: delete it)")
    return key


def peer_id_of(path: Path) -> str:
    """The peer id (base58) a node started with the key at ``path`` has."""
    public = (
        _private_key(path)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base58.b58encode(_SHA2_256 + hashlib.sha256(_key_message(public)).digest()).decode()


def signing_key_of(path: Path) -> RSAPrivateKey:
    """The key at ``path`` as hivemind's record-signing key (loaded through the state its pickling uses:
    hivemind has no other way to load one)."""
    from hivemind.utils.crypto import RSAPrivateKey

    der = _private_key(path).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return key
