"""AWS KMS: ``aws-kms://<key ARN, key id or alias>`` keys for sealing, and KMS-held signing keys.

``AwsKmsKeyProvider`` serves the three operations of ``KeyProvider`` with a symmetric KMS key,
always naming the key (``KeyId``), so that KMS itself refuses a ciphertext under another key.
``AwsKmsSigner`` signs tokens with an asymmetric KMS key; the private key never leaves KMS.

Both take an injected boto3 KMS client (``kms_client=``); ``from_settings`` builds one from
``AwsKmsSettings`` and boto3's own chain (credentials, ``AWS_DEFAULT_REGION``, ``AWS_REGION``
as a fallback boto3 alone ignores, ``AWS_ENDPOINT_URL_KMS``), with explicit timeouts, pool size
and ``standard`` retries bounded to ``max_attempts``. Every call therefore ends within::

    max_attempts * (connect_timeout + read_timeout) + sum(min(2 ** i, 20) for i < max_attempts - 1)

seconds (the last term is botocore's largest jittered backoff), 18 s with the defaults.

Errors, as ``cardseal.keys.base`` lists them: on Decrypt, ``IncorrectKeyException`` is
``kms_key_not_allowed`` and every other refusal (invalid ciphertext or context, access denied,
disabled, pending deletion, not found) is ``decryption_failed``. Throttling, timeouts, connection
errors, 5xx and refused credentials after the retries are ``kms_unavailable``. A key that cannot
encrypt, generate a data key or sign (wrong id, no permission, disabled) is a ``ConfigError``:
the sealing side is misconfigured. No message holds request data; causes are chained.
"""

from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cardseal.errors import CardsealError, ConfigError, DecryptionError, KeyProviderError
from cardseal.keys.base import DataKey, EncryptionContext, KeyProvider
from cardseal.keys.jwk import PublicKey, public_jwk, thumbprint
from cardseal.keys.signing import Signer, check_alg_fits, default_alg_for

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient
    from mypy_boto3_kms.literals import SigningAlgorithmSpecType

    from cardseal.config import AwsKmsSettings

SCHEME: Final = "aws-kms"
_PREFIX: Final = SCHEME + "://"
# Key ids, key ARNs, aliases and alias ARNs (AWS: at most 2048 characters).
_KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9:/_.+=,@-]{1,2048}")
_KEY_ARN_RE: Final = re.compile(r"arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]+")
_MAX_RESOLVED: Final = 1024
_MAX_RAW_MESSAGE: Final = 4096  # KMS Sign takes at most 4 KiB with MessageType=RAW
_JOSE_TO_KMS: Final[dict[str, SigningAlgorithmSpecType]] = {
    "RS256": "RSASSA_PKCS1_V1_5_SHA_256",
    "PS256": "RSASSA_PSS_SHA_256",  # KMS salts PSS with 32 bytes, as JOSE requires
    "ES256": "ECDSA_SHA_256",
}
# Service error codes that retrying later may cure (after botocore's own retries).
_UNAVAILABLE: Final = frozenset({
    "ThrottlingException", "Throttling", "LimitExceededException", "RequestLimitExceeded",
    "DependencyTimeoutException", "KMSInternalException", "InternalFailure",
    "InternalFailureException", "ServiceUnavailable", "ServiceUnavailableException",
    "RequestTimeout", "RequestTimeoutException", "KeyUnavailableException",
    # The gateway's own credentials refused (expired or rotated): the server's fault, not the
    # token's; the server log has the cause.
    "UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
    "IncompleteSignature",
})


def key_id_of(key_uri: str) -> str:
    """The ``KeyId`` inside ``aws-kms://KEY``; ``ConfigError`` if it cannot be one."""
    key_id = key_uri[len(_PREFIX):] if key_uri.startswith(_PREFIX) else ""
    if not _KEY_ID_RE.fullmatch(key_id):
        raise ConfigError("An AWS KMS key URI looks like aws-kms://<key ARN, key id or alias>.")
    return key_id


def kms_client_from_settings(settings: AwsKmsSettings) -> KMSClient:
    """A boto3 KMS client with the settings' timeouts, pool size and bounded retries.

    Region: the settings, else ``AWS_DEFAULT_REGION``, else ``AWS_REGION``, else boto3's config
    file. Endpoint: the settings, else boto3's own (``AWS_ENDPOINT_URL_KMS``). Connects nothing.
    """
    if not (settings.connect_timeout > 0 and settings.read_timeout > 0):
        raise ConfigError("kms.aws timeouts must be positive.")
    if not 1 <= settings.max_attempts <= 10:
        raise ConfigError("kms.aws.max_attempts must be 1..10.")
    if not 1 <= settings.max_pool_connections <= 1024:
        raise ConfigError("kms.aws.max_pool_connections must be 1..1024.")
    region = (
        settings.region
        or os.environ.get("AWS_DEFAULT_REGION")
        or os.environ.get("AWS_REGION")
        or None
    )
    config = Config(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_pool_connections=settings.max_pool_connections,
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
    )
    try:
        return boto3.session.Session().client(
            "kms", region_name=region, endpoint_url=settings.endpoint_url or None, config=config
        )
    except BotoCoreError as err:  # NoRegionError, a malformed endpoint
        raise ConfigError("Cannot set up the AWS KMS client (region or endpoint).") from err


def _error_code(err: ClientError) -> tuple[str, int]:
    response: Any = err.response
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _translate(err: Exception, refused: CardsealError) -> CardsealError:
    """The cardseal error for a boto error; ``refused`` for a non-retryable refusal."""
    if isinstance(err, ClientError):
        code, status = _error_code(err)
        if code in _UNAVAILABLE or status >= 500:
            return KeyProviderError(code="kms_unavailable")
        return refused
    if isinstance(err, ParamValidationError):
        return refused
    return KeyProviderError(code="kms_unavailable")  # timeouts, connection errors, credentials


def _context(context: EncryptionContext | None) -> dict[str, Any]:
    """``EncryptionContext=`` when there is one; none at all otherwise (the seed's calls)."""
    return {"EncryptionContext": dict(context)} if context else {}


def _config_refusal(what: str, key_uri: str, err: Exception) -> ConfigError:
    code = _error_code(err)[0] if isinstance(err, ClientError) else type(err).__name__
    return ConfigError(f"AWS KMS refused to {what} with {key_uri} ({code}).")


class AwsKmsKeyProvider(KeyProvider):
    """Symmetric AWS KMS keys (``SYMMETRIC_DEFAULT``) named by ``aws-kms://`` URIs."""

    scheme: ClassVar[str] = SCHEME
    remote: ClassVar[bool] = True

    def __init__(self, *, kms_client: KMSClient) -> None:
        self._kms = kms_client
        self._resolved: dict[str, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: AwsKmsSettings) -> AwsKmsKeyProvider:
        return cls(kms_client=kms_client_from_settings(settings))

    @property
    def client(self) -> KMSClient:
        return self._kms

    def canonical_uri(self, key_uri: str) -> str:
        """``aws-kms://<key ARN>`` for any name of the key; one DescribeKey per name, cached.

        A key ARN is already canonical (no call, so a gateway allowed only ``kms:Decrypt`` can
        name its keys by ARN). Raises ``ConfigError`` for a key KMS does not know or will not
        describe, ``KeyProviderError`` when KMS is unavailable.
        """
        known = self.known_canonical_uri(key_uri)
        if known is not None:
            return known
        try:
            arn = self._kms.describe_key(KeyId=key_id_of(key_uri))["KeyMetadata"]["Arn"]
        except (ClientError, BotoCoreError) as err:
            raise _translate(err, _config_refusal("describe", key_uri, err)) from err
        canonical = _PREFIX + arn
        with self._lock:
            if len(self._resolved) < _MAX_RESOLVED:
                self._resolved[key_uri] = canonical
        return canonical

    def known_canonical_uri(self, key_uri: str) -> str | None:
        """A key ARN, or a name already resolved; None for a name that needs DescribeKey."""
        if _KEY_ARN_RE.fullmatch(key_id_of(key_uri)):
            return key_uri
        with self._lock:
            return self._resolved.get(key_uri)

    def check(self, key_uri: str) -> None:
        """One DescribeKey: ``kms_unavailable`` when KMS cannot be reached in time, throttles
        or fails; any other answer, a refusal included (a gateway may be allowed only
        ``kms:Decrypt``), shows that KMS is there."""
        key_id = key_id_of(key_uri)
        try:
            self._kms.describe_key(KeyId=key_id)
        except ClientError as err:
            code, status = _error_code(err)
            if code in _UNAVAILABLE or status >= 500:
                raise KeyProviderError(code="kms_unavailable") from err
        except BotoCoreError as err:
            raise KeyProviderError(code="kms_unavailable") from err

    def encrypt(self, key_uri: str, plaintext: bytes, context: EncryptionContext | None) -> bytes:
        key_id = key_id_of(key_uri)
        try:
            response = self._kms.encrypt(KeyId=key_id, Plaintext=plaintext, **_context(context))
        except (ClientError, BotoCoreError) as err:
            raise _translate(err, _config_refusal("encrypt", key_uri, err)) from err
        return response["CiphertextBlob"]

    def generate_data_key(self, key_uri: str, context: EncryptionContext | None) -> DataKey:
        key_id = key_id_of(key_uri)
        try:
            response = self._kms.generate_data_key(
                KeyId=key_id, KeySpec="AES_256", **_context(context)
            )
        except (ClientError, BotoCoreError) as err:
            raise _translate(err, _config_refusal("generate a data key", key_uri, err)) from err
        if len(response["Plaintext"]) != 32:
            raise KeyProviderError(code="kms_unavailable")
        return DataKey(plaintext=response["Plaintext"], wrapped=response["CiphertextBlob"])

    def decrypt(self, key_uri: str, ciphertext: bytes, context: EncryptionContext | None) -> bytes:
        key_id = key_id_of(key_uri)
        try:
            response = self._kms.decrypt(
                KeyId=key_id, CiphertextBlob=ciphertext, **_context(context)
            )
        except ClientError as err:
            if _error_code(err)[0] == "IncorrectKeyException":
                raise DecryptionError(code="kms_key_not_allowed") from err
            raise _translate(err, DecryptionError(code="decryption_failed")) from err
        except BotoCoreError as err:
            raise _translate(err, DecryptionError(code="decryption_failed")) from err
        return response["Plaintext"]


class AwsKmsSigner(Signer):
    """Signs tokens with an asymmetric KMS key (``SIGN_VERIFY``): RS256, PS256 or ES256.

    The public key is fetched once (GetPublicKey) when the signer is made, which also checks that
    the key can sign with ``alg``; ``kid`` is its RFC 7638 thumbprint.
    """

    def __init__(self, *, key_uri: str, kms_client: KMSClient, alg: str | None = None) -> None:
        self._key_id = key_id_of(key_uri)
        self._key_uri = key_uri
        self._kms = kms_client
        try:
            response = kms_client.get_public_key(KeyId=self._key_id)
        except (ClientError, BotoCoreError) as err:
            raise _translate(err, _config_refusal("read the public key", key_uri, err)) from err
        if response.get("KeyUsage") != "SIGN_VERIFY":
            raise ConfigError(f"{key_uri} is not a signing key (KeyUsage SIGN_VERIFY).")
        try:
            public = serialization.load_der_public_key(response["PublicKey"])
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{key_uri} has no usable public key.") from err
        if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ConfigError(f"{key_uri} is neither an RSA nor an EC key.")
        self.alg = alg if alg is not None else default_alg_for(public)
        if self.alg not in _JOSE_TO_KMS:
            raise ConfigError(f"AWS KMS signing keys sign with {sorted(_JOSE_TO_KMS)}.")
        check_alg_fits(public, self.alg)
        self._algorithm = _JOSE_TO_KMS[self.alg]
        if self._algorithm not in response.get("SigningAlgorithms", []):
            raise ConfigError(f"{key_uri} cannot sign with {self.alg}.")
        self._public: PublicKey = public
        self.kid = thumbprint(public_jwk(public))

    @classmethod
    def from_settings(
        cls, key_uri: str, alg: str | None, settings: AwsKmsSettings
    ) -> AwsKmsSigner:
        return cls(key_uri=key_uri, kms_client=kms_client_from_settings(settings), alg=alg)

    @property
    def public_key(self) -> PublicKey:
        return self._public

    def sign(self, signing_input: bytes) -> bytes:
        """One KMS Sign call (``RAW``; a message over 4 KiB goes as its SHA-256 ``DIGEST``).

        Raises ``KeyProviderError`` (kms_unavailable) or ``ConfigError`` (the key refused)."""
        message_type: Literal["RAW", "DIGEST"] = "RAW"
        message = signing_input
        if len(signing_input) > _MAX_RAW_MESSAGE:
            digest = hashes.Hash(hashes.SHA256())
            digest.update(signing_input)
            message, message_type = digest.finalize(), "DIGEST"
        try:
            signature = self._kms.sign(
                KeyId=self._key_id,
                Message=message,
                MessageType=message_type,
                SigningAlgorithm=self._algorithm,
            )["Signature"]
        except (ClientError, BotoCoreError) as err:
            raise _translate(err, _config_refusal("sign", self._key_uri, err)) from err
        if self.alg != "ES256":
            return signature
        try:
            r, s = decode_dss_signature(signature)
        except ValueError as err:
            raise KeyProviderError(code="kms_unavailable") from err
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
