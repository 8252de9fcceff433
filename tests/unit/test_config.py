"""Settings: what ``cardseal init`` writes, how ``load_settings`` reads it, and the builders."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel, SecretStr

from cardseal.card import Card
from cardseal.config import (
    Settings,
    build_issuer_policies,
    build_opener,
    build_providers,
    build_sealer,
    build_verifier,
    fingerprint_secret,
    load_settings,
)
from cardseal.errors import ConfigError
from cardseal.scaffold import init_dir
from cardseal.testing import sample_card_json

# Set by load_settings from the file's location; not a setting a user writes.
_DERIVED = {(Settings, "base_dir")}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return init_dir(tmp_path / "conf")


def config_error(path: Path, **overrides: Any) -> ConfigError:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, **overrides)
    assert excinfo.value.code == "config_invalid"
    return excinfo.value


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the BaseModel inside ``annotation``, whether it is a list of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None, False


def walk(model: type[BaseModel], table: dict[str, Any], where: str) -> list[str]:
    """Every field of ``model`` (recursively) must be a key in ``table``; returns the paths."""
    seen = []
    for name, field in model.model_fields.items():
        if (model, name) in _DERIVED:
            continue
        path = f"{where}{name}"
        assert name in table, f"{path} is not written by cardseal init"
        seen.append(path)
        sub, is_list = _model_of(field.annotation)
        if sub is not None and is_list:
            assert table[name], f"{path} is empty"
            for i, item in enumerate(table[name]):
                seen += walk(sub, item, f"{path}[{i}].")
        elif sub is not None:
            seen += walk(sub, table[name], f"{path}.")
    assert set(table) <= set(model.model_fields), f"{where}: keys the model does not know"
    return seen


def test_init_writes_every_setting(config: Path) -> None:
    document = tomllib.loads(config.read_text())
    paths = walk(Settings, document, "")
    assert len(paths) > 40
    assert "gateway.fingerprint_secret" in paths
    assert "kms.aws.max_pool_connections" in paths
    assert "issuers[0].legacy" in paths


def test_init_writes_the_defaults(config: Path) -> None:
    """Outside the example issuer, every value written is the model's default."""
    document = tomllib.loads(config.read_text())

    def check(model: type[BaseModel], table: dict[str, Any], where: str) -> None:
        for name, field in model.model_fields.items():
            sub, is_list = _model_of(field.annotation)
            if sub is not None and not is_list:
                check(sub, table[name], f"{where}{name}.")
            elif sub is None and not isinstance(field.default, SecretStr):
                assert table[name] == field.default, f"{where}{name}"

    for section in ("client", "gateway", "kms", "processor"):
        sub, _ = _model_of(Settings.model_fields[section].annotation)
        assert sub is not None
        check(sub, document[section], f"{section}.")
    issuer = document["issuers"][0]
    assert (issuer["iss"], issuer["audience"]) == ("payment-service", "payment-gateway")


def test_written_config_loads(config: Path) -> None:
    settings = load_settings(config)
    assert settings.client.issuer == "payment-service"
    assert settings.issuers[0].audience == "payment-gateway"
    assert settings.base_dir == str(config.parent.resolve())
    assert settings.path("keys/signing.pem") == config.parent.resolve() / "keys" / "signing.pem"
    assert settings.path("/abs/x") == Path("/abs/x")
    assert len(fingerprint_secret(settings)) >= 32
    assert settings.gateway.fingerprint_secret.get_secret_value() not in repr(settings)


@pytest.mark.parametrize(
    ("name", "mode"),
    [("cardseal.toml", 0o600), ("keys/keyring.json", 0o600), ("keys/signing.pem", 0o600),
     ("tls/key.pem", 0o600), ("keys/jwks.json", 0o644), ("tls/cert.pem", 0o644)],
)
def test_file_modes(config: Path, name: str, mode: int) -> None:
    assert (config.parent / name).stat().st_mode & 0o777 == mode


def test_init_twice_needs_force(config: Path) -> None:
    before = (config.parent / "keys" / "signing.pem").read_bytes()
    with pytest.raises(ConfigError) as excinfo:
        init_dir(config.parent)
    assert excinfo.value.code == "config_invalid"
    assert (config.parent / "keys" / "signing.pem").read_bytes() == before
    assert init_dir(config.parent, force=True) == config
    assert (config.parent / "keys" / "signing.pem").read_bytes() != before
    assert config.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("alg", ["PS256", "ES256", "EdDSA"])
def test_init_with_another_alg_round_trips(tmp_path: Path, alg: str) -> None:
    settings = load_settings(init_dir(tmp_path, alg=alg))
    assert settings.client.signing_alg == alg
    assert settings.issuers[0].algorithms == [alg]
    _round_trip(settings)


def _round_trip(settings: Settings) -> None:
    providers = build_providers(settings)
    policies = build_issuer_policies(settings)
    token = build_sealer(settings, providers).seal(Card.from_json(sample_card_json()))
    verified = build_verifier(settings, policies).verify(token)
    card = build_opener(settings, policies, providers).open_card(verified)
    assert card.pan == "4111111111111111"


def test_builders_from_another_working_directory(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _round_trip(load_settings(Path("conf") / "cardseal.toml"))


def test_config_path_from_the_environment(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDSEAL_CONFIG", str(config))
    assert load_settings().client.kms_key == "local://main"


def test_missing_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CARDSEAL_CONFIG", raising=False)
    with pytest.raises(ConfigError) as excinfo:
        load_settings()
    assert excinfo.value.code == "config_invalid"
    assert "cardseal init" in excinfo.value.message
    config_error(tmp_path / "nope.toml")


def test_env_overrides(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDSEAL_GATEWAY__PORT", "9443")
    monkeypatch.setenv("CARDSEAL_CLIENT__FORMAT", "kms-direct")
    monkeypatch.setenv("CARDSEAL_KMS__AWS__REGION", "eu-west-1")
    settings = load_settings(config)
    assert settings.gateway.port == 9443
    assert settings.client.format == "kms-direct"
    assert settings.kms.aws.region == "eu-west-1"
    assert settings.gateway.host == "127.0.0.1"  # the file still supplies the rest
    monkeypatch.setenv("CARDSEAL_GATEWAY__PORT", "not a port")
    assert "gateway.port" in config_error(config).message


def test_explicit_overrides_win(config: Path) -> None:
    assert load_settings(config, processor={"timeout": 2.5}).processor.timeout == 2.5


@pytest.mark.parametrize(
    ("anchor", "extra"),
    [
        ("[client]\n", "colour = 'blue'\n"),
        ("[gateway]\n", "prot = 8443\n"),
        ("[kms.aws]\n", "regoin = 'x'\n"),
        ("[[issuers]]\n", "legasy = true\n"),
        ("[client]\n", "format = 'jwe'\n"),
        ("[client]\n", "signing_alg = 'HS256'\n"),
        ("[gateway]\n", "port = 'x'\n"),
        ("[gateway]\n", "database_pool_size = 1\n"),
        ("[gateway]\n", "database_pool_size = 101\n"),
        ("[[issuers]]\n", "iss = '" + "i" * 256 + "'\n"),  # past the ledger's column
        ("[client]\n", "issuer = ''\n"),
    ],
)
def test_unknown_or_invalid_keys(config: Path, anchor: str, extra: str) -> None:
    text = config.read_text()
    key = extra.split(" = ")[0]
    lines = [line for line in text.splitlines(keepends=True)
             if not line.startswith(key + " ")]
    text = "".join(lines).replace(anchor, anchor + extra, 1)
    config.write_text(text)
    err = config_error(config)
    assert key in err.message
    assert "'blue'" not in err.message


def test_unknown_section_and_top_level_key(config: Path) -> None:
    original = config.read_text()
    config.write_text("debug = true\n" + original)
    config_error(config)
    config.write_text(original + "\n[metrics]\nport = 9\n")
    config_error(config)


def test_invalid_toml(config: Path) -> None:
    config.write_text("[client\nissuer = ")
    assert "TOML" in config_error(config).message


def test_duplicate_issuers(config: Path) -> None:
    text = config.read_text()
    block = text[text.index("[[issuers]]"):]
    config.write_text(text + "\n" + block)
    config_error(config)


def test_issuer_without_keys(config: Path) -> None:
    config.write_text(config.read_text().replace('verification_keys = ["keys/jwks.json"]',
                                                 "verification_keys = []"))
    config_error(config)


def test_builder_errors(config: Path) -> None:
    settings = load_settings(config, gateway={"fingerprint_secret": "short"})
    with pytest.raises(ConfigError) as excinfo:
        fingerprint_secret(settings)
    assert excinfo.value.code == "config_invalid"
    for issuers in (
        [],
        [{"iss": "x", "verification_keys": ["keys/jwks.json", "https://h/jwks"],
          "allowed_kms_keys": ["local://main"]}],
        [{"iss": "x", "verification_keys": ["keys/none.json"],
          "allowed_kms_keys": ["local://main"]}],
    ):
        with pytest.raises(ConfigError) as excinfo:
            build_issuer_policies(load_settings(config, issuers=issuers))
        assert excinfo.value.code == "config_invalid"
    bad = load_settings(config, issuers=[{"iss": "x", "verification_keys": ["k"],
                                          "allowed_kms_keys": ["gcp-kms://k"]}])
    with pytest.raises(ConfigError) as excinfo:
        build_providers(bad)
    assert excinfo.value.code == "config_invalid"


def test_jwks_without_signing_keys(config: Path) -> None:
    jwks = config.parent / "keys" / "jwks.json"
    document = json.loads(jwks.read_text())
    document["keys"][0]["use"] = "enc"
    jwks.write_text(json.dumps(document))
    with pytest.raises(ConfigError) as excinfo:
        build_issuer_policies(load_settings(config))
    assert excinfo.value.code == "config_invalid"


def test_the_gateway_sizes_its_postgresql_pools_from_the_settings(config: Path) -> None:
    """``gateway.database_pool_size``: the payment path's connections, half as many (at least
    two) for the rest. Nothing connects before the app starts."""
    from cardseal.gateway.app import create_app

    settings = load_settings(config, gateway={
        "database_url": "postgresql://postgres@127.0.0.1:5432/unused", "database_pool_size": 6})
    store = create_app(settings).state.store
    assert store._drivers is not None and store._drivers._size == 6
    assert store._drivers.open_connections == 0
    assert store.engine is not None and store.engine.pool.size() == 3
