"""AWS KMS over real HTTP: moto's server, the real boto3 client, cardseal's provider and signer.

Where moto differs from AWS KMS (issue 3, "Known gaps of the emulator") the fault proxy answers
as AWS documents it, and the test says so; production code is never bent to the emulator.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from moto.backends import get_backend
from typer.testing import CliRunner, Result

from cardseal import jws
from cardseal._encoding import b64url_decode
from cardseal.cli import app
from cardseal.client import Sealer
from cardseal.config import AwsKmsSettings
from cardseal.envelope import EnvelopeSealer, kms_direct_context, seal_kms_direct
from cardseal.errors import ConfigError, DecryptionError, TokenError
from cardseal.keys.aws_kms import AwsKmsKeyProvider, AwsKmsSigner
from cardseal.keys.base import KeyProviders
from cardseal.keys.jwk import KeySource, VerificationKey, VerificationKeySet
from cardseal.opener import CardOpener
from cardseal.scaffold import init_dir
from cardseal.testing import AUDIENCE, ISSUER, sample_card, sample_card_json
from cardseal.tokens import IssuerPolicy, TokenVerifier
from tests.integration.conftest import REGION, KmsEmulator, aws_settings, pem_signer, signed_token
from tests.integration.kms_proxy import KmsProxy, Reply, error_reply

pytestmark = pytest.mark.integration

MOTO_ACCOUNT = "123456789012"


def policy(keys: KeySource, allowed: tuple[str, ...], **overrides: Any) -> IssuerPolicy:
    settings: dict[str, Any] = {"formats": frozenset({"envelope", "kms-direct"})}
    settings.update(overrides)
    return IssuerPolicy(iss=ISSUER, audience=AUDIENCE, keys=keys, allowed_kms_keys=allowed,
                        **settings)


def gateway(providers: KeyProviders, issuer: IssuerPolicy) -> tuple[TokenVerifier, CardOpener]:
    return TokenVerifier(issuers=[issuer]), CardOpener(providers=providers, issuers=[issuer])


# -- sealing and opening with symmetric keys --------------------------------------------------


@pytest.mark.parametrize("fmt", ["envelope", "kms-direct"])
@pytest.mark.parametrize(("sealed_by", "allowed_by"),
                         [("id", "alias"), ("arn", "id"), ("alias", "arn")])
def test_seal_and_open_by_key_id_arn_and_alias(
    kms: KmsEmulator, provider: AwsKmsKeyProvider, fmt: str, sealed_by: str, allowed_by: str
) -> None:
    """The client names the key one way, the gateway another: it is one key."""
    key = kms.symmetric_key()
    providers = KeyProviders(provider)
    signer = pem_signer()
    sealer = Sealer(signer=signer, issuer=ISSUER, audience=AUDIENCE,
                    kms_key=key.uri(sealed_by), providers=providers, format=fmt)
    verifier, opener = gateway(providers, policy(VerificationKeySet([signer.verification_key()]),
                                                 (key.uri(allowed_by),)))
    card = sample_card()

    verified = verifier.verify(sealer.seal(card))

    assert verified.meta_data_format == fmt
    assert opener.open_card(verified).pan == card.pan


def test_alias_id_and_arn_resolve_to_one_arn_once(kms: KmsEmulator, proxy: KmsProxy) -> None:
    key = kms.symmetric_key()
    provider = AwsKmsKeyProvider.from_settings(aws_settings(proxy.endpoint))
    try:
        # What is known without a call (the gateway's event loop asks only this): the ARN.
        assert provider.known_canonical_uri(key.uri("arn")) == key.uri("arn")
        assert provider.known_canonical_uri(key.uri("alias")) is None
        assert provider.known_canonical_uri(key.uri("id")) is None
        assert proxy.attempts == {}
        for _ in range(3):
            for name in ("alias", "id", "arn"):
                assert provider.canonical_uri(key.uri(name)) == key.uri("arn")
                assert provider.known_canonical_uri(key.uri(name)) == key.uri("arn")
        with pytest.raises(ConfigError):
            provider.canonical_uri("aws-kms://alias/no-such-key")
    finally:
        provider.client.close()
    # alias once, id once, the ARN never (a gateway allowed only kms:Decrypt names keys by
    # ARN), and the unknown alias once
    assert proxy.attempts == {"DescribeKey": 3}


@pytest.mark.parametrize("uri", ["aws-kms://", "aws-kms://alias/has space", "local://main",
                                 "aws-kms://" + "a" * 2049])
def test_malformed_key_uri_is_a_config_error(provider: AwsKmsKeyProvider, uri: str) -> None:
    with pytest.raises(ConfigError):
        provider.encrypt(uri, b"x", None)


# -- KMS-held signing keys ---------------------------------------------------------------------


@pytest.mark.parametrize(("alg", "key_spec"), [("RS256", "RSA_2048"), ("ES256", "ECC_NIST_P256")])
def test_kms_signed_tokens_verify_with_the_ordinary_verifier(
    kms: KmsEmulator, provider: AwsKmsKeyProvider, alg: str, key_spec: str
) -> None:
    arn = kms.signing_key(key_spec)
    signer = AwsKmsSigner(key_uri="aws-kms://" + arn, kms_client=provider.client, alg=alg)
    # What the gateway trusts is built from GetPublicKey alone, published as a JWKS.
    public = serialization.load_der_public_key(kms.client.get_public_key(KeyId=arn)["PublicKey"])
    published = VerificationKeySet(
        [VerificationKey.from_public_key(public, alg=alg)]  # type: ignore[arg-type]
    ).to_jwks()
    keys = VerificationKeySet.from_jwks(json.loads(json.dumps(published)))
    assert signer.kid == published["keys"][0]["kid"]
    symmetric = kms.symmetric_key()
    providers = KeyProviders(provider)
    sealer = Sealer(signer=signer, issuer=ISSUER, audience=AUDIENCE,
                    kms_key=symmetric.uri("arn"), providers=providers)
    verifier, opener = gateway(providers, policy(keys, (symmetric.uri("alias"),),
                                                 algorithms=frozenset({alg})))

    token = sealer.seal(sample_card())
    verified = verifier.verify(token)

    assert verified.header == {"alg": alg, "kid": signer.kid, "typ": "card+jwt"}
    assert len(jws.parse_compact(token).signature) == (64 if alg == "ES256" else 256)
    assert opener.open_card(verified).last4 == "1111"


def aws_sign(signed: list[dict[str, Any]]) -> Any:
    """A Sign responder with AWS's semantics, from the emulator's own key material.

    moto signs PSS with the maximum salt length (AWS: 32 bytes for RSASSA_PSS_SHA_256) and
    hashes a ``DIGEST`` message again (AWS signs the digest as given).
    """

    def respond(request: dict[str, Any]) -> Reply:
        signed.append(request)
        backend = get_backend("kms")[MOTO_ACCOUNT][REGION]
        key: Any = backend.keys[backend.any_id_to_key_id(request["KeyId"])]
        private = key.private_key.private_key  # moto's wrapper holds a cryptography key
        message = base64.b64decode(request["Message"])
        digest: Any = hashes.SHA256()
        if request.get("MessageType") == "DIGEST":
            digest = Prehashed(hashes.SHA256())
        algorithm = request["SigningAlgorithm"]
        if algorithm == "RSASSA_PSS_SHA_256":
            signature = private.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                     digest)
        elif algorithm == "RSASSA_PKCS1_V1_5_SHA_256":
            signature = private.sign(message, padding.PKCS1v15(), digest)
        else:
            signature = private.sign(message, ec.ECDSA(digest))
        return 200, {"KeyId": key.arn, "SigningAlgorithm": algorithm,
                     "Signature": base64.b64encode(signature).decode()}

    return respond


def test_ps256_signs_with_the_32_byte_salt_of_aws(kms: KmsEmulator, proxy: KmsProxy) -> None:
    signed: list[dict[str, Any]] = []
    proxy.responders["Sign"] = aws_sign(signed)
    arn = kms.signing_key("RSA_2048")
    client = AwsKmsKeyProvider.from_settings(aws_settings(proxy.endpoint)).client
    try:
        signer = AwsKmsSigner(key_uri="aws-kms://" + arn, kms_client=client, alg="PS256")
        symmetric = kms.symmetric_key()
        providers = KeyProviders(AwsKmsKeyProvider(kms_client=client))
        sealer = Sealer(signer=signer, issuer=ISSUER, audience=AUDIENCE,
                        kms_key=symmetric.uri("arn"), providers=providers)
        verifier, _ = gateway(providers, policy(VerificationKeySet([signer.verification_key()]),
                                                (symmetric.uri("arn"),),
                                                algorithms=frozenset({"PS256"})))
        assert verifier.verify(sealer.seal(sample_card())).header["alg"] == "PS256"
    finally:
        client.close()
    assert [(r["MessageType"], r["SigningAlgorithm"]) for r in signed] == [
        ("RAW", "RSASSA_PSS_SHA_256")]


@pytest.mark.parametrize(("alg", "key_spec"), [("RS256", "RSA_2048"), ("ES256", "ECC_NIST_P256")])
def test_messages_over_4_kib_are_signed_as_their_digest(
    kms: KmsEmulator, proxy: KmsProxy, alg: str, key_spec: str
) -> None:
    signed: list[dict[str, Any]] = []
    proxy.responders["Sign"] = aws_sign(signed)
    arn = kms.signing_key(key_spec)
    client = AwsKmsKeyProvider.from_settings(aws_settings(proxy.endpoint)).client
    try:
        signer = AwsKmsSigner(key_uri="aws-kms://" + arn, kms_client=client, alg=alg)
        header = {"alg": alg, "kid": signer.kid}
        token = jws.encode_compact(header, b"x" * 5000, signer.sign)
    finally:
        client.close()
    assert signed[0]["MessageType"] == "DIGEST"
    assert jws.verify_signature(jws.parse_compact(token), signer.public_key, alg)


def test_a_signer_needs_an_asymmetric_key_that_fits_the_algorithm(
    kms: KmsEmulator, provider: AwsKmsKeyProvider
) -> None:
    symmetric = kms.symmetric_key()
    rsa_key = "aws-kms://" + kms.signing_key("RSA_2048")
    with pytest.raises(ConfigError):
        AwsKmsSigner(key_uri=symmetric.uri("arn"), kms_client=provider.client, alg="RS256")
    with pytest.raises(ConfigError):
        AwsKmsSigner(key_uri=rsa_key, kms_client=provider.client, alg="ES256")
    with pytest.raises(ConfigError):
        AwsKmsSigner(key_uri=rsa_key, kms_client=provider.client, alg="EdDSA")
    with pytest.raises(ConfigError):
        AwsKmsSigner(key_uri="aws-kms://alias/no-such-key", kms_client=provider.client)
    assert AwsKmsSigner(key_uri=rsa_key, kms_client=provider.client).alg == "RS256"


# -- keys the issuer does not allow, contexts that do not match ---------------------------------


@pytest.mark.parametrize("sealed_by", ["arn", "alias"])
def test_envelope_under_a_key_not_allowed_is_never_decrypted(
    kms: KmsEmulator, proxy: KmsProxy, sealed_by: str
) -> None:
    allowed, other = kms.symmetric_key(), kms.symmetric_key()
    provider = AwsKmsKeyProvider.from_settings(aws_settings(proxy.endpoint))
    try:
        providers = KeyProviders(provider)
        signer = pem_signer()
        sealer = Sealer(signer=signer, issuer=ISSUER, audience=AUDIENCE,
                        kms_key=other.uri(sealed_by), providers=providers)
        verifier, opener = gateway(
            providers, policy(VerificationKeySet([signer.verification_key()]),
                              (allowed.uri("arn"),)))
        verified = verifier.verify(sealer.seal(sample_card()))
        proxy.reset()

        with pytest.raises(DecryptionError) as caught:
            opener.open_card(verified)
    finally:
        provider.client.close()
    assert caught.value.code == "kms_key_not_allowed"
    assert proxy.attempts["Decrypt"] == 0
    assert providers.calls["decrypt"] == 0


def aws_incorrect_key(request: dict[str, Any], status: int, document: dict[str, Any]) -> Reply:
    """moto answers a Decrypt whose KeyId is not the ciphertext's key with AccessDenied;
    AWS KMS answers IncorrectKeyException (Decrypt API reference)."""
    if document.get("__type") == "AccessDeniedException":
        return error_reply(400, "IncorrectKeyException",
                           "The key ID in the request does not identify a CMK that can "
                           "perform this operation.")
    return status, document


def test_kms_direct_under_a_key_not_allowed_is_refused_by_kms(
    kms: KmsEmulator, proxy: KmsProxy
) -> None:
    """kms-direct names no key, so each allowed key is named in turn and KMS refuses each
    (IncorrectKeyException): two Decrypt calls, no plaintext, ``kms_key_not_allowed``."""
    proxy.rewriters["Decrypt"] = aws_incorrect_key
    first, second, other = kms.symmetric_key(), kms.symmetric_key(), kms.symmetric_key()
    provider = AwsKmsKeyProvider.from_settings(aws_settings(proxy.endpoint))
    try:
        providers = KeyProviders(provider)
        signer = pem_signer()
        sealer = Sealer(signer=signer, issuer=ISSUER, audience=AUDIENCE,
                        kms_key=other.uri("arn"), providers=providers, format="kms-direct")
        verifier, opener = gateway(
            providers, policy(VerificationKeySet([signer.verification_key()]),
                              (first.uri("arn"), second.uri("arn"))))
        verified = verifier.verify(sealer.seal(sample_card()))
        proxy.reset()

        with pytest.raises(DecryptionError) as caught:
            opener.open_card(verified)
    finally:
        provider.client.close()
    assert caught.value.code == "kms_key_not_allowed"
    assert proxy.attempts == {"Decrypt": 2}


@pytest.mark.parametrize("fmt", ["envelope", "kms-direct"])
def test_wrong_encryption_context_is_decryption_failed(
    kms: KmsEmulator, provider: AwsKmsKeyProvider, fmt: str
) -> None:
    """A ``meta_data`` sealed for another audience (envelope) or another token (kms-direct),
    moved into an otherwise valid token: KMS refuses the context."""
    key = kms.symmetric_key()
    providers = KeyProviders(provider)
    signer = pem_signer()
    jti = secrets.token_urlsafe(16)
    if fmt == "envelope":
        meta_data = EnvelopeSealer(providers=providers, key_uri=key.uri("arn")).seal(
            sample_card_json(), iss=ISSUER, aud="another-gateway", jti=jti)
    else:
        meta_data = seal_kms_direct(providers, key.uri("arn"), sample_card_json(),
                                    kms_direct_context(ISSUER, AUDIENCE, "another-token-jti"))
    verifier, opener = gateway(providers, policy(VerificationKeySet([signer.verification_key()]),
                                                 (key.uri("arn"),)))
    verified = verifier.verify(signed_token(signer, meta_data, jti))

    with pytest.raises(DecryptionError) as caught:
        opener.open_card(verified)
    assert caught.value.code == "decryption_failed"


def test_provider_refusals_map_to_the_contract_codes(
    kms: KmsEmulator, provider: AwsKmsKeyProvider
) -> None:
    key = kms.symmetric_key()
    context = {"purpose": "cardseal/meta_data", "iss": ISSUER, "aud": AUDIENCE}
    blob = provider.encrypt(key.uri("arn"), b"card", context)
    assert provider.decrypt(key.uri("alias"), blob, context) == b"card"
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    for ciphertext, ctx in ((tampered, context), (blob, None), (b"\x00" * 64, context)):
        with pytest.raises(DecryptionError) as caught:
            provider.decrypt(key.uri("arn"), ciphertext, ctx)
        assert caught.value.code == "decryption_failed"
    with pytest.raises(ConfigError):
        provider.encrypt("aws-kms://alias/no-such-key", b"card", None)
    with pytest.raises(ConfigError):
        provider.generate_data_key("aws-kms://alias/no-such-key", context)


# -- the seed's own client ---------------------------------------------------------------------


def seed_client(kms_key_id: str, credit_card_data: dict[str, str]) -> str:
    """Step 1 of seed/000_20a51ebf4fec5c82.txt as written, except: the key id and the card are
    parameters, the CiphertextBlob is base64-encoded (JSON cannot carry bytes; the contract's
    kms-direct format), and the key file and the client are closed after use."""
    import json
    import time
    from datetime import datetime, timedelta

    import boto3
    import jwt

    # AWS KMS client setup
    kms_client = boto3.client('kms', region_name='us-east-1')

    # KMS Key ID (replace this with your KMS key)
    KMS_KEY_ID = kms_key_id  # noqa: N806

    # Encrypt credit card data using AWS KMS
    def encrypt_credit_card_data(data: dict[str, str]) -> bytes:
        response = kms_client.encrypt(
            KeyId=KMS_KEY_ID,
            Plaintext=json.dumps(data).encode('utf-8')
        )
        return response['CiphertextBlob']

    # Create JWT with encrypted credit card data
    def create_jwt() -> str:
        encrypted_data = encrypt_credit_card_data(credit_card_data)

        payload = {
            'iss': 'payment-service',
            'aud': 'payment-gateway',
            'iat': int(time.time()),
            'exp': int((datetime.utcnow() + timedelta(minutes=30)).timestamp()),
            'meta_data': base64.b64encode(encrypted_data).decode('ascii'),
        }

        # Signing JWT with private key
        private_key = Path('private.pem').read_text()
        token = jwt.encode(payload, private_key, algorithm='RS256')

        return token

    try:
        return create_jwt()
    finally:
        kms_client.close()


@pytest.fixture
def utc_local_time() -> Iterator[None]:
    """The seed computes ``exp`` from a naive ``utcnow()``, right only where local time is UTC."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TZ", "UTC")
        time.tzset()
        yield
    time.tzset()


# The seed's code as written calls datetime.utcnow(), deprecated from Python 3.12.
@pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning")
def test_the_seed_client_against_the_emulator_opens_for_a_legacy_issuer(
    kms: KmsEmulator, provider: AwsKmsKeyProvider, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, utc_local_time: None,
) -> None:
    key = kms.symmetric_key()
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms.endpoint)  # the seed's client finds moto
    monkeypatch.chdir(tmp_path)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    Path("private.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    Path("public.pem").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    # The seed's dummy card expired in 12/25; the same card, still valid.
    card_data = {"card_number": "4111111111111111", "expiry_date": "12/99", "cvv": "123"}

    token = seed_client(key.key_id, card_data)

    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "JWT"}  # no kid, no card+jwt: legacy only
    legacy = policy(VerificationKeySet.load("public.pem"), (key.uri("alias"),),
                    formats=frozenset({"kms-direct"}), legacy=True, max_lifetime=1800)
    verifier, opener = gateway(KeyProviders(provider), legacy)
    verified = verifier.verify(token)
    card = opener.open_card(verified, now=datetime(2030, 1, 1))
    assert verified.jti is None and verified.replay_key.startswith("ct:")
    assert (card.pan, card.cvv) == ("4111111111111111", "123")
    strict = policy(VerificationKeySet.load("public.pem"), (key.uri("alias"),),
                    formats=frozenset({"kms-direct"}), max_lifetime=1800)
    with pytest.raises(TokenError) as refused:
        TokenVerifier(issuers=[strict]).verify(token)
    assert refused.value.code == "token_type_invalid"


# -- settings ----------------------------------------------------------------------------------


def test_from_settings_takes_region_and_endpoint_from_boto3s_environment(
    kms: KmsEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", REGION)  # boto3 alone ignores it; cardseal does not
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms.endpoint)
    provider = AwsKmsKeyProvider.from_settings(AwsKmsSettings(max_attempts=4, read_timeout=1.5))
    try:
        key = kms.symmetric_key()
        blob = provider.encrypt(key.uri("id"), b"x", None)
        assert provider.decrypt(key.uri("id"), blob, None) == b"x"
        config: Any = provider.client.meta.config
        assert provider.client.meta.region_name == REGION
        assert (config.connect_timeout, config.read_timeout) == (2.0, 1.5)
        assert config.retries == {"mode": "standard", "total_max_attempts": 4}
    finally:
        provider.client.close()


def test_no_region_anywhere_is_a_config_error(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(ConfigError):
        AwsKmsKeyProvider.from_settings(AwsKmsSettings())
    with pytest.raises(ConfigError):
        AwsKmsKeyProvider.from_settings(AwsKmsSettings(region=REGION, max_attempts=0))


def test_a_boto3_client_can_be_injected(kms: KmsEmulator) -> None:
    client = boto3.session.Session().client("kms", region_name=REGION,
                                            endpoint_url=kms.endpoint)
    try:
        provider = AwsKmsKeyProvider(kms_client=client)
        key = kms.symmetric_key()
        data_key = provider.generate_data_key(key.uri("alias"), {"purpose": "t"})
        assert len(data_key.plaintext) == 32
        assert provider.decrypt(key.uri("arn"), data_key.wrapped, {"purpose": "t"}) == (
            data_key.plaintext)
        assert "redacted" in repr(data_key)
    finally:
        client.close()



# -- `cardseal keys` with AWS keys -------------------------------------------------------------


def cli(config: Path, *args: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(app, ["--config", str(config), *args], input=stdin,
                              catch_exceptions=False)


def cli_ok(result: Result) -> Any:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.startswith("{") else result.stdout.strip()


def test_cli_rotation_to_aws_kms_keys(kms: KmsEmulator, tmp_path: Path) -> None:
    """Both kinds of key move from local files to AWS KMS with ``cardseal keys``; a token made
    at any step opens until its keys are retired."""
    config = init_dir(tmp_path / "site")
    config.write_text(config.read_text()
                      .replace('endpoint_url = ""', f'endpoint_url = "{kms.endpoint}"')
                      .replace('region = ""', f'region = "{REGION}"'))
    card = sample_card_json()
    before = cli_ok(cli(config, "seal", stdin=card))
    old_kid = json.loads(b64url_decode(before.split(".")[0]))["kid"]
    symmetric = kms.symmetric_key()
    signing = "aws-kms://" + kms.signing_key("ECC_NIST_P256")

    added = cli_ok(cli(config, "keys", "add", "kms", symmetric.uri("alias")))
    assert added["arn"] == symmetric.uri("arn")
    published = cli_ok(cli(config, "keys", "add", "signing", signing, "--alg", "ES256"))
    assert cli_ok(cli(config, "open", before))["card"]["last4"] == "1111"
    cli_ok(cli(config, "keys", "promote", "kms", symmetric.uri("alias")))
    cli_ok(cli(config, "keys", "promote", "signing", signing))
    after = cli_ok(cli(config, "seal", stdin=card))

    header = json.loads(b64url_decode(after.split(".")[0]))
    assert header == {"alg": "ES256", "kid": published["kid"], "typ": "card+jwt"}
    assert cli_ok(cli(config, "inspect", after))["meta_data"]["key"] == symmetric.uri("alias")
    for token in (before, after):
        assert cli_ok(cli(config, "open", token))["card"]["last4"] == "1111"
    cli_ok(cli(config, "keys", "retire", "kms", "local://main"))
    cli_ok(cli(config, "keys", "retire", "signing", "--", old_kid))
    assert cli_ok(cli(config, "open", after))["card"]["last4"] == "1111"
    assert json.loads(cli(config, "open", before).stderr)["error"]["code"] == "token_key_unknown"
    listing = cli_ok(cli(config, "keys", "list"))
    assert listing["signing"]["current"] == {"kid": published["kid"], "alg": "ES256",
                                             "key": signing}
    assert listing["kms"] == [{"key": symmetric.uri("alias"), "status": "sealing",
                               "issuers": ["payment-service"]}]
