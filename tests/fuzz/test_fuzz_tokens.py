"""Fuzz the token parser: ``jws.parse_compact`` and ``TokenVerifier.verify``.

Whatever the input (random text or bytes, a genuine token with characters flipped, parts
spliced from other tokens, header members changed, claims changed and correctly re-signed),
the parser returns or raises a ``CardsealError`` with a contract code, never anything else; no
change to a genuine token is accepted unless it is re-signed; no message quotes the token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cardseal import jws
from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.errors import CardsealError
from cardseal.testing import AUDIENCE, ISSUER
from cardseal.tokens import VerifiedToken
from tests.fuzz.conftest import FUZZ, Material, T
from tests.fuzz.strategies import (
    INTERESTING_ALGS,
    INTERESTING_NUMBERS,
    NASTY,
    assert_contract_error,
    changed_members,
    dumps,
    flipped_part,
    json_values,
    mutated_text,
    spliced,
)

HEADER_NAMES = ["alg", "kid", "typ", "crit", "b64", "jku", "jwk", "x5u", "x5c", "cty", "zip"]
CLAIM_NAMES = ["iss", "aud", "iat", "exp", "nbf", "jti", "meta_data", "payment", "sub"]


def header_values(material: Material) -> dict[str, list[Any]]:
    kid = material.setup.signer.kid
    return {
        "alg": INTERESTING_ALGS,
        "kid": [kid, kid + "x", "", "../../etc/passwd", None, 1, [kid]],
        "typ": ["card+jwt", "CARD+JWT", "application/card+jwt", "JWT", "jwt", "", None, 1],
        "crit": [["exp"], [], "b64"],
        "b64": [False, True],
        "jku": ["https://attacker.example/jwks.json"],
        "jwk": [{"kty": "oct", "k": "AAAA"}],
    }


def claim_values(material: Material) -> dict[str, list[Any]]:
    meta_data, jti = material.envelopes[0]
    return {
        "iss": [ISSUER, ISSUER.upper(), "", None, [ISSUER], "other-service"],
        "aud": [AUDIENCE, [AUDIENCE], [AUDIENCE, "x"], "", None, {"aud": AUDIENCE}],
        "iat": [T, T + 10**6, T - 10**6, *INTERESTING_NUMBERS, str(T)],
        "exp": [T + 60, T + 301, T - 31, T, *INTERESTING_NUMBERS, str(T + 60)],
        "nbf": [T, T + 31, T + 10**6, -1, 1.5],
        "jti": [jti, "short", "x" * 256, "\u00e9" * 20, "a\nb" * 8, 16 * "\x00"],
        "meta_data": [meta_data, material.kms_direct[0][0], "", "....", "a.b.c.d.e", 1, None],
        "payment": [{"amount": 1, "currency": "USD"}, {"amount": "1", "currency": "USD"},
                    {"amount": 1, "currency": "usd"}, {"amount": True, "currency": "USD"},
                    {"amount": 1, "currency": ["USD"]}, {"amount": 10**13, "currency": "USD"},
                    {"amount": 1, "currency": "USD", "extra": 1}, [], "USD"],
    }


def verify_or_refuse(material: Material, token: str | bytes) -> VerifiedToken | None:
    """Run the verifier; a refusal must be a contract error. Returns what it verified."""
    secrets = [token] if isinstance(token, str) else []
    try:
        return material.setup.verifier.verify(token)
    except CardsealError as err:
        assert_contract_error(err, secrets)
    return None


def parse_or_refuse(token: str | bytes) -> None:
    try:
        parsed = jws.parse_compact(token)
    except CardsealError as err:
        assert err.code == "token_malformed"
        return
    assert isinstance(parsed.header, Mapping) and isinstance(parsed.header.get("alg"), str)


@FUZZ
@given(data=st.one_of(st.text(max_size=200), st.binary(max_size=200),
                      st.lists(st.text(alphabet="AZaz09-_" + NASTY, max_size=30), min_size=1,
                               max_size=6).map(".".join)))
def test_random_input(material: Material, data: str | bytes) -> None:
    parse_or_refuse(data)
    assert verify_or_refuse(material, data) is None


@FUZZ
@given(st.data())
def test_mutated_genuine_tokens_are_refused(material: Material, data: st.DataObject) -> None:
    token = data.draw(st.sampled_from(material.tokens))
    other = data.draw(st.sampled_from(material.tokens))
    mutant = data.draw(st.one_of(mutated_text(token), flipped_part(token),
                                 spliced(token, other)))
    parse_or_refuse(mutant)
    verified = verify_or_refuse(material, mutant)
    if verified is not None:  # only a no-op mutation (or a splice of equals) verifies
        assert jws.parse_compact(mutant).signing_input == jws.parse_compact(token).signing_input \
            or jws.parse_compact(mutant).signing_input == jws.parse_compact(other).signing_input


@FUZZ
@given(st.data())
def test_changed_header_members(material: Material, data: st.DataObject) -> None:
    token = data.draw(st.sampled_from(material.tokens))
    head, payload, signature = token.split(".")
    header = json.loads(b64url_decode(head))
    changed = data.draw(changed_members(header, HEADER_NAMES, header_values(material)))
    if data.draw(st.booleans()):  # the header re-encoded as is: a different signing input
        mutant = f"{b64url_encode(dumps(changed).encode())}.{payload}.{signature}"
        parse_or_refuse(mutant)
        assert verify_or_refuse(material, mutant) is None or changed == header
    else:  # correctly re-signed with the changed header: the header checks decide
        claims = json.loads(b64url_decode(payload))
        parse_or_refuse(material.sign(claims, changed))
        verify_or_refuse(material, material.sign(claims, changed))


@FUZZ
@given(st.data())
def test_changed_claims_resigned(material: Material, data: st.DataObject) -> None:
    token = data.draw(st.sampled_from(material.tokens))
    claims = json.loads(jws.parse_compact(token).payload)
    changed = data.draw(changed_members(claims, CLAIM_NAMES, claim_values(material)))
    if data.draw(st.booleans()):
        changed[data.draw(st.text(max_size=6))] = data.draw(json_values)
    verified = verify_or_refuse(material, material.sign(changed))
    if verified is not None:  # what passed is what the contract allows
        assert verified.issuer.iss == ISSUER
        assert isinstance(verified.claims["meta_data"], str)
        assert type(verified.claims["exp"]) is int and verified.claims["exp"] > T - 30
