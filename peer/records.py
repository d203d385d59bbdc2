"""Signed capability records: what a peer tells the swarm about itself through the DHT.

All records live under one well-known key, one subkey per peer. Two signatures protect them:

* hivemind's :class:`RSASignatureValidator` makes the subkey carry the peer's RSA owner key, so only that
  peer can write or overwrite its entry;
* :class:`AccountSignatureValidator` requires the record to carry an Ed25519 signature by the account it
  names over the record *and* the subkey, so a peer cannot claim another account, nor replay another
  peer's signed record under its own subkey.

A :class:`SchemaValidator` rejects records that do not have the documented shape. Every peer runs the
validators on every record it stores or receives, so a forged record is dropped by honest peers.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_logger

from peer.protocol.identity import Identity, IdentityError, verify_signature

logger = get_logger(__name__)

CAPABILITY_KEY = "hivemarket_peers_v1"
_CAPABILITY_KEY_ID = DHTID.generate(source=CAPABILITY_KEY).to_bytes()


class CapabilityRecord(pydantic.BaseModel):
    """The shape of one peer's record (strict types: the schema validator forbids conversions)."""

    account: pydantic.constr(strict=True, regex=r"^[0-9a-f]{64}$")  # type: ignore[valid-type]
    peer_id: pydantic.StrictStr
    maddrs: list[pydantic.StrictStr]
    hardware: dict[pydantic.StrictStr, Any]
    roles: list[pydantic.StrictStr]
    version: pydantic.StrictStr
    expires_at: pydantic.StrictFloat
    signature: pydantic.StrictBytes


class CapabilitySchema(pydantic.BaseModel):
    hivemarket_peers_v1: dict[BytesWithPublicKey, CapabilityRecord]


def _payload_bytes(fields: dict[str, Any], subkey: bytes) -> bytes:
    """Canonical bytes the account signs: the record without its signature, bound to the DHT subkey.

    ``subkey`` is the subkey as the application passes it to ``DHT.store`` (the RSA owner marker).
    """
    unsigned = {k: v for k, v in sorted(fields.items()) if k != "signature"}
    return msgpack.packb([b"hivemarket-capability-v1", subkey, unsigned], use_bin_type=True)


def build_record(
    identity: Identity,
    subkey: bytes,
    *,
    peer_id: str,
    maddrs: list[str],
    hardware: dict[str, Any],
    roles: list[str],
    version: str,
    expires_at: float,
) -> dict[str, Any]:
    """A record signed by ``identity`` for the DHT subkey ``subkey`` (the peer's RSA owner key)."""
    record: dict[str, Any] = dict(
        account=identity.account,
        peer_id=peer_id,
        maddrs=list(maddrs),
        hardware=hardware,
        roles=list(roles),
        version=version,
        expires_at=float(expires_at),
    )
    record["signature"] = identity.sign(_payload_bytes(record, subkey))
    return record


def record_is_authentic(record: dict[str, Any], subkey: bytes) -> bool:
    """True when the record's signature was made by the account it names, for this subkey."""
    try:
        return verify_signature(record["account"], record["signature"], _payload_bytes(record, subkey))
    except (KeyError, TypeError, IdentityError):
        return False


class AccountSignatureValidator(RecordValidatorBase):
    """Rejects capability records not signed by the account they name (see the module docstring)."""

    def validate(self, record: DHTRecord) -> bool:
        if record.key != _CAPABILITY_KEY_ID:
            return True
        try:
            value = DHTProtocol.serializer.loads(record.value)
            subkey = DHTProtocol.serializer.loads(record.subkey)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return False
        if (
            not isinstance(value, dict)
            or not isinstance(subkey, bytes)
            or not record_is_authentic(value, subkey)
        ):
            logger.debug(f"Rejected a capability record with a bad account signature: {record}")
            return False
        return value.get("expires_at") == record.expiration_time

    @property
    def priority(self) -> int:
        # Runs after the RSA validator (priority 10) has stripped the RSA signature from the value.
        return 5


def record_validators(rsa_validator: RSASignatureValidator) -> list[RecordValidatorBase]:
    """The validators every hivemarket DHT node runs."""
    return [rsa_validator, SchemaValidator(CapabilitySchema, prefix=None), AccountSignatureValidator()]


def public_record(record: dict[str, Any], expiration_time: float) -> dict[str, Any]:
    """What ``hivemarket peers`` shows for a record: plain JSON types, no signature bytes."""
    shown = {k: v for k, v in record.items() if k != "signature"}
    shown["expires_at"] = expiration_time
    return shown
