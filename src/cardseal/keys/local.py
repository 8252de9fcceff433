"""The local key provider: AES-256 master keys in a keyring file, ``local://NAME`` URIs.

The embedded default, so that cardseal runs on a machine with no cloud account. It has the
semantics of AWS KMS symmetric keys: Encrypt / Decrypt / GenerateDataKey, the encryption
context bound to the ciphertext, a key named on every decrypt, and several versions per key so
that rotation keeps old ciphertexts opening (like KMS automatic rotation). Several names in one
keyring let a new key take over sealing while issuers still allow the old one.

Keyring file (JSON, mode 0600)::

    {"version": 1, "keys": {"NAME": [{"id": "k1", "material": "<base64url 32 bytes>",
                                      "created": "2026-01-01T00:00:00Z"}, ...]}}

The last version of a name is the one that encrypts.

Ciphertext layout (all lengths in bytes)::

    b"CSK1" | name_len (1) | name (UTF-8) | version_len (1) | version id | iv (12) | ct | tag (16)

AAD = every byte before the IV, then ``0x00``, then the context as compact sorted-key JSON
(nothing after the ``0x00`` when there is no context).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cardseal._encoding import b64url_decode, b64url_encode, dumps_compact
from cardseal.errors import ConfigError, DecryptionError
from cardseal.keys.base import DataKey, EncryptionContext, KeyProvider

_MAGIC: Final = b"CSK1"
_IV_BYTES: Final = 12
_TAG_BYTES: Final = 16
_MAX_CIPHERTEXT_BYTES: Final = 6144  # AWS KMS accepts 4 KiB of plaintext; same spirit here
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True, repr=False)
class _KeyVersion:
    id: str
    aead: AESGCM


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _name_of(key_uri: str) -> str:
    if not key_uri.startswith("local://"):
        raise ConfigError("A local key URI looks like local://NAME.")
    name = key_uri[len("local://") :]
    if not _NAME_RE.fullmatch(name):
        raise ConfigError("A local key name is 1-64 letters, digits, '.', '_' or '-'.")
    return name


def _context_bytes(context: EncryptionContext | None) -> bytes:
    return b"" if not context else dumps_compact(dict(context))


class LocalKeyProvider(KeyProvider):
    """AES-256-GCM master keys from a keyring file. Construct with ``from_file``."""

    scheme: ClassVar[str] = "local"

    def __init__(self, *, keys: dict[str, list[tuple[str, bytes]]]) -> None:
        """``keys`` maps each name to its versions, oldest first: ``[(version_id, key), ...]``."""
        if not keys:
            raise ConfigError("The local keyring holds no keys.")
        self._keys: dict[str, dict[str, _KeyVersion]] = {}
        self._primary: dict[str, _KeyVersion] = {}
        for name, versions in keys.items():
            _name_of("local://" + name)
            if not versions:
                raise ConfigError(f"Local key {name!r} has no versions.")
            table: dict[str, _KeyVersion] = {}
            for version_id, material in versions:
                if len(material) != 32:
                    raise ConfigError(f"Local key {name!r} is not a 256-bit key.")
                table[version_id] = _KeyVersion(version_id, AESGCM(material))
            self._keys[name] = table
            self._primary[name] = table[versions[-1][0]]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LocalKeyProvider:
        """Load a keyring file. Raises ``ConfigError`` if it is missing, malformed or readable
        by group or others."""
        keyring = Path(path)
        try:
            mode = keyring.stat().st_mode
            document = json.loads(keyring.read_bytes())
        except (OSError, ValueError) as err:
            raise ConfigError(f"Cannot read the local keyring {str(keyring)!r}.") from err
        if mode & 0o077:
            raise ConfigError(f"The local keyring {str(keyring)!r} must be mode 0600.")
        try:
            keys = {
                name: [(v["id"], b64url_decode(v["material"])) for v in versions]
                for name, versions in document["keys"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"The local keyring {str(keyring)!r} is malformed.") from err
        return cls(keys=keys)

    @property
    def key_names(self) -> list[str]:
        return list(self._keys)

    # -- KMS operations ---------------------------------------------------------------------

    def encrypt(self, key_uri: str, plaintext: bytes, context: EncryptionContext | None) -> bytes:
        name = _name_of(key_uri)
        try:
            version = self._primary[name]
        except KeyError:
            raise ConfigError(f"No local key named {name!r}.") from None
        name_b = name.encode()
        vid_b = version.id.encode()
        prefix = _MAGIC + bytes([len(name_b)]) + name_b + bytes([len(vid_b)]) + vid_b
        iv = os.urandom(_IV_BYTES)
        sealed = version.aead.encrypt(iv, plaintext, prefix + b"\x00" + _context_bytes(context))
        return prefix + iv + sealed

    def decrypt(self, key_uri: str, ciphertext: bytes, context: EncryptionContext | None) -> bytes:
        name = _name_of(key_uri)
        parsed = _split(ciphertext)
        if parsed is None:
            raise DecryptionError(code="decryption_failed")
        blob_name, version_id, prefix, iv, sealed = parsed
        if blob_name != name:
            raise DecryptionError(code="kms_key_not_allowed")
        version = self._keys.get(name, {}).get(version_id)
        if version is None:
            raise DecryptionError(code="decryption_failed")
        try:
            return version.aead.decrypt(iv, sealed, prefix + b"\x00" + _context_bytes(context))
        except InvalidTag as err:
            raise DecryptionError(code="decryption_failed") from err

    def generate_data_key(self, key_uri: str, context: EncryptionContext | None) -> DataKey:
        plaintext = os.urandom(32)
        return DataKey(plaintext=plaintext, wrapped=self.encrypt(key_uri, plaintext, context))


def _split(blob: bytes) -> tuple[str, str, bytes, bytes, bytes] | None:
    """Parse a local ciphertext into (name, version, prefix, iv, ct+tag), or None."""
    if len(blob) > _MAX_CIPHERTEXT_BYTES or not blob.startswith(_MAGIC) or len(blob) < 6:
        return None
    pos = len(_MAGIC)
    name_len = blob[pos]
    pos += 1
    name_b = blob[pos : pos + name_len]
    pos += name_len
    if pos >= len(blob):
        return None
    vid_len = blob[pos]
    pos += 1
    vid_b = blob[pos : pos + vid_len]
    pos += vid_len
    if len(blob) < pos + _IV_BYTES + _TAG_BYTES:
        return None
    try:
        name, version_id = name_b.decode(), vid_b.decode()
    except UnicodeDecodeError:
        return None
    return name, version_id, blob[:pos], blob[pos : pos + _IV_BYTES], blob[pos + _IV_BYTES :]


# -- keyring files ----------------------------------------------------------------------------


def _write_private(path: Path, document: dict[str, Any]) -> None:
    """Write JSON readable by the owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # A stale temporary file would keep its own mode (O_CREAT sets it only on creation), and a
    # symlink there would be followed: remove it and create afresh, exclusively.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def _new_version(existing: list[dict[str, str]]) -> dict[str, str]:
    return {
        "id": f"k{len(existing) + 1}-{secrets.token_hex(4)}",
        "material": b64url_encode(os.urandom(32)),
        "created": _now_text(),
    }


def create_keyring(path: str | os.PathLike[str], names: list[str]) -> None:
    """Create a keyring file holding a fresh 256-bit key for each name."""
    for name in names:
        _name_of("local://" + name)
    _write_private(Path(path), {"version": 1, "keys": {n: [_new_version([])] for n in names}})


def add_key_version(path: str | os.PathLike[str], name: str) -> str:
    """Add a key (or, for an existing name, a new version that takes over encryption).

    Older versions stay, so every ciphertext made under them still decrypts. Returns the new
    version's id.
    """
    _name_of("local://" + name)
    keyring = Path(path)
    try:
        document = json.loads(keyring.read_bytes())
        versions = document["keys"].setdefault(name, [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"Cannot read the keyring {keyring}.") from None
    version = _new_version(versions)
    versions.append(version)
    _write_private(keyring, document)
    return version["id"]
