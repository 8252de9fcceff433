"""PemSigner: each algorithm signs what the matching ``cryptography`` public key verifies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cardseal.errors import ConfigError
from cardseal.keys.jwk import public_jwk, thumbprint
from cardseal.keys.signing import (
    PemSigner,
    Signer,
    check_alg_fits,
    default_alg_for,
    generate_private_key_pem,
)

MESSAGE = b"eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def _verify(alg: str, public: Any, signature: bytes, data: bytes) -> None:
    """Raise InvalidSignature unless ``signature`` is a valid JOSE ``alg`` signature."""
    if alg == "RS256":
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "PS256":
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public.verify(signature, data, pss, hashes.SHA256())
    elif alg == "ES256":
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        public.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    else:
        public.verify(signature, data)


@pytest.mark.parametrize(
    ("alg", "key_name", "size"),
    [("RS256", "rsa", 256), ("PS256", "rsa", 256), ("ES256", "p256", 64),
     ("EdDSA", "ed25519", 64)],
)
def test_signature_verifies_with_the_public_key(
    keys: dict[str, Any], alg: str, key_name: str, size: int
) -> None:
    private = keys[key_name]
    signer = PemSigner(private, alg=alg)
    assert signer.alg == alg
    for _ in range(5):  # ES256: r or s with leading zero bytes still give 64 bytes
        signature = signer.sign(MESSAGE)
        assert len(signature) == size
        _verify(alg, private.public_key(), signature, MESSAGE)
    with pytest.raises(InvalidSignature):
        _verify(alg, private.public_key(), signer.sign(MESSAGE), MESSAGE + b"x")


def test_pss_is_randomized_and_pkcs1_is_not(keys: dict[str, Any]) -> None:
    assert PemSigner(keys["rsa"], alg="PS256").sign(MESSAGE) != PemSigner(
        keys["rsa"], alg="PS256").sign(MESSAGE)
    assert PemSigner(keys["rsa"], alg="RS256").sign(MESSAGE) == PemSigner(
        keys["rsa"], alg="RS256").sign(MESSAGE)


def test_es256_signature_is_r_concatenated_with_s(keys: dict[str, Any]) -> None:
    signature = PemSigner(keys["p256"]).sign(MESSAGE)
    assert len(signature) == 64
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    keys["p256"].public_key().verify(encode_dss_signature(r, s), MESSAGE,
                                     ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    ("key_name", "alg"), [("rsa", "RS256"), ("p256", "ES256"), ("ed25519", "EdDSA")]
)
def test_default_alg_and_kid(keys: dict[str, Any], key_name: str, alg: str) -> None:
    signer = PemSigner(keys[key_name])
    assert signer.alg == alg
    assert signer.kid == thumbprint(public_jwk(keys[key_name].public_key()))
    verification = signer.verification_key()
    assert (verification.kid, verification.alg) == (signer.kid, alg)
    assert repr(signer) == f"PemSigner(alg={alg!r}, kid={signer.kid!r})"
    assert isinstance(signer, Signer)


@pytest.mark.parametrize(
    ("key_name", "alg"),
    [
        ("rsa", "ES256"), ("rsa", "EdDSA"),
        ("p256", "RS256"), ("p256", "PS256"), ("p256", "EdDSA"),
        ("p384", "ES256"),
        ("ed25519", "RS256"), ("ed25519", "ES256"),
        ("rsa", "HS256"), ("rsa", "none"), ("rsa", "RS384"), ("p384", "ES384"),
    ],
)
def test_alg_that_does_not_fit_the_key(keys: dict[str, Any], key_name: str, alg: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        PemSigner(keys[key_name], alg=alg)
    assert excinfo.value.code == "config_invalid"


def test_p384_has_no_default_alg(keys: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        default_alg_for(keys["p384"].public_key())
    assert excinfo.value.code == "config_invalid"


@pytest.mark.parametrize("alg", ["RS256", "PS256", None])
def test_rsa_below_2048_bits_is_refused(alg: str | None) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the test
    with pytest.raises(ConfigError) as excinfo:
        PemSigner(small, alg=alg)
    assert excinfo.value.code == "config_invalid"
    with pytest.raises(ConfigError):
        check_alg_fits(small.public_key(), "RS256")


def test_rsa_3072_is_accepted() -> None:
    big = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    assert len(PemSigner(big, alg="PS256").sign(MESSAGE)) == 384


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_generated_pem_loads_from_file(tmp_path: Path, alg: str) -> None:
    path = tmp_path / "signing.pem"
    path.write_bytes(generate_private_key_pem(alg))
    signer = PemSigner.from_file(path, alg=alg)
    assert signer.alg == alg
    _verify(alg, signer.public_key, signer.sign(MESSAGE), MESSAGE)


def test_generate_refuses_unknown_alg() -> None:
    with pytest.raises(ConfigError) as excinfo:
        generate_private_key_pem("HS256")
    assert excinfo.value.code == "config_invalid"


def test_from_file_errors(tmp_path: Path, keys: dict[str, Any]) -> None:
    encrypted = keys["p256"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"))
    public = keys["p256"].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    other = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    for name, data in (("enc.pem", encrypted), ("pub.pem", public), ("x.pem", other),
                       ("junk.pem", b"junk")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError) as excinfo:
            PemSigner.from_file(tmp_path / name)
        assert excinfo.value.code == "config_invalid"
    with pytest.raises(ConfigError) as excinfo:
        PemSigner.from_file(tmp_path / "missing.pem")
    assert excinfo.value.code == "config_invalid"
