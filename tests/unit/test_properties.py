"""Properties: any valid card round-trips; no input makes the verifier or the opener raise
anything outside ``CardsealError``; no change to a valid token is ever accepted."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardseal import jws
from cardseal._encoding import b64url_encode
from cardseal.card import Card, luhn_valid
from cardseal.envelope import FORMATS
from cardseal.errors import CardsealError
from cardseal.testing import AUDIENCE, ISSUER, SAMPLE_PANS, LocalSetup, sample_card_json

T = 1_750_000_000
FUZZ = settings(max_examples=200, deadline=None)
THIS_YEAR = datetime.now(UTC).year
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
DIGITS = "0123456789"


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalSetup]]:
    yield {fmt: LocalSetup.create(tmp_path_factory.mktemp(fmt), format=fmt, now=lambda: T)
           for fmt in FORMATS}


@pytest.fixture(scope="module")
def token(setups: dict[str, LocalSetup]) -> str:
    return setups["envelope"].sealer.seal(Card.from_json(sample_card_json(SAMPLE_PANS["visa"])))


# -- strategies --------------------------------------------------------------------------------


def with_check_digit(body: str) -> str:
    (pan,) = (body + d for d in DIGITS if luhn_valid(body + d))
    return pan


@st.composite
def cards(draw: st.DrawFn) -> tuple[dict[str, str], str]:
    """A valid card JSON object and its brand: the IIN and length of a ``SAMPLE_PANS`` entry."""
    brand = draw(st.sampled_from(sorted(SAMPLE_PANS)))
    sample = SAMPLE_PANS[brand]
    pan = with_check_digit(sample[:6] + draw(st.text(DIGITS, min_size=len(sample) - 7,
                                                     max_size=len(sample) - 7)))
    if draw(st.booleans()):  # spaces or dashes are tolerated on input
        pan = draw(st.sampled_from(" -")).join(pan[i:i + 4] for i in range(0, len(pan), 4))
    year = draw(st.integers(THIS_YEAR + 1, 2099))
    card = {
        "card_number": pan,
        "expiry_date": f"{draw(st.integers(1, 12)):02d}/"
                       + (str(year) if draw(st.booleans()) else f"{year % 100:02d}"),
        "cvv": draw(st.text(DIGITS, min_size=4 if brand == "amex" else 3,
                            max_size=4 if brand == "amex" else 3)),
    }
    name = draw(st.none() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=128))
    if name is not None:
        card["cardholder_name"] = name
    return card, brand.removesuffix("_2series")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
b64url_text = st.text(B64URL, max_size=80)


def b64_json(value: Any) -> str:
    return b64url_encode(json.dumps(value).encode())


# -- round trips -------------------------------------------------------------------------------


@FUZZ
@given(card=cards(), fmt=st.sampled_from(FORMATS))
def test_any_valid_card_round_trips(setups: dict[str, LocalSetup],
                                    card: tuple[dict[str, str], str], fmt: str) -> None:
    value, brand = card
    setup = setups[fmt]
    verified = setup.verifier.verify(setup.sealer.seal(Card.parse(value)))
    assert verified.meta_data_format == fmt
    opened = setup.opener.open_card(verified)
    assert opened.pan == value["card_number"].replace(" ", "").replace("-", "")
    assert (opened.cvv, opened.brand, opened.cardholder_name) == (
        value["cvv"], brand, value.get("cardholder_name"))
    month, year = value["expiry_date"].split("/")
    assert (opened.exp_month, opened.exp_year % 100) == (int(month), int(year) % 100)


# -- the verifier never raises outside the hierarchy -------------------------------------------


def only_refused(setup: LocalSetup, candidate: str | bytes) -> None:
    with pytest.raises(CardsealError):
        setup.verifier.verify(candidate)


@FUZZ
@given(data=st.binary(max_size=4096) | st.text(max_size=4096))
def test_random_input_is_refused(setups: dict[str, LocalSetup], data: str | bytes) -> None:
    only_refused(setups["envelope"], data)


@FUZZ
@given(parts=st.lists(b64url_text | json_values.map(b64_json), min_size=1, max_size=5))
def test_random_dotted_base64url_is_refused(setups: dict[str, LocalSetup],
                                            parts: list[str]) -> None:
    only_refused(setups["envelope"], ".".join(parts))


GOOD_CLAIMS = {"iss": ISSUER, "aud": AUDIENCE, "iat": T, "exp": T + 60, "jti": "j" * 22,
               "meta_data": "x.y.z.w.v", "payment": {"amount": 1, "currency": "EUR"}}
payments = st.fixed_dictionaries(
    {"amount": st.just(1) | json_values, "currency": st.just("EUR") | json_values},
    optional={"reference": json_values},
) | json_values


claim_changes = st.lists(st.sampled_from(sorted(GOOD_CLAIMS)).flatmap(
    lambda name: st.tuples(st.just(name), payments if name == "payment"
                           else st.just(None) | json_values)), max_size=2).map(dict)


@FUZZ
@given(claims=claim_changes)
def test_signed_random_claims_never_escape(setups: dict[str, LocalSetup],
                                           claims: dict[str, Any]) -> None:
    """A validly signed token with claims of any JSON type: refused, or (if valid) verified."""
    setup = setups["envelope"]
    header = {"alg": setup.signer.alg, "kid": setup.signer.kid, "typ": "card+jwt"}
    payload = {**GOOD_CLAIMS, **claims}
    token = jws.encode_compact(header, json.dumps(payload).encode(), setup.signer.sign)
    if claims:
        with contextlib.suppress(CardsealError):
            setup.verifier.verify(token)
    else:
        assert setup.verifier.verify(token).payment is not None


MUTATIONS = ("flip", "insert", "delete", "swap", "header")


@FUZZ
@given(data=st.data(), how=st.sampled_from(MUTATIONS))
def test_mutated_token_is_accepted_only_unchanged(
    setups: dict[str, LocalSetup], token: str, data: st.DataObject, how: str
) -> None:
    setup = setups["envelope"]
    chars = B64URL + ".=+/ ?\x00é"
    at = data.draw(st.integers(0, len(token) - 1))
    if how == "flip":
        mutated = token[:at] + data.draw(st.sampled_from(chars)) + token[at + 1:]
    elif how == "insert":
        mutated = token[:at] + data.draw(st.sampled_from(chars)) + token[at:]
    elif how == "delete":
        mutated = token[:at] + token[at + 1:]
    elif how == "swap":
        mutated = ".".join(data.draw(st.permutations(token.split("."))))
    else:
        header = data.draw(json_values | st.fixed_dictionaries(
            {"alg": st.sampled_from(sorted(jws.ALGORITHMS | {"none", "HS256"})),
             "kid": st.just(setup.signer.kid) | st.text(max_size=8),
             "typ": st.sampled_from(["card+jwt", "JWT"])}))
        mutated = ".".join([b64_json(header), *token.split(".")[1:]])
    if mutated == token:
        assert setup.verifier.verify(mutated).jti
    else:
        only_refused(setup, mutated)


# -- the envelope opener likewise --------------------------------------------------------------


protected_headers = st.fixed_dictionaries({
    "alg": st.sampled_from(["kms", "dir"]), "enc": st.sampled_from(["A256GCM", "A128GCM"]),
    "kid": st.sampled_from(["local://main", "local://other", "aws-kms://x", "nope"]),
    "jti": st.sampled_from(["jti-0123456789abcdef", "other"]),
}) | json_values


@FUZZ
@given(meta_data=st.text(max_size=2048) | st.tuples(
    protected_headers.map(b64_json),
    *[st.binary(max_size=size).map(b64url_encode) for size in (64, 16, 64, 20)],
).map(".".join))
def test_opener_refuses_random_meta_data(setups: dict[str, LocalSetup], meta_data: str) -> None:
    with pytest.raises(CardsealError):
        setups["envelope"].opener.envelope.open(
            meta_data, allowed_keys=("local://main",), iss=ISSUER, aud=AUDIENCE,
            jti="jti-0123456789abcdef")


@FUZZ
@given(data=st.data())
def test_mutated_meta_data_is_opened_only_unchanged(setups: dict[str, LocalSetup],
                                                    token: str, data: st.DataObject) -> None:
    setup = setups["envelope"]
    verified = setup.verifier.verify(token)
    meta_data = verified.meta_data
    at = data.draw(st.integers(0, len(meta_data) - 1))
    mutated = meta_data[:at] + data.draw(st.sampled_from(B64URL + ".=")) + meta_data[at + 1:]
    kwargs: dict[str, Any] = {"allowed_keys": ("local://main",), "iss": ISSUER, "aud": AUDIENCE,
                              "jti": verified.jti}
    if mutated == meta_data:
        assert setup.opener.envelope.open(mutated, **kwargs)
    else:
        with pytest.raises(CardsealError):
            setup.opener.envelope.open(mutated, **kwargs)
