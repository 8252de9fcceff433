"""The ``cardseal`` command (CONTRACT.md section 4).

Output is JSON on stdout; errors are ``{"error": {"code", "message"}}`` on stderr with the exit
code of the contract's table. Card data is read from stdin or a hidden prompt, never from argv.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn, TypeVar

import typer

from cardseal import jws
from cardseal._encoding import b64url_decode, loads_strict
from cardseal.card import MAX_CARD_JSON_BYTES, Card
from cardseal.cli_keys import keys_app
from cardseal.config import (
    Settings,
    build_issuer_policies,
    build_opener,
    build_providers,
    build_sealer,
    build_signer,
    build_verifier,
    database_url,
    fingerprint_secret,
    load_settings,
)
from cardseal.errors import CardsealError, RequestError, TokenError
from cardseal.keys.jwk import VerificationKeySet
from cardseal.tokens import Payment

app = typer.Typer(
    name="cardseal",
    help="Signed, encrypted, single-use card tokens from a payment service to its gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_T = TypeVar("_T")
_state: dict[str, str | None] = {"config": None}

RootConfigOption = Annotated[
    str | None,
    typer.Option("--config", envvar="CARDSEAL_CONFIG", help="Path of cardseal.toml."),
]
# The same option after the command name; no env var here, so that an explicit ``--config``
# before the command is never overridden by CARDSEAL_CONFIG.
ConfigOption = Annotated[
    str | None, typer.Option("--config", help="Path of cardseal.toml (overrides the root one).")
]


@app.callback()
def _main(config: RootConfigOption = None) -> None:
    _state["config"] = config


def emit(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


def fail(err: CardsealError) -> NoReturn:
    typer.echo(json.dumps(err.to_dict()), err=True)
    raise typer.Exit(err.exit_code)


def guarded(body: Callable[[], _T]) -> _T:
    """Run ``body``; turn any ``CardsealError`` into the contract's stderr JSON and exit code."""
    try:
        return body()
    except CardsealError as err:
        fail(err)


def settings(config: str | None = None) -> Settings:
    """The settings from ``--config`` given after the command, else before it, else the env."""
    return load_settings(config or _state["config"])


def read_stdin_limited(limit: int) -> bytes:
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise RequestError("Standard input is too large.", code="request_too_large")
    return data


def read_card() -> Card:
    """A card from stdin (card JSON) or, on a terminal, from hidden prompts."""
    if sys.stdin.isatty():  # the prompts on stderr: stdout is the command's answer alone
        number = typer.prompt("Card number", hide_input=True, err=True)
        expiry = typer.prompt("Expiry (MM/YY)", err=True)
        cvv = typer.prompt("CVV", hide_input=True, err=True)
        return Card(card_number=number, expiry_date=expiry, cvv=cvv)
    return Card.from_json(read_stdin_limited(MAX_CARD_JSON_BYTES).strip())


def read_token(token: str | None) -> str:
    """The token argument, or stdin's for ``-``: refused alike either way (token_malformed)."""
    if token is None or token == "-":  # noqa: S105 - "-" means stdin
        try:
            raw = read_stdin_limited(jws.MAX_TOKEN_BYTES + 2)  # + a line break
        except RequestError:
            raise TokenError("The token is too large.") from None
        try:
            token = raw.decode("ascii")
        except UnicodeDecodeError:
            raise TokenError() from None
    return token.strip(" \t\r\n")


def payment_option(
    amount: int | None, currency: str | None, reference: str | None
) -> Payment | None:
    if amount is None and currency is None and reference is None:
        return None
    if amount is None or currency is None:
        raise RequestError("--amount and --currency go together.")
    try:
        return Payment(amount, currency.upper(), reference)
    except ValueError:
        raise RequestError("The amount, currency or reference is invalid.") from None


@app.command()
def init(
    dir: Annotated[Path, typer.Option("--dir", help="Folder to write into.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
    alg: Annotated[str, typer.Option("--alg", help="RS256, PS256, ES256 or EdDSA.")] = "RS256",
) -> None:
    """Write cardseal.toml and development keys (local KMS, signing key, JWKS, TLS cert)."""
    from cardseal.scaffold import init_dir

    def body() -> dict[str, str]:
        from cardseal.storage.migrate import upgrade

        config = init_dir(dir, force=force, alg=alg)
        url = database_url(load_settings(config))
        upgrade(url)
        return {"config": str(config), "database": url,
                "next": f"cardseal --config {config} serve"}

    emit(guarded(body))


@app.command()
def seal(
    format: Annotated[str | None, typer.Option("--format", help="envelope or kms-direct.")] = None,
    amount: Annotated[int | None, typer.Option(help="Amount in minor units.")] = None,
    currency: Annotated[str | None, typer.Option(help="ISO 4217 code, e.g. USD.")] = None,
    reference: Annotated[str | None, typer.Option(help="Your order reference.")] = None,
    config: ConfigOption = None,
) -> None:
    """Card JSON on stdin -> token on stdout (a bare line)."""

    def body() -> str:
        s = settings(config)
        if format is not None:
            s.client.format = format  # type: ignore[assignment]
        card = read_card()
        return build_sealer(s).seal(card, payment=payment_option(amount, currency, reference))

    typer.echo(guarded(body))


@app.command("open")
def open_(
    token: Annotated[str | None, typer.Argument(help="The token, or - for stdin.")] = None,
    reveal: Annotated[bool, typer.Option("--reveal", help="Also print PAN and CVV.")] = False,
    config: ConfigOption = None,
) -> None:
    """Verify and decrypt a token (does not mark it used)."""

    def body() -> dict[str, Any]:
        s = settings(config)
        providers = build_providers(s)
        policies = build_issuer_policies(s)
        verified = build_verifier(s, policies).verify(read_token(token))
        card = build_opener(s, policies, providers).open_card(verified)
        view = card.view(fingerprint_secret(s)).to_dict()
        if reveal:
            view["card_number"] = card.pan
            view["cvv"] = card.cvv
        return {"claims": verified.public_claims(), "card": view}

    emit(guarded(body))


def _describe_meta_data(meta_data: object) -> dict[str, Any]:
    if not isinstance(meta_data, str):
        return {"format": None}
    if meta_data.count(".") == 4:
        try:
            header = loads_strict(b64url_decode(meta_data.split(".")[0]), max_bytes=512)
        except ValueError:
            return {"format": "envelope", "header": None}
        return {"format": "envelope", "key": header.get("kid") if isinstance(header, dict)
                else None, "header": header}
    return {"format": "kms-direct", "key": None, "length": len(meta_data)}


@app.command()
def inspect(
    token: Annotated[str | None, typer.Argument(help="The token, or - for stdin.")] = None,
    config: ConfigOption = None,
) -> None:
    """Show a token's header, claims and meta_data format WITHOUT verifying it."""
    del config  # taken as every command takes it (contract section 4); inspect reads none

    def body() -> dict[str, Any]:
        parsed = jws.parse_compact(read_token(token))
        try:
            claims = loads_strict(parsed.payload, max_bytes=jws.MAX_PAYLOAD_BYTES)
        except ValueError:
            raise TokenError("The token's claims are not a JSON object.") from None
        if not isinstance(claims, dict):
            raise TokenError("The token's claims are not a JSON object.")
        meta = _describe_meta_data(claims.pop("meta_data", None))
        return {"verified": False, "note": "NOT verified: signature and claims unchecked.",
                "header": dict(parsed.header), "claims": claims, "meta_data": meta}

    emit(guarded(body))


@app.command()
def jwks(config: ConfigOption = None) -> None:
    """Print the client's public JWKS (publish it for the gateway)."""

    def body() -> dict[str, Any]:
        s = settings(config)
        signer = build_signer(s)
        return VerificationKeySet([signer.verification_key()]).to_jwks()

    emit(guarded(body))


app.add_typer(keys_app, name="keys")

from cardseal import cli_gateway  # noqa: E402, F401 - registers serve, pay, apikey, db

# click's UsageError (typer vendors click from 0.2x on and exports only BadParameter of its
# exceptions): the base of every command-line mistake, missing and unknown options included.
_UsageError: Final[type[Exception]] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _usage_message(err: Exception) -> str:
    """What was wrong, by option name only: click's own messages quote the values given."""
    kind = type(err).__name__
    param = getattr(err, "param", None)
    opts = getattr(param, "opts", None)
    hint = "/".join(opts) if opts else "a parameter"
    if kind == "MissingParameter":
        return f"Missing {hint}; see --help."
    if isinstance(err, typer.BadParameter):
        return f"Invalid value for {hint}; see --help."
    # An option's name as typed, masked where it holds digits (a card number mistyped as one)
    name = re.sub(r"[0-9]", "*", str(getattr(err, "option_name", "") or "?"))
    if kind == "NoSuchOption":
        return f"No such option: {name}; see --help."
    if kind == "BadOptionUsage":
        return f"Option {name} needs a value; see --help."
    return "Invalid usage (an unknown command or an extra argument); see --help."


def main() -> None:
    """The ``cardseal`` command. A usage error is exit 2 with the same JSON on stderr as every
    other error (click would print a box of text), naming the option, never its value."""
    try:
        code = app(standalone_mode=False)
    except _UsageError as err:
        typer.echo(json.dumps({"error": {"code": "usage_invalid",
                                         "message": _usage_message(err)}}), err=True)
        sys.exit(2)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        typer.echo(json.dumps({"error": {"code": "aborted", "message": "Aborted."}}), err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
