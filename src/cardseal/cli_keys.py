"""``cardseal keys``: list, add, promote and retire signing keys and KMS keys, without downtime.

The rotation, the same for both kinds of key (docs/AWS.md walks through it):

1. ``add``: the new key becomes acceptable before anything uses it. A signing key's public JWK
   joins the published JWKS file (and its ``alg`` the client's issuer's ``algorithms``); a KMS
   key joins every ``[[issuers]]`` ``allowed_kms_keys`` (a ``local://`` key is created first).
2. Wait until every gateway has the change (a restart, or the JWKS URL cache lifetime).
3. ``promote``: the new key signs (``client.signing_key``) or seals (``client.kms_key``).
   Refused for a key that step 1 did not publish or allow.
4. Wait until no token made under the old key is still valid (``max_lifetime`` + leeway).
5. ``retire``: the old key leaves the JWKS or ``allowed_kms_keys``. Refused for the key in use.

``cardseal.toml`` is edited with tomlkit (comments and layout kept) and validated before it
replaces the old file. Key paths given here are relative to the working directory; they are
written to the file relative to its folder when they lie inside it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import tomlkit
import typer
from cryptography.hazmat.primitives import serialization
from tomlkit.items import AoT, Array, Table

from cardseal.config import (
    DEFAULT_CONFIG,
    IssuerSettings,
    Settings,
    build_signer,
    load_settings,
)
from cardseal.errors import ConfigError
from cardseal.keys.base import scheme_of
from cardseal.keys.jwk import MAX_JWKS_BYTES, VerificationKeySet
from cardseal.keys.local import LocalKeyProvider, add_key_version
from cardseal.keys.signing import PemSigner, Signer, generate_private_key_pem
from cardseal.tokens import DEFAULT_MAX_LIFETIME


class Kind(StrEnum):
    signing = "signing"
    kms = "kms"


keys_app = typer.Typer(
    name="keys",
    help="Rotate keys without downtime: add, wait, promote, wait, retire.",
    no_args_is_help=True,
)

KindArg = Annotated[Kind, typer.Argument(help="signing (token signing key) or kms (sealing key).")]
JwksOption = Annotated[
    Path | None,
    typer.Option("--jwks", help="The published JWKS file (default: the one the client's "
                                "[[issuers]] entry reads)."),
]
AlgOption = Annotated[str | None, typer.Option("--alg", help="RS256, PS256, ES256 or EdDSA.")]
# Given after the command; the root's --config (and CARDSEAL_CONFIG) otherwise.
ConfigOption = Annotated[str | None, typer.Option("--config", help="Path of cardseal.toml.")]


class _Config:
    """cardseal.toml twice: the effective settings, and the document to edit."""

    def __init__(self, ctx: typer.Context, config: str | None) -> None:
        given = config or ctx.find_root().params.get("config")
        self.path = Path(given or os.environ.get("CARDSEAL_CONFIG") or DEFAULT_CONFIG)
        self.settings: Settings = load_settings(self.path)
        self.doc = tomlkit.parse(self.path.read_text(encoding="utf-8"))

    def table(self, name: str) -> Table:
        if name not in self.doc:
            self.doc[name] = tomlkit.table()
        table: Table = self.doc[name]
        return table

    def issuers(self) -> list[Table]:
        issuers = self.doc.get("issuers")
        return list(issuers) if isinstance(issuers, AoT) else []

    def client_issuer(self) -> Table | None:
        return next((t for t in self.issuers() if t.get("iss") == self.settings.client.issuer),
                    None)

    def spec(self, path: Path) -> str:
        """``path`` as cardseal.toml should name it."""
        path = path.resolve()
        base = Path(self.settings.base_dir).resolve()
        return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)

    def save(self) -> None:
        """Validate the edited document as settings, then replace the file atomically."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        _write(tmp, tomlkit.dumps(self.doc).encode(), stat.S_IMODE(self.path.stat().st_mode),
               replace=True)
        try:
            load_settings(tmp)
        except ConfigError:
            tmp.unlink()
            raise
        os.replace(tmp, self.path)


def _write(path: Path, data: bytes, mode: int, *, replace: bool = False) -> None:
    """Create ``path`` exclusively with ``mode`` (a stale file is removed first if ``replace``:
    opening an existing file would keep its mode and follow a symlink)."""
    if replace:
        path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as handle:
        handle.write(data)


def _run(body: Callable[[], dict[str, Any]]) -> None:
    from cardseal.cli import emit, guarded  # cardseal.cli imports this module

    emit(guarded(body))


# -- signing keys -----------------------------------------------------------------------------


def _jwks_path(config: _Config, option: Path | None) -> Path:
    if option is not None:
        return option
    issuer = config.client_issuer()
    files = [str(s) for s in (issuer.get("verification_keys", []) if issuer else [])
             if "://" not in str(s) and str(s).endswith(".json")]
    if len(files) == 1:
        return config.settings.path(files[0])
    raise ConfigError("Name the published JWKS file with --jwks.")


def _read_jwks(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
        document = json.loads(data) if len(data) <= MAX_JWKS_BYTES else None
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot read the JWKS file {str(path)!r}.") from err
    if not isinstance(document, dict):
        raise ConfigError(f"{str(path)!r} is not a JWKS of at most {MAX_JWKS_BYTES} bytes.")
    VerificationKeySet.from_jwks(document)  # every key valid, at most MAX_JWKS_KEYS
    keys: list[dict[str, Any]] = document["keys"]
    return keys


def _write_jwks(path: Path, keys: list[dict[str, Any]]) -> None:
    VerificationKeySet.from_jwks({"keys": keys})
    tmp = path.with_name(path.name + ".tmp")
    _write(tmp, (json.dumps({"keys": keys}, indent=2) + "\n").encode(),
           stat.S_IMODE(path.stat().st_mode), replace=True)
    os.replace(tmp, path)


def _signer(config: _Config, key: str, alg: str | None) -> tuple[str, Signer]:
    """(how cardseal.toml names the key, its signer) for a PEM path or an aws-kms:// URI."""
    if key.startswith("aws-kms://"):
        from cardseal.keys.aws_kms import AwsKmsSigner

        return key, AwsKmsSigner.from_settings(key, alg, config.settings.kms.aws)
    return config.spec(Path(key)), PemSigner.from_file(key, alg=alg)


def _current_kid(config: _Config) -> str:
    return build_signer(config.settings).kid


def _add_signing(config: _Config, key: str | None, alg: str | None,
                 jwks: Path | None) -> dict[str, Any]:
    path = _jwks_path(config, jwks)
    keys = _read_jwks(path)
    if key is not None:
        signer = _signer(config, key, alg)[1]
    else:  # a new PEM key next to the config, for the client's algorithm
        alg = alg or config.settings.client.signing_alg
        pem = generate_private_key_pem(alg)
        signer = PemSigner(serialization.load_pem_private_key(pem, None),  # type: ignore[arg-type]
                           alg=alg)
        target = config.settings.path(f"keys/signing-{signer.kid[:12]}.pem")
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, pem, 0o600)
        key = str(target)
    if all(k.get("kid") != signer.kid for k in keys):
        _write_jwks(path, [*keys, signer.verification_key().to_jwk()])
    issuer = config.client_issuer()
    if issuer is not None:
        if "algorithms" not in issuer:  # written out, with the default it stood for
            issuer["algorithms"] = tomlkit.array()
            issuer["algorithms"].extend(IssuerSettings.model_fields["algorithms"].default)
        algorithms = issuer["algorithms"]
        if signer.alg not in algorithms:
            algorithms.append(signer.alg)
            config.save()
    return {"kind": "signing", "kid": signer.kid, "alg": signer.alg, "key": key,
            "jwks": str(path), "status": "published",
            "next": f"when every gateway has the new JWKS: cardseal keys promote signing {key}"}


def _promote_signing(config: _Config, key: str, alg: str | None,
                     jwks: Path | None) -> dict[str, Any]:
    published = {k.get("kid"): k for k in _read_jwks(_jwks_path(config, jwks))}
    spec, signer = _signer(config, key, alg)
    entry = published.get(signer.kid)
    if entry is None:
        raise ConfigError(f"Key {signer.kid} is not in the published JWKS; "
                          "run 'cardseal keys add signing' first.")
    if alg is None and entry.get("alg") not in (None, signer.alg):
        spec, signer = _signer(config, key, entry["alg"])
    previous = _current_kid(config)
    client = config.table("client")
    client["signing_key"] = spec
    client["signing_alg"] = signer.alg
    config.save()
    return {"kind": "signing", "kid": signer.kid, "alg": signer.alg, "status": "signing",
            "previous": previous,
            "next": _after_expiry(config, f"retire signing -- {previous}")}  # a kid may start "-"


def _retire_signing(config: _Config, kid: str, jwks: Path | None) -> dict[str, Any]:
    if kid == _current_kid(config):
        raise ConfigError("That key signs now; promote another key first.")
    path = _jwks_path(config, jwks)
    keys = _read_jwks(path)
    remaining = [k for k in keys if k.get("kid") != kid]
    if len(remaining) == len(keys):
        raise ConfigError(f"Key {kid} is not in the published JWKS.")
    _write_jwks(path, remaining)
    return {"kind": "signing", "kid": kid, "status": "retired", "jwks": str(path)}


def _after_expiry(config: _Config, command: str) -> str:
    settings = config.settings
    issuer = next((i for i in settings.issuers if i.iss == settings.client.issuer), None)
    lifetime = max(issuer.max_lifetime if issuer else DEFAULT_MAX_LIFETIME,
                   settings.client.token_lifetime)
    wait = lifetime + settings.gateway.leeway
    return f"after {wait} s, when no older token is still valid: cardseal keys {command}"


# -- KMS keys ---------------------------------------------------------------------------------


def _allowed_lists(config: _Config) -> list[tuple[str, Array]]:
    return [(str(t["iss"]), t["allowed_kms_keys"]) for t in config.issuers()]


def _add_kms(config: _Config, uri: str) -> dict[str, Any]:
    result: dict[str, Any] = {"kind": "kms", "key": uri, "status": "allowed"}
    scheme = scheme_of(uri)
    if scheme == "local":
        keyring = config.settings.path(config.settings.kms.local.keyring)
        existing = LocalKeyProvider.from_file(keyring).key_names
        result["version"] = add_key_version(keyring, uri[len("local://"):])
        if uri[len("local://"):] in existing:
            result["note"] = ("A new version of a local key seals as soon as the sealing side "
                              "reloads the keyring: restart every gateway first. A new key "
                              "name avoids that.")
    elif scheme == "aws-kms":
        from cardseal.keys.aws_kms import AwsKmsKeyProvider

        result["arn"] = AwsKmsKeyProvider.from_settings(config.settings.kms.aws).canonical_uri(uri)
    else:
        raise ConfigError(f"Unknown KMS key scheme {scheme}://.")
    result["issuers"] = []
    for iss, allowed in _allowed_lists(config):
        if uri not in allowed:
            allowed.append(uri)
            result["issuers"].append(iss)
    config.save()
    result["next"] = f"when every gateway has reloaded: cardseal keys promote kms {uri}"
    return result


def _promote_kms(config: _Config, uri: str) -> dict[str, Any]:
    scheme_of(uri)
    issuer = config.client_issuer()
    if issuer is not None and uri not in issuer["allowed_kms_keys"]:
        raise ConfigError(f"{uri} is not in the issuer's allowed_kms_keys; "
                          "run 'cardseal keys add kms' first.")
    previous = config.settings.client.kms_key
    config.table("client")["kms_key"] = uri
    config.save()
    return {"kind": "kms", "key": uri, "status": "sealing", "previous": previous,
            "next": _after_expiry(config, f"retire kms {previous}")}


def _retire_kms(config: _Config, uri: str) -> dict[str, Any]:
    if uri == config.settings.client.kms_key:
        raise ConfigError("That key seals now; promote another key first.")
    issuers = []
    for iss, allowed in _allowed_lists(config):
        if uri in allowed:
            if len(allowed) == 1:
                raise ConfigError(f"Issuer {iss!r} would allow no KMS key.")
            allowed.remove(uri)
            issuers.append(iss)
    if not issuers:
        raise ConfigError(f"{uri} is in no issuer's allowed_kms_keys.")
    config.save()
    return {"kind": "kms", "key": uri, "status": "retired", "issuers": issuers}


# -- commands ---------------------------------------------------------------------------------


@keys_app.command("list")
def list_(ctx: typer.Context, jwks: JwksOption = None,
          config_path: ConfigOption = None) -> None:
    """Show the signing keys (current and published) and the KMS keys (sealing and allowed)."""

    def body() -> dict[str, Any]:
        config = _Config(ctx, config_path)
        current = _current_kid(config)
        try:
            path: Path | None = _jwks_path(config, jwks)
        except ConfigError:
            path = None
        published = _read_jwks(path) if path is not None else []
        sealing = config.settings.client.kms_key
        kms: dict[str, list[str]] = {sealing: []}
        for iss, allowed in _allowed_lists(config):
            for uri in allowed:
                kms.setdefault(str(uri), []).append(iss)
        return {
            "signing": {
                "current": {"kid": current, "alg": config.settings.client.signing_alg,
                            "key": config.settings.client.signing_key},
                "jwks": str(path) if path is not None else None,
                "published": [{"kid": k.get("kid"), "alg": k.get("alg"), "kty": k.get("kty"),
                               "status": "signing" if k.get("kid") == current else "published"}
                              for k in published],
            },
            "kms": [{"key": uri, "status": "sealing" if uri == sealing else "allowed",
                     "issuers": issuers} for uri, issuers in kms.items()],
        }

    _run(body)


@keys_app.command()
def add(
    ctx: typer.Context,
    kind: KindArg,
    key: Annotated[str | None, typer.Argument(
        help="signing: a PEM file or aws-kms:// URI (default: generate a PEM key); "
             "kms: local://NAME or aws-kms://KEY.")] = None,
    alg: AlgOption = None,
    jwks: JwksOption = None,
    config_path: ConfigOption = None,
) -> None:
    """Publish a new signing key in the JWKS, or allow a new KMS key for every issuer."""

    def body() -> dict[str, Any]:
        config = _Config(ctx, config_path)
        if kind is Kind.signing:
            return _add_signing(config, key, alg, jwks)
        if key is None:
            raise ConfigError("Name the KMS key to add: local://NAME or aws-kms://KEY.")
        return _add_kms(config, key)

    _run(body)


@keys_app.command()
def promote(
    ctx: typer.Context,
    kind: KindArg,
    key: Annotated[str, typer.Argument(help="The PEM file, or the aws-kms:// / local:// URI.")],
    alg: AlgOption = None,
    jwks: JwksOption = None,
    config_path: ConfigOption = None,
) -> None:
    """Make an added key the one that signs (signing) or seals (kms)."""

    def body() -> dict[str, Any]:
        config = _Config(ctx, config_path)
        if kind is Kind.signing:
            return _promote_signing(config, key, alg, jwks)
        return _promote_kms(config, key)

    _run(body)


@keys_app.command()
def retire(
    ctx: typer.Context,
    kind: KindArg,
    key: Annotated[str, typer.Argument(help="signing: the key's kid; kms: its URI.")],
    jwks: JwksOption = None,
    config_path: ConfigOption = None,
) -> None:
    """Remove an old key from the JWKS (signing) or from allowed_kms_keys (kms)."""

    def body() -> dict[str, Any]:
        config = _Config(ctx, config_path)
        if kind is Kind.signing:
            return _retire_signing(config, key, jwks)
        return _retire_kms(config, key)

    _run(body)
