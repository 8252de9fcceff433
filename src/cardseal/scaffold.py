"""``cardseal init``: a working configuration and its development key material in one step.

Writes, under the chosen folder: ``cardseal.toml`` (every setting with its default value),
``keys/keyring.json`` (local KMS, 0600), ``keys/signing.pem`` (0600) and ``keys/jwks.json``
(its public JWKS), and ``tls/cert.pem`` + ``tls/key.pem`` (a self-signed certificate for
localhost, 127.0.0.1 and ::1).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cardseal.errors import ConfigError
from cardseal.keys.jwk import VerificationKeySet
from cardseal.keys.local import create_keyring
from cardseal.keys.signing import PemSigner, generate_private_key_pem

CONFIG_TEMPLATE: Final = """\
# cardseal configuration, written by `cardseal init`. Every setting is shown with its default.
# Any value can be overridden by the environment: CARDSEAL_<SECTION>__<KEY>, for example
# CARDSEAL_GATEWAY__PORT=9443. Relative paths are relative to this file's folder.

[client]
# The sealing side: a merchant's payment service.
issuer = "payment-service"
audience = "payment-gateway"
signing_key = "keys/signing.pem"     # a PEM private key, or aws-kms://<asymmetric key>
signing_alg = "{alg}"                # RS256 | PS256 | ES256 | EdDSA
kms_key = "local://main"             # local://NAME or aws-kms://<key ARN, id or alias>
format = "envelope"                  # envelope | kms-direct (the seed's format)
token_lifetime = 300                 # exp - iat, seconds
data_key_max_uses = 1000             # tokens per data key (envelope), 1..100000
data_key_max_age = 300.0             # seconds per data key (envelope), at most 3600
gateway_url = "https://127.0.0.1:8443"
gateway_cacert = "tls/cert.pem"      # CA bundle that `cardseal pay` trusts

[gateway]
host = "127.0.0.1"
port = 8443
workers = 1
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"
insecure_http = false                # only behind a TLS-terminating proxy
database_url = "sqlite:///cardseal.db"
database_pool_size = 10              # PostgreSQL: connections a worker opens for payments
                                     # (and half as many for the rest), 2..100
database_server_timeouts = true      # PostgreSQL: the server's statement and idle timeouts in
                                     # each connection's options (false behind a PgBouncer
                                     # that refuses them: set them on the role instead)
replay_store = "database"            # database | redis://host:port/db
fingerprint_secret = "{fingerprint_secret}"
leeway = 30                          # clock leeway, seconds, at most 120
data_key_cache_size = 1024           # unwrapped data keys kept in memory per worker
data_key_cache_ttl = 300.0           # seconds, at most 3600
max_body_bytes = 65536
idempotency_in_flight_timeout = 900.0  # seconds: a key in flight longer was left by a
                                       # gateway that died mid-request; the same request
                                       # takes it over (more than processor.timeout
                                       # + 120, at most 86400)

[kms.local]
keyring = "keys/keyring.json"

[kms.aws]
# Empty values defer to boto3's chain: AWS_DEFAULT_REGION (or AWS_REGION), AWS_ENDPOINT_URL_KMS.
region = ""
endpoint_url = ""
connect_timeout = 2.0
read_timeout = 3.0
max_attempts = 3
max_pool_connections = 16

[processor]
kind = "sandbox"
timeout = 10.0

[[issuers]]
iss = "payment-service"
audience = "payment-gateway"
verification_keys = ["keys/jwks.json"]   # JWKS or PEM files, or https:// JWKS URLs
algorithms = ["{alg}"]
allowed_kms_keys = ["local://main"]
formats = ["envelope", "kms-direct"]
max_lifetime = 300
legacy = false
"""


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its mode on open: fix it before writing
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def self_signed_cert(hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")) -> tuple[
    bytes, bytes
]:
    """A self-signed P-256 certificate (1 year) and its key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cardseal dev gateway")])
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def init_dir(directory: str | os.PathLike[str], *, force: bool = False, alg: str = "RS256") -> Path:
    """Write a working configuration under ``directory``; return the config file's path.

    Raises ``ConfigError`` if ``cardseal.toml`` exists there and ``force`` is false.
    """
    base = Path(directory)
    signing_pem = generate_private_key_pem(alg)  # first: an unknown alg leaves nothing behind
    try:
        return _write_dir(base, signing_pem, alg, force=force)
    except OSError as err:  # a file where the folder should be, no permission, disk full
        raise ConfigError(f"Cannot write the configuration under {str(base)!r} "
                          f"({err.strerror or type(err).__name__}).") from None


def _write_dir(base: Path, signing_pem: bytes, alg: str, *, force: bool) -> Path:
    config = base / "cardseal.toml"
    if config.exists() and not force:
        raise ConfigError(f"{str(config)!r} exists; use --force to overwrite it.")
    base.mkdir(parents=True, exist_ok=True)
    create_keyring(base / "keys" / "keyring.json", ["main"])
    _write(base / "keys" / "signing.pem", signing_pem, 0o600)
    signer = PemSigner(
        serialization.load_pem_private_key(signing_pem, password=None),  # type: ignore[arg-type]
        alg=alg,
    )
    jwks = VerificationKeySet([signer.verification_key()]).to_jwks()
    _write(base / "keys" / "jwks.json", (json.dumps(jwks, indent=2) + "\n").encode(), 0o644)
    cert_pem, key_pem = self_signed_cert()
    _write(base / "tls" / "cert.pem", cert_pem, 0o644)
    _write(base / "tls" / "key.pem", key_pem, 0o600)
    text = CONFIG_TEMPLATE.format(alg=alg, fingerprint_secret=secrets.token_urlsafe(32))
    _write(config, text.encode(), 0o600)
    return config
