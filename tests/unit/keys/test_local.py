"""The local key provider (keyring file, AES-256-GCM) and the KeyProviders registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cardseal.errors import ConfigError, DecryptionError
from cardseal.keys.base import DataKey, KeyProvider, KeyProviders, scheme_of
from cardseal.keys.local import LocalKeyProvider, add_key_version, create_keyring

MAIN = "local://main"
OTHER = "local://other"
CONTEXT = {"purpose": "test", "iss": "a"}


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    path = tmp_path / "keyring.json"
    create_keyring(path, ["main", "other"])
    return path


@pytest.fixture
def provider(keyring: Path) -> LocalKeyProvider:
    return LocalKeyProvider.from_file(keyring)


def decrypt_code(provider: KeyProvider, key_uri: str, blob: bytes,
                 context: dict[str, str] | None) -> str:
    with pytest.raises(DecryptionError) as excinfo:
        provider.decrypt(key_uri, blob, context)
    return excinfo.value.code


# -- encrypt / decrypt ----------------------------------------------------------------------------


@pytest.mark.parametrize("context", [None, {}, CONTEXT])
def test_round_trip(provider: LocalKeyProvider, context: dict[str, str] | None) -> None:
    blob = provider.encrypt(MAIN, b"card json", context)
    assert b"card json" not in blob
    assert provider.decrypt(MAIN, blob, context) == b"card json"


def test_ciphertexts_are_randomized(provider: LocalKeyProvider) -> None:
    assert provider.encrypt(MAIN, b"x", None) != provider.encrypt(MAIN, b"x", None)


def test_context_order_does_not_matter(provider: LocalKeyProvider) -> None:
    blob = provider.encrypt(MAIN, b"x", {"a": "1", "b": "2"})
    assert provider.decrypt(MAIN, blob, {"b": "2", "a": "1"}) == b"x"


@pytest.mark.parametrize(
    ("sealed_with", "opened_with"),
    [
        (CONTEXT, None),
        (None, CONTEXT),
        (CONTEXT, {**CONTEXT, "iss": "b"}),
        (CONTEXT, {**CONTEXT, "jti": "x"}),
        ({"a": "1"}, {"a": "1", "b": ""}),
    ],
)
def test_wrong_context_fails(
    provider: LocalKeyProvider, sealed_with: dict[str, str] | None,
    opened_with: dict[str, str] | None,
) -> None:
    blob = provider.encrypt(MAIN, b"x", sealed_with)
    assert decrypt_code(provider, MAIN, blob, opened_with) == "decryption_failed"


def test_ciphertext_under_another_key_is_not_allowed(provider: LocalKeyProvider) -> None:
    blob = provider.encrypt(OTHER, b"x", None)
    assert decrypt_code(provider, MAIN, blob, None) == "kms_key_not_allowed"
    assert provider.decrypt(OTHER, blob, None) == b"x"


def test_ciphertext_from_another_keyring_fails(provider: LocalKeyProvider, tmp_path: Path) -> None:
    create_keyring(tmp_path / "foreign.json", ["main"])
    foreign = LocalKeyProvider.from_file(tmp_path / "foreign.json")
    blob = foreign.encrypt(MAIN, b"x", None)
    assert decrypt_code(provider, MAIN, blob, None) == "decryption_failed"


def _tampered(blob: bytes) -> list[bytes]:
    flips = [len(blob) - 1, len(blob) - 17, len(blob) - 20, 14, 0]  # tag, ct, iv, version, magic
    out = [blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:] for i in flips]
    out += [blob[:n] for n in (0, 3, 4, 5, 9, 12, len(blob) // 2, len(blob) - 1)]
    out += [blob + b"\x00", blob + blob, b"\x00" * 7000]
    return out


def test_tampered_truncated_or_extended_blob_fails(provider: LocalKeyProvider) -> None:
    blob = provider.encrypt(MAIN, b"card json", CONTEXT)
    for bad in _tampered(blob):
        assert decrypt_code(provider, MAIN, bad, CONTEXT) == "decryption_failed"


def test_renamed_blob_is_not_allowed(provider: LocalKeyProvider) -> None:
    blob = provider.encrypt(MAIN, b"x", None)
    renamed = blob[:5] + b"mbin" + blob[9:]  # claims key "mbin"
    assert decrypt_code(provider, MAIN, renamed, None) == "kms_key_not_allowed"


def test_unknown_key_name_on_encrypt(provider: LocalKeyProvider) -> None:
    with pytest.raises(ConfigError) as excinfo:
        provider.encrypt("local://nope", b"x", None)
    assert excinfo.value.code == "config_invalid"


@pytest.mark.parametrize("uri", ["main", "aws-kms://main", "local://", "local://a b",
                                 "local://" + "a" * 65, "local://-x"])
def test_bad_key_uris(provider: LocalKeyProvider, uri: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        provider.encrypt(uri, b"x", None)
    assert excinfo.value.code == "config_invalid"


def test_generate_data_key(provider: LocalKeyProvider) -> None:
    data_key = provider.generate_data_key(MAIN, CONTEXT)
    assert len(data_key.plaintext) == 32
    assert provider.decrypt(MAIN, data_key.wrapped, CONTEXT) == data_key.plaintext
    assert decrypt_code(provider, MAIN, data_key.wrapped, None) == "decryption_failed"


def test_data_key_repr_is_redacted(provider: LocalKeyProvider) -> None:
    data_key = provider.generate_data_key(MAIN, None)
    for text in (repr(data_key), str(data_key)):
        assert text == "DataKey(<redacted>)"
        assert data_key.plaintext.hex() not in text
    assert repr(DataKey(plaintext=b"\x01" * 32, wrapped=b"w")) == "DataKey(<redacted>)"


# -- the keyring file -------------------------------------------------------------------------


def test_created_keyring_is_private(keyring: Path) -> None:
    assert keyring.stat().st_mode & 0o777 == 0o600
    assert LocalKeyProvider.from_file(keyring).key_names == ["main", "other"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_keyring_readable_by_others_is_refused(keyring: Path, mode: int) -> None:
    os.chmod(keyring, mode)
    with pytest.raises(ConfigError) as excinfo:
        LocalKeyProvider.from_file(keyring)
    assert excinfo.value.code == "config_invalid"
    assert "0600" in excinfo.value.message


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        "[]",
        '{"keys": {}}',
        '{"version": 1}',
        '{"keys": {"main": []}}',
        '{"keys": {"main": [{"id": "k1"}]}}',
        '{"keys": {"main": [{"id": "k1", "material": "AAAA"}]}}',
        '{"keys": {"main": [{"id": "k1", "material": "not base64!"}]}}',
        '{"keys": {"bad name": [{"id": "k1", "material": "' + "A" * 43 + '"}]}}',
    ],
)
def test_malformed_keyring(tmp_path: Path, document: str) -> None:
    path = tmp_path / "keyring.json"
    path.write_text(document)
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as excinfo:
        LocalKeyProvider.from_file(path)
    assert excinfo.value.code == "config_invalid"


def test_missing_keyring(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        LocalKeyProvider.from_file(tmp_path / "nope.json")
    assert excinfo.value.code == "config_invalid"


def test_key_material_never_in_errors(keyring: Path) -> None:
    material = json.loads(keyring.read_text())["keys"]["main"][0]["material"]
    os.chmod(keyring, 0o644)
    with pytest.raises(ConfigError) as excinfo:
        LocalKeyProvider.from_file(keyring)
    assert material not in str(excinfo.value)


def test_add_key_version_rotates_encryption(keyring: Path) -> None:
    before = LocalKeyProvider.from_file(keyring)
    old_blob = before.encrypt(MAIN, b"old", CONTEXT)
    version_id = add_key_version(keyring, "main")
    assert keyring.stat().st_mode & 0o777 == 0o600
    after = LocalKeyProvider.from_file(keyring)
    new_blob = after.encrypt(MAIN, b"new", CONTEXT)
    assert version_id.encode() in new_blob[: 10 + len(version_id)]
    assert version_id.encode() not in old_blob
    assert after.decrypt(MAIN, old_blob, CONTEXT) == b"old"
    assert after.decrypt(MAIN, new_blob, CONTEXT) == b"new"
    # The old keyring does not know the new version.
    assert decrypt_code(before, MAIN, new_blob, CONTEXT) == "decryption_failed"


def test_add_key_version_can_add_a_new_name(keyring: Path) -> None:
    add_key_version(keyring, "third")
    provider = LocalKeyProvider.from_file(keyring)
    assert provider.key_names == ["main", "other", "third"]
    blob = provider.encrypt("local://third", b"x", None)
    assert decrypt_code(provider, MAIN, blob, None) == "kms_key_not_allowed"


_BAD_KEYS: list[dict[str, list[tuple[str, bytes]]]] = [
    {}, {"main": []}, {"main": [("k1", b"short")]}, {"a/b": [("k1", b"\0" * 32)]},
]


@pytest.mark.parametrize("keys", _BAD_KEYS)
def test_constructor_validates_keys(keys: dict[str, list[tuple[str, bytes]]]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        LocalKeyProvider(keys=keys)
    assert excinfo.value.code == "config_invalid"


# -- the registry -----------------------------------------------------------------------------


class _FakeProvider(KeyProvider):
    scheme = "fake"

    def encrypt(self, key_uri: str, plaintext: bytes, context: object) -> bytes:
        return plaintext[::-1]

    def decrypt(self, key_uri: str, ciphertext: bytes, context: object) -> bytes:
        return ciphertext[::-1]

    def generate_data_key(self, key_uri: str, context: object) -> DataKey:
        return DataKey(plaintext=b"\0" * 32, wrapped=b"\1" * 32)


def test_registering_a_scheme_twice_raises(provider: LocalKeyProvider) -> None:
    providers = KeyProviders(provider)
    with pytest.raises(ConfigError) as excinfo:
        providers.register(provider)
    assert excinfo.value.code == "config_invalid"
    with pytest.raises(ConfigError) as excinfo:
        KeyProviders(_FakeProvider(), _FakeProvider())
    assert excinfo.value.code == "config_invalid"


@pytest.mark.parametrize("uri", ["aws-kms://alias/x", "gcp-kms://x", "main", "local:/main",
                                 "local://"])
def test_unknown_or_malformed_scheme_raises(provider: LocalKeyProvider, uri: str) -> None:
    providers = KeyProviders(provider)
    with pytest.raises(ConfigError) as excinfo:
        providers.decrypt(uri, b"x", None)
    assert excinfo.value.code == "config_invalid"
    assert providers.total_calls == 0


def test_scheme_of() -> None:
    assert scheme_of("aws-kms://arn:aws:kms:eu-west-1:1:key/x") == "aws-kms"
    assert scheme_of("local://main") == "local"


def test_dispatch_by_scheme_and_call_counting(provider: LocalKeyProvider) -> None:
    providers = KeyProviders(provider, _FakeProvider())
    blob = providers.encrypt(MAIN, b"x", CONTEXT)
    assert providers.decrypt(MAIN, blob, CONTEXT) == b"x"
    assert providers.encrypt("fake://k", b"ab", None) == b"ba"
    providers.generate_data_key(MAIN, None)
    providers.generate_data_key("fake://k", None)
    with pytest.raises(DecryptionError):
        providers.decrypt(MAIN, b"junk", None)
    assert providers.calls == {"encrypt": 2, "decrypt": 2, "generate_data_key": 2}
    assert providers.total_calls == 6
    assert providers.canonical_uri(MAIN) == MAIN
    assert providers.provider_for("fake://k").scheme == "fake"


def test_stale_temporary_file_does_not_widen_the_keyring(keyring: Path) -> None:
    stale = keyring.with_name(keyring.name + ".tmp")
    stale.write_text("left over")
    os.chmod(stale, 0o644)
    add_key_version(keyring, "main")
    assert keyring.stat().st_mode & 0o777 == 0o600
    assert not stale.exists()
    assert LocalKeyProvider.from_file(keyring).key_names == ["main", "other"]
