"""``cardseal keys``: zero-downtime rotation of signing keys and local KMS keys.

Each rotation is checked the way users live it: a token made before the rotation keeps opening
until its key is retired, a token made after opens too, and at no step does anything fail.
(AWS keys go through the same commands in tests/integration/test_aws_kms.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cardseal._encoding import b64url_decode
from cardseal.cli import app
from cardseal.keys.signing import generate_private_key_pem
from cardseal.scaffold import init_dir
from cardseal.testing import sample_card_json

CARD = sample_card_json("4242424242424242")
runner = CliRunner()


def run(config: Path, *args: str, stdin: bytes | None = None) -> Result:
    return runner.invoke(app, ["--config", str(config), *args], input=stdin,
                         catch_exceptions=False)


def ok(result: Result) -> Any:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def refused(result: Result, code: str = "config_invalid", exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    error = json.loads(result.stderr)["error"]
    assert error["code"] == code
    message: str = error["message"]
    return message


def seal(config: Path) -> str:
    result = run(config, "seal", stdin=CARD)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip()


def opens(config: Path, token: str) -> bool:
    return bool(ok(run(config, "open", token))["card"]["last4"] == "4242")


def kid_of(token: str) -> str:
    kid: str = json.loads(b64url_decode(token.split(".")[0]))["kid"]
    return kid


def jwks_kids(config: Path) -> list[str]:
    return [k["kid"] for k in json.loads((config.parent / "keys/jwks.json").read_text())["keys"]]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return init_dir(tmp_path / "site")


def test_list_shows_the_keys_in_use(config: Path) -> None:
    listing = ok(run(config, "keys", "list"))
    current = listing["signing"]["current"]
    assert current["alg"] == "RS256" and current["key"] == "keys/signing.pem"
    assert listing["signing"]["published"] == [
        {"kid": current["kid"], "alg": "RS256", "kty": "RSA", "status": "signing"}]
    assert listing["signing"]["jwks"] == str(config.parent / "keys/jwks.json")
    assert listing["kms"] == [{"key": "local://main", "status": "sealing",
                               "issuers": ["payment-service"]}]


def test_signing_key_rotation_without_downtime(config: Path) -> None:
    before = seal(config)
    old_kid = kid_of(before)
    text = config.read_text()

    added = ok(run(config, "keys", "add", "signing"))  # 1. publish the new key
    assert added["status"] == "published" and added["alg"] == "RS256"
    assert jwks_kids(config) == [old_kid, added["kid"]]
    assert config.read_text() == text  # the old key still signs
    assert kid_of(seal(config)) == old_kid
    assert Path(added["key"]).stat().st_mode & 0o777 == 0o600

    promoted = ok(run(config, "keys", "promote", "signing", added["key"]))  # 2. it signs
    assert (promoted["kid"], promoted["previous"]) == (added["kid"], old_kid)
    assert promoted["next"].endswith("cardseal keys retire signing -- " + old_kid)
    after = seal(config)
    assert kid_of(after) == added["kid"]
    assert opens(config, before) and opens(config, after)  # old tokens keep opening
    assert f'signing_key = "keys/signing-{added["kid"][:12]}.pem"     # a PEM private key' in (
        config.read_text())

    refused(run(config, "keys", "retire", "signing", "--", added["kid"]))  # the current signer
    retired = ok(run(config, "keys", "retire", "signing", "--", old_kid))  # 3. once they expired
    assert retired["status"] == "retired"
    assert jwks_kids(config) == [added["kid"]]
    refused(run(config, "open", before), "token_key_unknown", 3)
    assert opens(config, after)
    refused(run(config, "keys", "retire", "signing", "--", old_kid))  # not published any more


def test_a_key_is_published_before_it_may_sign(config: Path, tmp_path: Path) -> None:
    unpublished = tmp_path / "unpublished.pem"
    unpublished.write_bytes(generate_private_key_pem("RS256"))
    unpublished.chmod(0o600)
    text = config.read_text()
    message = refused(run(config, "keys", "promote", "signing", str(unpublished)))
    assert "cardseal keys add signing" in message
    assert config.read_text() == text

    added = ok(run(config, "keys", "add", "signing", str(unpublished)))
    assert added["key"] == str(unpublished)
    ok(run(config, "keys", "promote", "signing", str(unpublished)))
    assert f'signing_key = "{unpublished.resolve()}"' in config.read_text()  # outside the folder
    assert opens(config, seal(config))


def test_a_new_algorithm_is_allowed_for_the_issuer_when_its_key_is_published(
    config: Path,
) -> None:
    before = seal(config)
    added = ok(run(config, "keys", "add", "signing", "--alg", "ES256"))
    assert added["alg"] == "ES256"
    assert 'algorithms = ["RS256", "ES256"]' in config.read_text()
    ok(run(config, "keys", "promote", "signing", added["key"]))
    assert 'signing_alg = "ES256"' in config.read_text()
    after = seal(config)
    assert json.loads(b64url_decode(after.split(".")[0]))["alg"] == "ES256"
    assert opens(config, before) and opens(config, after)


def test_kms_key_rotation_without_downtime(config: Path) -> None:
    before = seal(config)
    added = ok(run(config, "keys", "add", "kms", "local://next"))  # 1. allowed everywhere
    assert added["issuers"] == ["payment-service"]
    assert 'allowed_kms_keys = ["local://main", "local://next"]' in config.read_text()
    keyring = json.loads((config.parent / "keys/keyring.json").read_text())
    assert set(keyring["keys"]) == {"main", "next"}
    assert opens(config, before)

    promoted = ok(run(config, "keys", "promote", "kms", "local://next"))  # 2. it seals
    assert promoted["previous"] == "local://main"
    assert 'kms_key = "local://next"             # local://NAME' in config.read_text()
    after = seal(config)
    assert opens(config, before) and opens(config, after)  # old ciphertexts still open
    listing = ok(run(config, "keys", "list"))["kms"]
    assert {k["key"]: k["status"] for k in listing} == {"local://next": "sealing",
                                                       "local://main": "allowed"}

    refused(run(config, "keys", "retire", "kms", "local://next"))  # the current sealing key
    retired = ok(run(config, "keys", "retire", "kms", "local://main"))  # 3. after expiry
    assert retired["issuers"] == ["payment-service"]
    assert 'allowed_kms_keys = ["local://next"]' in config.read_text()
    refused(run(config, "open", before), "kms_key_not_allowed", 5)
    assert opens(config, after)


def test_a_kms_key_is_allowed_before_it_may_seal(config: Path) -> None:
    text = config.read_text()
    message = refused(run(config, "keys", "promote", "kms", "local://elsewhere"))
    assert "cardseal keys add kms" in message
    refused(run(config, "keys", "retire", "kms", "local://elsewhere"))
    refused(run(config, "keys", "add", "kms"))
    refused(run(config, "keys", "add", "kms", "vault://transit"))
    assert config.read_text() == text


def test_a_new_version_of_a_local_key(config: Path) -> None:
    before = seal(config)
    added = ok(run(config, "keys", "add", "kms", "local://main"))
    assert added["issuers"] == []  # already allowed
    assert added["version"].startswith("k2-") and "restart every gateway" in added["note"]
    after = seal(config)
    assert opens(config, before) and opens(config, after)


def test_edits_keep_every_comment_and_change_only_the_lines_they_must(config: Path) -> None:
    original = config.read_text().splitlines()
    ok(run(config, "keys", "add", "kms", "local://next"))
    ok(run(config, "keys", "promote", "kms", "local://next"))
    edited = config.read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, edited, strict=True) if a != b]
    assert [b.split("=")[0].strip() for _, b in changed] == ["kms_key", "allowed_kms_keys"]
    assert config.stat().st_mode & 0o777 == 0o600


def test_the_config_may_follow_the_command_or_come_from_the_environment(config: Path) -> None:
    expected = ok(run(config, "keys", "list"))
    after = runner.invoke(app, ["keys", "list", "--config", str(config)], catch_exceptions=False)
    from_env = runner.invoke(app, ["keys", "list"], env={"CARDSEAL_CONFIG": str(config)},
                             catch_exceptions=False)
    assert ok(after) == ok(from_env) == expected


def test_an_issuer_on_the_default_algorithms_keeps_them(config: Path) -> None:
    lines = config.read_text().splitlines(keepends=True)
    config.write_text("".join(line for line in lines if not line.startswith("algorithms =")))
    ok(run(config, "keys", "add", "signing", "--alg", "ES256"))
    assert 'algorithms = ["RS256", "ES256"]' in config.read_text()
