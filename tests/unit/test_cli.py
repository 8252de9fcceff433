"""The ``cardseal`` command: init -> seal -> open/inspect/jwks, exit codes and error JSON."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.cli import app, read_card
from cardseal.testing import SAMPLE_PANS, sample_card_json

PAN = SAMPLE_PANS["visa"]
CARD = sample_card_json(PAN, cvv="987")
runner = CliRunner()


def run(config: Path | None, *args: str, stdin: bytes | str | None = None,
        env: dict[str, str] | None = None) -> Result:
    argv = ["--config", str(config), *args] if config is not None else list(args)
    return runner.invoke(app, argv, input=stdin, env=env, catch_exceptions=False)


def ok(result: Result) -> Any:
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def failed(result: Result, exit_code: int, code: str) -> None:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.stdout == ""
    body = json.loads(result.stderr)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli")
    out = ok(run(None, "init", "--dir", str(directory)))
    assert Path(out["config"]) == directory / "cardseal.toml"
    return directory / "cardseal.toml"


@pytest.fixture(scope="module")
def token(config: Path) -> str:
    return seal(config)


def seal(config: Path, *args: str, card: bytes = CARD) -> str:
    result = run(config, "seal", *args, stdin=card)
    assert result.exit_code == 0, result.stderr
    line = result.stdout
    assert line.endswith("\n") and line.count("\n") == 1  # a bare line, not JSON
    return line.strip()


# -- init -----------------------------------------------------------------------------------


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    ok(run(None, "init", "--dir", str(tmp_path)))
    before = (tmp_path / "cardseal.toml").read_text()
    failed(run(None, "init", "--dir", str(tmp_path)), 2, "config_invalid")
    assert (tmp_path / "cardseal.toml").read_text() == before
    ok(run(None, "init", "--dir", str(tmp_path), "--force"))
    assert (tmp_path / "cardseal.toml").read_text() != before  # a new fingerprint secret


def test_init_with_an_unknown_alg(tmp_path: Path) -> None:
    failed(run(None, "init", "--dir", str(tmp_path), "--alg", "HS256"), 2, "config_invalid")
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_init_where_it_cannot_write(tmp_path: Path) -> None:
    """A file where the folder should be: the contract's error, not a traceback (exit 1)."""
    (tmp_path / "file").write_text("")
    failed(run(None, "init", "--dir", str(tmp_path / "file")), 2, "config_invalid")
    failed(run(None, "init", "--dir", str(tmp_path / "file" / "below")), 2, "config_invalid")


# -- usage errors -------------------------------------------------------------------------------


def console(*args: str) -> subprocess.CompletedProcess[str]:
    """The ``cardseal`` command as a user runs it (``main``, not the test runner's invoke)."""
    return subprocess.run([sys.executable, "-c", "from cardseal.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("args", "names"), [
    (["pay", "--currency", "USD"], "--amount"),
    (["pay", "--amount", "4242424242424242x", "--currency", "USD"], "--amount"),
    (["pay", "--amount", "1", "--currency", "USD", "--bogus", "4242424242424242"], "--bogus"),
    (["pay", "--currency", "USD", "--amount"], "--amount needs a value"),
    (["pay", "--amount", "1", "--currency", "USD", "--4242424242424242"], "--****"),
    (["no-such-command"], "see --help"),
    (["inspect", "a.b.c", "4242424242424242"], "see --help"),
])
def test_usage_errors_are_exit_2_with_the_json_error(args: list[str], names: str) -> None:
    """Contract section 4: 2 is usage or config; the error is JSON like every other, and names
    the option without quoting what was given (click's own text would)."""
    result = console(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    body = json.loads(result.stderr)
    assert body["error"]["code"] == "usage_invalid"
    assert names in body["error"]["message"]
    assert "4242" not in result.stderr


def test_help_is_still_help() -> None:
    result = console("--help")
    assert result.returncode == 0 and "pay" in result.stdout


@pytest.mark.parametrize("args", [
    ["--idempotency-key", "a\nb"],
    ["--idempotency-key", ""],
    ["--idempotency-key", "k" * 256],
    ["--gateway", "https://127.0.0.1:8443/x\ny"],
    ["--gateway", "not a url"],
    ["--gateway", "ftp://127.0.0.1/"],
    ["--gateway", "https://127.0.0.1:8443/?q=1"],
    ["--gateway", "https://127.0.0.1:8443/#x"],
    ["--gateway", ""],
])
def test_pay_refuses_bad_option_values_before_sealing(config: Path, args: list[str]) -> None:
    """Command-line mistakes are exit 2 with the JSON error, found before the card is sealed
    or the network tried (they were a traceback, exit 1, or 7 s of retries and exit 7)."""
    failed(run(config, "pay", "--amount", "1", "--currency", "USD", *args, stdin=CARD),
           2, "request_invalid")


def test_card_prompts_go_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the card is asked for on stderr: stdout holds the answer alone, so that
    ``TOKEN=$(cardseal seal)`` works (the prompts were on stdout, before the token)."""

    class Terminal:
        def isatty(self) -> bool:
            return True

    pan = SAMPLE_PANS["mastercard"]
    answers = iter([pan, "12/39", "987"])
    asked: list[tuple[str, bool]] = []

    def prompt(text: str, *, err: bool = False, **_: Any) -> str:
        asked.append((text, err))
        return next(answers)

    monkeypatch.setattr("cardseal.cli.sys.stdin", Terminal())
    monkeypatch.setattr("cardseal.cli.typer.prompt", prompt)
    assert read_card().last4 == pan[-4:]
    assert [err for _, err in asked] == [True, True, True]


def test_pay_with_a_ca_bundle_that_cannot_be_read_is_a_config_error(config: Path,
                                                                      tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-ca.pem")
    failed(run(config, "pay", "--amount", "1", "--currency", "USD", "--cacert", missing,
               stdin=CARD), 2, "config_invalid")


# -- serve: what stops it before it listens ----------------------------------------------------


def test_serve_refuses_a_port_in_use_or_out_of_range(config: Path) -> None:
    """Exit 2 and the contract's JSON (not uvicorn's exit 3, which means token_rejected)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed(run(config, "serve", "--port", str(port)), 2, "config_invalid")
    failed(run(config, "serve", "--port", "70000"), 2, "config_invalid")


def test_serve_refuses_a_database_without_the_schema(config: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'never-migrated.db'}"
    result = run(config, "serve", env={"CARDSEAL_GATEWAY__DATABASE_URL": url})
    failed(result, 2, "config_invalid")
    assert "cardseal db upgrade" in result.stderr


def test_serve_refuses_an_unreadable_tls_key_without_quoting_it(
        config: Path, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n"
                   "-----END PRIVATE KEY-----\n")
    result = run(config, "serve", env={"CARDSEAL_GATEWAY__TLS_KEY": str(key)})
    failed(result, 2, "config_invalid")
    assert "c2VjcmV0" not in result.stderr


# -- seal and open --------------------------------------------------------------------------


def test_open_prints_claims_and_card_view(config: Path, token: str) -> None:
    out = ok(run(config, "open", token))
    assert set(out) == {"claims", "card"}
    assert "meta_data" not in out["claims"]
    assert {"iss", "aud", "iat", "exp", "jti"} <= set(out["claims"])
    assert out["claims"]["iss"] == "payment-service"
    card = out["card"]
    assert set(card) == {"brand", "last4", "masked", "exp_month", "exp_year", "fingerprint"}
    assert card["brand"] == "visa" and card["last4"] == PAN[-4:]
    assert card["masked"] == PAN[:6] + "******" + PAN[-4:]
    assert card["fingerprint"].startswith("fp_")
    assert PAN not in json.dumps(out)
    # The CVV in no field (a substring test would trip on a timestamp, jti or fingerprint
    # that happens to hold "987").
    assert "987" not in [*out["claims"].values(), *card.values()]


def test_open_with_reveal(config: Path, token: str) -> None:
    card = ok(run(config, "open", token, "--reveal"))["card"]
    assert card["card_number"] == PAN
    assert card["cvv"] == "987"


@pytest.mark.parametrize("args", [[], ["-"]])
def test_open_reads_the_token_from_stdin(config: Path, token: str, args: list[str]) -> None:
    out = ok(run(config, "open", *args, stdin=token + "\n"))
    assert out == ok(run(config, "open", token))  # and open does not mark the token used


def test_open_with_config_from_the_environment(config: Path, token: str) -> None:
    out = ok(run(None, "open", token, env={"CARDSEAL_CONFIG": str(config)}))
    assert out["card"]["last4"] == PAN[-4:]


def test_seal_kms_direct(config: Path) -> None:
    token = seal(config, "--format", "kms-direct")
    meta = json.loads(b64url_decode(token.split(".")[1]))["meta_data"]
    assert "." not in meta
    assert base64.b64decode(meta, validate=True)
    assert ok(run(config, "open", token))["card"]["last4"] == PAN[-4:]
    inspected = ok(run(config, "inspect", token))
    assert inspected["meta_data"]["format"] == "kms-direct"
    assert meta not in json.dumps(inspected)


def test_seal_with_payment(config: Path) -> None:
    token = seal(config, "--amount", "1999", "--currency", "eur", "--reference", "order-7")
    claims = ok(run(config, "open", token))["claims"]
    assert claims["payment"] == {"amount": 1999, "currency": "EUR", "reference": "order-7"}


@pytest.mark.parametrize(
    ("args", "code"),
    [(["--amount", "100"], "request_invalid"),
     (["--amount", "100", "--currency", "XXQ"], "request_invalid"),
     (["--amount", "0", "--currency", "USD"], "request_invalid"),
     (["--format", "jwe"], "config_invalid")],
)
def test_seal_option_errors(config: Path, args: list[str], code: str) -> None:
    failed(run(config, "seal", *args, stdin=CARD), 2, code)


@pytest.mark.parametrize(
    ("card", "exit_code", "code"),
    [
        (sample_card_json("4242424242424241"), 4, "card_number_invalid"),
        (sample_card_json(PAN, expiry="01/2001"), 4, "card_expired"),
        (sample_card_json(PAN, cvv="12"), 4, "card_cvv_invalid"),
        (sample_card_json("1000000000000008"), 4, "card_brand_unsupported"),
        (b"not json", 2, "request_invalid"),
        (b'{"card_number": "4242424242424242"}', 2, "request_invalid"),
        (b" " * 5000, 2, "request_too_large"),
    ],
)
def test_seal_refuses_bad_cards(config: Path, card: bytes, exit_code: int, code: str) -> None:
    result = run(config, "seal", stdin=card)
    failed(result, exit_code, code)
    assert "4242424242424241" not in result.stderr


# -- rejected tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["garbage", "", "a.b.c", "é", "a" * (17 * 1024)])
def test_bad_token_exits_3(config: Path, bad: str) -> None:
    """The same refusal whether the token is the argument or comes on stdin."""
    failed(run(config, "open", bad), 3, "token_malformed")
    failed(run(config, "open", "-", stdin=bad.encode() + b"\n"), 3, "token_malformed")
    failed(run(config, "inspect", "-", stdin=bad.encode()), 3, "token_malformed")


def test_tampered_signature_exits_3(config: Path, token: str) -> None:
    header, payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    failed(run(config, "open", f"{header}.{payload}.{flipped}"), 3, "token_signature_invalid")


def test_token_from_another_signing_key_exits_3(config: Path, tmp_path: Path) -> None:
    ok(run(None, "init", "--dir", str(tmp_path)))
    foreign = seal(tmp_path / "cardseal.toml")
    failed(run(config, "open", foreign), 3, "token_key_unknown")


def test_key_not_allowed_exits_5(config: Path, token: str, tmp_path: Path) -> None:
    text = config.read_text().replace('allowed_kms_keys = ["local://main"]',
                                      'allowed_kms_keys = ["local://other"]')
    text = text.replace('"keys/', f'"{config.parent}/keys/').replace(
        '"tls/', f'"{config.parent}/tls/')
    strict = tmp_path / "strict.toml"
    strict.write_text(text)
    failed(run(strict, "open", token), 5, "kms_key_not_allowed")


def test_missing_config_exits_2(tmp_path: Path, token: str) -> None:
    missing = tmp_path / "nope.toml"
    for args, stdin in ((["seal"], CARD), (["open", token], None), (["jwks"], None)):
        failed(run(missing, *args, stdin=stdin), 2, "config_invalid")


# -- inspect and jwks -----------------------------------------------------------------------


def test_inspect_says_not_verified_and_hides_meta_data(config: Path, token: str) -> None:
    out = ok(run(config, "inspect", token))
    assert out["verified"] is False
    assert "NOT verified" in out["note"]
    assert out["header"]["typ"] == "card+jwt"
    assert "meta_data" not in out["claims"]
    assert out["meta_data"]["format"] == "envelope"
    assert out["meta_data"]["key"] == "local://main"
    meta = json.loads(b64url_decode(token.split(".")[1]))["meta_data"]
    printed = json.dumps(out)
    assert meta not in printed
    for part in meta.split(".")[1:]:  # wrapped key, iv, ciphertext, tag
        assert part not in printed


def test_inspect_does_not_verify(config: Path, token: str) -> None:
    header, payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    out = ok(run(config, "inspect", f"{header}.{payload}.{flipped}"))
    assert out["verified"] is False
    assert ok(run(None, "inspect", "-", stdin=token))["claims"] == out["claims"]
    assert ok(run(None, "inspect", "--config", "unused.toml", token))["claims"] == out["claims"]


@pytest.mark.parametrize("payload", [b"not json", b"[1]", b'{"a": 1, "a": 2}'])
def test_inspect_malformed_token(config: Path, payload: bytes) -> None:
    failed(run(config, "inspect", "nope"), 3, "token_malformed")
    token = ".".join(b64url_encode(p) for p in (b'{"alg":"RS256"}', payload, b"sig"))
    failed(run(config, "inspect", token), 3, "token_malformed")
    failed(run(config, "open", token), 3, "token_malformed")  # the same code as open


def test_jwks_prints_the_signing_key(config: Path, token: str) -> None:
    out = ok(run(config, "jwks"))
    (key,) = out["keys"]
    assert key["kty"] == "RSA" and key["alg"] == "RS256" and key["use"] == "sig"
    assert "d" not in key
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert key["kid"] == header["kid"]
    assert out == json.loads((config.parent / "keys" / "jwks.json").read_text())


def test_installed_entry_point(config: Path, token: str) -> None:
    exe = Path(sys.executable).parent / "cardseal"
    done = subprocess.run([exe, "--config", str(config), "open", "-"], input=token.encode(),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["card"]["last4"] == PAN[-4:]
    done = subprocess.run([exe, "--config", str(config), "open", "x.y"], capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 3
    assert done.stdout == b""
    assert json.loads(done.stderr)["error"]["code"] == "token_malformed"
