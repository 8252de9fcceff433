"""Settings (``cardseal.toml`` + ``CARDSEAL_<SECTION>__<KEY>`` env overrides) and builders.

``load_settings(path)`` reads the file; the ``build_*`` functions turn settings into the core
objects (key providers, signer, sealer, verifier, opener). Relative paths in the file are
relative to the file's folder. Nothing here runs at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from cardseal.client import Sealer
from cardseal.envelope import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_CACHE_TTL,
    DEFAULT_REUSE_MAX_AGE,
    DEFAULT_REUSE_MAX_USES,
    DataKeyReuse,
)
from cardseal.errors import ConfigError
from cardseal.keys.base import KeyProvider, KeyProviders, scheme_of
from cardseal.keys.jwk import KeySource, VerificationKey, VerificationKeySet
from cardseal.keys.local import LocalKeyProvider
from cardseal.keys.signing import PemSigner, Signer
from cardseal.opener import CardOpener
from cardseal.tokens import DEFAULT_LEEWAY, DEFAULT_MAX_LIFETIME, IssuerPolicy, TokenVerifier

DEFAULT_CONFIG = "cardseal.toml"
MAX_ISSUER_CHARS = 255
"""An ``iss`` fits the ledger's issuer columns (``String(255)``), which every payment fills."""
_STRICT = ConfigDict(extra="forbid")


class ClientSettings(BaseModel):
    """The sealing side (a merchant's payment service)."""

    model_config = _STRICT
    issuer: str = Field(default="payment-service", min_length=1, max_length=MAX_ISSUER_CHARS)
    audience: str = "payment-gateway"
    signing_key: str = "keys/signing.pem"
    signing_alg: Literal["RS256", "PS256", "ES256", "EdDSA"] = "RS256"
    kms_key: str = "local://main"
    format: Literal["envelope", "kms-direct"] = "envelope"
    token_lifetime: int = DEFAULT_MAX_LIFETIME
    data_key_max_uses: int = DEFAULT_REUSE_MAX_USES
    data_key_max_age: float = DEFAULT_REUSE_MAX_AGE
    gateway_url: str = "https://127.0.0.1:8443"
    gateway_cacert: str = "tls/cert.pem"


class GatewaySettings(BaseModel):
    """The gateway (``cardseal serve``)."""

    model_config = _STRICT
    host: str = "127.0.0.1"
    port: int = 8443
    workers: int = 1
    tls_cert: str = "tls/cert.pem"
    tls_key: str = "tls/key.pem"
    insecure_http: bool = False
    database_url: str = "sqlite:///cardseal.db"
    # PostgreSQL: connections per worker for the payment path, and half as many for the rest.
    database_pool_size: int = Field(default=10, ge=2, le=100)
    # PostgreSQL: send statement_timeout and idle_in_transaction_session_timeout in each
    # connection's options. Off behind a PgBouncer that refuses them (set them on the role).
    database_server_timeouts: bool = True
    replay_store: str = "database"
    fingerprint_secret: SecretStr = SecretStr("")
    leeway: int = DEFAULT_LEEWAY
    data_key_cache_size: int = DEFAULT_CACHE_SIZE
    data_key_cache_ttl: float = DEFAULT_CACHE_TTL
    max_body_bytes: int = 64 * 1024
    # An Idempotency-Key in flight this long was left by a gateway that died mid-request.
    idempotency_in_flight_timeout: float = Field(default=900.0, gt=0, le=24 * 3600)


class IssuerSettings(BaseModel):
    """One trusted issuer (``[[issuers]]``)."""

    model_config = _STRICT
    iss: str = Field(min_length=1, max_length=MAX_ISSUER_CHARS)
    audience: str = "payment-gateway"
    verification_keys: list[str] = Field(min_length=1)
    algorithms: list[str] = ["RS256"]
    allowed_kms_keys: list[str] = Field(min_length=1)
    formats: list[Literal["envelope", "kms-direct"]] = ["envelope"]
    max_lifetime: int = DEFAULT_MAX_LIFETIME
    legacy: bool = False


class LocalKmsSettings(BaseModel):
    model_config = _STRICT
    keyring: str = "keys/keyring.json"


class AwsKmsSettings(BaseModel):
    """AWS KMS client settings. Region, credentials and endpoint come from boto3's chain
    (``AWS_DEFAULT_REGION`` / ``AWS_REGION``, ``AWS_ENDPOINT_URL_KMS``) unless set here."""

    model_config = _STRICT
    region: str = ""
    endpoint_url: str = ""
    connect_timeout: float = 2.0
    read_timeout: float = 3.0
    max_attempts: int = 3
    max_pool_connections: int = 16


class KmsSettings(BaseModel):
    model_config = _STRICT
    local: LocalKmsSettings = LocalKmsSettings()
    aws: AwsKmsSettings = AwsKmsSettings()


class ProcessorSettings(BaseModel):
    model_config = _STRICT
    kind: Literal["sandbox"] = "sandbox"
    timeout: float = 10.0


class Settings(BaseSettings):
    """The whole ``cardseal.toml``. ``base_dir`` anchors relative paths (the file's folder)."""

    model_config = SettingsConfigDict(
        env_prefix="CARDSEAL_", env_nested_delimiter="__", extra="forbid"
    )
    client: ClientSettings = ClientSettings()
    gateway: GatewaySettings = GatewaySettings()
    issuers: list[IssuerSettings] = []
    kms: KmsSettings = KmsSettings()
    processor: ProcessorSettings = ProcessorSettings()
    base_dir: str = "."

    @field_validator("issuers")
    @classmethod
    def _unique_issuers(cls, value: list[IssuerSettings]) -> list[IssuerSettings]:
        names = [i.iss for i in value]
        if len(names) != len(set(names)):
            raise ValueError("each [[issuers]] iss must be unique")
        return value

    def path(self, value: str) -> Path:
        """``value`` as a path, relative ones anchored at ``base_dir``."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (default ``$CARDSEAL_CONFIG`` or ``./cardseal.toml``), then env overrides.

    Raises ``ConfigError`` naming the file and the first invalid setting.
    """
    config = Path(path or os.environ.get("CARDSEAL_CONFIG") or DEFAULT_CONFIG)
    if not config.is_file():
        raise ConfigError(f"No config file at {str(config)!r}; run 'cardseal init' first.")

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (
                init_settings,
                env_settings,
                TomlConfigSettingsSource(settings_cls, toml_file=config),
            )

    try:
        loaded = _FileSettings(base_dir=str(config.resolve().parent), **overrides)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{str(config)!r}: {where}: {first['msg']}") from None
    except ValueError as err:  # TOML syntax
        raise ConfigError(f"{str(config)!r} is not valid TOML.") from err
    return loaded


# -- builders ---------------------------------------------------------------------------------


def _key_uris(settings: Settings) -> set[str]:
    uris = {settings.client.kms_key}
    for issuer in settings.issuers:
        uris.update(issuer.allowed_kms_keys)
    return uris


def build_providers(settings: Settings) -> KeyProviders:
    """One provider per scheme that the settings name."""
    schemes = {scheme_of(uri) for uri in _key_uris(settings)}
    if settings.client.signing_key.startswith("aws-kms://"):
        schemes.add("aws-kms")
    providers: list[KeyProvider] = []
    for scheme in sorted(schemes):
        if scheme == "local":
            providers.append(LocalKeyProvider.from_file(settings.path(settings.kms.local.keyring)))
        elif scheme == "aws-kms":
            from cardseal.keys.aws_kms import AwsKmsKeyProvider

            providers.append(AwsKmsKeyProvider.from_settings(settings.kms.aws))
        else:
            raise ConfigError(f"Unknown KMS key scheme {scheme}://.")
    return KeyProviders(*providers)


def build_signer(settings: Settings, providers: KeyProviders | None = None) -> Signer:
    spec = settings.client.signing_key
    if spec.startswith("aws-kms://"):
        from cardseal.keys.aws_kms import AwsKmsSigner

        return AwsKmsSigner.from_settings(spec, settings.client.signing_alg, settings.kms.aws)
    return PemSigner.from_file(settings.path(spec), alg=settings.client.signing_alg)


def build_sealer(settings: Settings, providers: KeyProviders | None = None) -> Sealer:
    providers = providers or build_providers(settings)
    client = settings.client
    return Sealer(
        signer=build_signer(settings, providers),
        issuer=client.issuer,
        audience=client.audience,
        kms_key=client.kms_key,
        providers=providers,
        format=client.format,
        lifetime=client.token_lifetime,
        reuse=DataKeyReuse(max_uses=client.data_key_max_uses, max_age=client.data_key_max_age),
    )


def load_verification_keys(settings: Settings, specs: list[str]) -> KeySource:
    """Files (JWKS or PEM) merge into one fixed set; a JWKS URL is a refreshing source.

    An issuer names either files or one URL, not both.
    """
    urls = [s for s in specs if "://" in s]
    if urls:
        if len(specs) != 1:
            raise ConfigError("An issuer's verification_keys is one JWKS URL or a list of files.")
        from cardseal.keys.jwks_url import RemoteJwks

        return RemoteJwks(urls[0])
    keys: list[VerificationKey] = []
    for spec in specs:
        keys.extend(VerificationKeySet.load(settings.path(spec)))
    if not keys:
        raise ConfigError("An issuer's verification key files hold no signing keys.")
    return VerificationKeySet(keys)


def build_issuer_policies(settings: Settings) -> list[IssuerPolicy]:
    if not settings.issuers:
        raise ConfigError("No [[issuers]] are configured.")
    return [
        IssuerPolicy(
            iss=i.iss,
            audience=i.audience,
            keys=load_verification_keys(settings, i.verification_keys),
            allowed_kms_keys=tuple(i.allowed_kms_keys),
            algorithms=frozenset(i.algorithms),
            formats=frozenset(i.formats),
            max_lifetime=i.max_lifetime,
            legacy=i.legacy,
        )
        for i in settings.issuers
    ]


def build_verifier(settings: Settings, policies: list[IssuerPolicy]) -> TokenVerifier:
    return TokenVerifier(issuers=policies, leeway=settings.gateway.leeway)


def build_opener(
    settings: Settings, policies: list[IssuerPolicy], providers: KeyProviders
) -> CardOpener:
    return CardOpener(
        providers=providers,
        issuers=policies,
        cache_size=settings.gateway.data_key_cache_size,
        cache_ttl=settings.gateway.data_key_cache_ttl,
    )


def fingerprint_secret(settings: Settings) -> bytes:
    secret = settings.gateway.fingerprint_secret.get_secret_value()
    if len(secret) < 32:
        raise ConfigError("gateway.fingerprint_secret must be at least 32 characters.")
    return secret.encode()


def database_url(settings: Settings) -> str:
    """The configured database URL, a relative SQLite path anchored at the config's folder."""
    url = settings.gateway.database_url
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(settings.path(url[len(prefix):]))
    return url
