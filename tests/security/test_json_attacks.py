"""Attacks on the JSON inside a token: the JOSE header, the claim set, and the card JSON that
``meta_data`` carries. Each is validly signed (and, for the card, validly encrypted), so the JSON
itself is the only reason for the refusal.

Codes: a header or claim set that is not strict JSON is ``token_malformed``; a card plaintext
that is not strict JSON is ``meta_data_malformed`` (CONTRACT.md section 5).
"""

from __future__ import annotations

import json
import time

import pytest

from cardseal.envelope import EnvelopeSealer
from cardseal.testing import LocalSetup
from tests.security.conftest import Forge, refused, refused_open


def claims_text(forge: Forge) -> tuple[bytes, dict[str, object]]:
    head, claims = forge.parts()
    return json.dumps(head).encode(), claims


def splice(claims: dict[str, object], member: str, raw: str) -> bytes:
    """The claim set as JSON text with ``member``'s value replaced by the raw text ``raw``."""
    text = json.dumps({**claims, member: "@@RAW@@"})
    return text.replace('"@@RAW@@"', raw).encode()


def sealed_plaintext(setup: LocalSetup, forge: Forge, plaintext: bytes) -> str:
    """A genuine token whose ``meta_data`` envelope carries exactly ``plaintext``."""
    head, claims = forge.parts()
    sealer = EnvelopeSealer(providers=setup.providers, key_uri="local://main")
    claims["meta_data"] = sealer.seal(plaintext, iss=setup.policy.iss,
                                      aud=setup.policy.audience, jti=str(claims["jti"]))
    return forge.raw(json.dumps(head).encode(), json.dumps(claims).encode())


# -- duplicate members ---------------------------------------------------------------------------


@pytest.mark.parametrize(("member", "value"), [
    ("alg", '"none"'), ("alg", '"HS256"'), ("kid", '"attacker"'), ("typ", '"JWT"'),
    ("typ", '"card+jwt"'),
])
@pytest.mark.parametrize("order", ["forged-last", "forged-first"])
@pytest.mark.parametrize("sep", [", ", ","], ids=["spaced", "compact"])
def test_duplicate_header_members(forge: Forge, rs256: LocalSetup, member: str, value: str,
                                  order: str, sep: str) -> None:
    """A header naming a member twice: parsers that keep the first and those that keep the last
    see different algorithms or keys (a parser differential).

    Source: RFC 7515 section 5.2 step 4 ("MUST reject ... duplicate Header Parameter names" or
    use the lexically last); RFC 8725 section 2.6; CVE-2017-12635 (CouchDB duplicate-key
    privilege escalation).
    """
    # "compact": the form orjson writes, which the fast path reads (it must still refuse).
    head, claims = forge.parts()
    colon = ":" if sep == "," else ": "
    genuine = json.dumps(head, separators=(sep, colon))
    if order == "forged-last":
        raw = genuine[:-1] + f'{sep}"{member}"{colon}{value}}}'
    else:
        raw = "{" + f'"{member}"{colon}{value}{sep}' + genuine[1:]
    refused(rs256.verifier, forge.raw(raw.encode(), json.dumps(claims).encode()),
            "token_malformed")


@pytest.mark.parametrize(("member", "value"), [
    ("iss", '"attacker"'), ("aud", '"another-gateway"'), ("exp", "9999999999"),
    ("jti", '"aaaaaaaaaaaaaaaaaaaaaa"'), ("meta_data", '"AAAA"'), ("iat", "1750000000"),
])
@pytest.mark.parametrize("sep", [", ", ","], ids=["spaced", "compact"])
def test_duplicate_claim_members(forge: Forge, rs256: LocalSetup, member: str,
                                 value: str, sep: str) -> None:
    """A claim set naming a claim twice (issuer, audience, expiry, jti, meta_data, iat; the
    last one with the genuine value again).

    Source: RFC 7519 section 4 ("Claim Names ... MUST be unique"; reject or use the last);
    RFC 8725 section 2.6; CVE-2017-12635.
    """
    _, claims = forge.parts()
    colon = ":" if sep == "," else ": "
    raw = json.dumps(claims, separators=(sep, colon))[:-1] + f'{sep}"{member}"{colon}{value}}}'
    refused(rs256.verifier, forge.raw_claims(raw.encode()), "token_malformed")


def test_duplicate_members_spelled_with_escapes(forge: Forge, rs256: LocalSetup) -> None:
    """The same name written two ways (``"iss"`` and ``"\\u0069ss"``), and a duplicate inside a
    nested object (``payment.amount``).

    Source: RFC 8259 section 7 (escapes name the same string); CVE-2017-12635.
    """
    _, claims = forge.parts()
    escaped = json.dumps(claims)[:-1] + ', "\\u0069ss": "attacker"}'
    refused(rs256.verifier, forge.raw_claims(escaped.encode()), "token_malformed")
    nested = splice(claims, "payment",
                    '{"amount": 100000, "currency": "USD", "amount": 1}')
    refused(rs256.verifier, forge.raw_claims(nested), "token_malformed")


def test_duplicate_members_in_the_card_json(forge: Forge, rs256: LocalSetup) -> None:
    """A card plaintext naming ``card_number`` twice: the processor's parser and cardseal's
    would see different cards.

    Source: RFC 8259 section 4; CVE-2017-12635.
    """
    plaintext = (b'{"card_number": "4242424242424242", "expiry_date": "12/2099", "cvv": "123",'
                 b' "card_number": "4000000000000002"}')
    refused_open(rs256, sealed_plaintext(rs256, forge, plaintext), "meta_data_malformed")


# -- nesting and size ----------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "depth"), [("claims", 4), ("claims", 5000),
                                              ("header", 2), ("header", 4000)])
def test_deeply_nested_json(forge: Forge, rs256: LocalSetup, where: str, depth: int) -> None:
    """Arrays nested just past the limit, and thousands deep (Python's recursive decoder would
    raise RecursionError); refused quickly either way.

    Source: CVE-2020-36518 (jackson-databind stack overflow on deep nesting); RFC 8259 section 9
    (parsers may limit nesting depth); STYLE.md habit 5.
    """
    head, claims = forge.parts()
    deep = "[" * depth + "]" * depth
    if where == "claims":
        token = forge.raw(json.dumps(head).encode(), splice(claims, "x", deep))
    else:
        token = forge.raw(json.dumps({**head, "x": "@@"}).replace('"@@"', deep).encode(),
                          json.dumps(claims).encode())
    start = time.perf_counter()
    refused(rs256.verifier, token, "token_malformed")
    assert time.perf_counter() - start < 0.5


def test_deeply_nested_card_json(forge: Forge, rs256: LocalSetup) -> None:
    """A card plaintext with a member nested 400 deep.

    Source: CVE-2020-36518; RFC 8259 section 9.
    """
    plaintext = (b'{"card_number": "4242424242424242", "expiry_date": "12/2099", "cvv": "123",'
                 b' "cardholder_name": ' + b"[" * 400 + b"]" * 400 + b"}")
    refused_open(rs256, sealed_plaintext(rs256, forge, plaintext), "meta_data_malformed")


# -- numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1E+999", "1" + "0" * 400,
                                    "-" + "9" * 400, "1" + "0" * 5000, "12345678901234567890123"])
@pytest.mark.parametrize("member", ["exp", "iat", "nbf", "x"])
def test_huge_numbers(forge: Forge, rs256: LocalSetup, number: str, member: str) -> None:
    """Numbers beyond IEEE 754 (1e400 is infinity to a float parser), a 400- and a 5000-digit
    integer literal (quadratic int parsing), a 23-digit integer, in a date claim or any other
    member.

    Source: CVE-2020-10735 (CPython quadratic int/str conversion); RFC 8259 section 6
    (interoperable range); RFC 7493 section 2.2 (I-JSON numbers); RFC 7519 section 2
    (NumericDate).
    """
    _, claims = forge.parts()
    start = time.perf_counter()
    refused(rs256.verifier, forge.raw_claims(splice(claims, member, number)), "token_malformed")
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("number", ["1e308", "1750000300.5", "1.75e9", "9007199254740992",
                                    "-1", "true", '"1750000300"'])
@pytest.mark.parametrize("member", ["exp", "iat", "nbf"])
def test_numeric_dates_that_are_no_integers(forge: Forge, rs256: LocalSetup, number: str,
                                            member: str) -> None:
    """Date claims that fit a float but are no integer NumericDate of at most 2^53: a huge
    float, a fraction, an exponent, 2^53, a negative, a boolean, a numeric string.

    Source: RFC 7519 section 2 (NumericDate); RFC 7493 section 2.2 (integers within 2^53);
    CONTRACT.md section 3 ("integers only for dates", README).
    """
    _, claims = forge.parts()
    refused(rs256.verifier, forge.raw_claims(splice(claims, member, number)), "token_malformed")


@pytest.mark.parametrize("amount", ["1e400", "1" + "0" * 400, "1.5", "-1", "0", "true",
                                    '"100"'])
def test_huge_or_wrong_payment_amount(forge: Forge, rs256: LocalSetup, amount: str) -> None:
    """The ``payment.amount`` the gateway charges, as a huge, fractional, negative, zero,
    boolean or string number.

    Source: CONTRACT.md section 3 (``amount``: int minor units); CVE-2020-10735.
    """
    _, claims = forge.parts()
    payment = '{"amount": ' + amount + ', "currency": "USD"}'
    refused(rs256.verifier, forge.raw_claims(splice(claims, "payment", payment)),
            "token_malformed")


def test_huge_number_in_the_header(forge: Forge, rs256: LocalSetup) -> None:
    """A header member that is a number beyond range.

    Source: RFC 8259 section 6; CVE-2020-10735.
    """
    head, claims = forge.parts()
    for number in ("1e400", "1" + "0" * 400):
        raw = json.dumps({**head, "x": "@@"}).replace('"@@"', number).encode()
        refused(rs256.verifier, forge.raw(raw, json.dumps(claims).encode()), "token_malformed")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "nan", "inf"])
@pytest.mark.parametrize("member", ["exp", "x"])
def test_nan_and_infinity_literals(forge: Forge, rs256: LocalSetup, literal: str,
                                   member: str) -> None:
    """``NaN``, ``Infinity``, ``-Infinity`` (Python's json accepts them by default), in a date
    claim and in any other member, and in the header.

    Source: RFC 8259 section 6 ("Infinity and NaN are not permitted"); RFC 7493 section 2.2.
    """
    head, claims = forge.parts()
    refused(rs256.verifier, forge.raw_claims(splice(claims, member, literal)), "token_malformed")
    raw_head = json.dumps({**head, "x": "@@"}).replace('"@@"', literal).encode()
    refused(rs256.verifier, forge.raw(raw_head, json.dumps(claims).encode()), "token_malformed")


def test_nan_in_the_card_json(forge: Forge, rs256: LocalSetup) -> None:
    """A card plaintext with a ``NaN`` member.

    Source: RFC 8259 section 6.
    """
    plaintext = (b'{"card_number": "4242424242424242", "expiry_date": "12/2099", "cvv": "123",'
                 b' "cardholder_name": NaN}')
    refused_open(rs256, sealed_plaintext(rs256, forge, plaintext), "meta_data_malformed")


# -- encodings -----------------------------------------------------------------------------------


ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig"]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("where", ["claims", "header"])
def test_utf16_utf32_and_bom(forge: Forge, rs256: LocalSetup, encoding: str, where: str) -> None:
    """The header or claim set as UTF-16 or UTF-32 (with and without byte-order mark), or as
    UTF-8 with a BOM.

    Source: RFC 8259 section 8.1 (JSON exchanged between systems MUST be UTF-8 and MUST NOT
    begin with a BOM); RFC 8725 section 3.7 ("Use UTF-8").
    """
    head, claims = forge.parts()
    header_bytes = json.dumps(head).encode()
    claim_bytes = json.dumps(claims).encode()
    if where == "claims":
        token = forge.raw(header_bytes, json.dumps(claims).encode(encoding))
    else:
        token = forge.raw(json.dumps(head).encode(encoding), claim_bytes)
    refused(rs256.verifier, token, "token_malformed")


@pytest.mark.parametrize("raw", [
    b"\xe9",              # Latin-1 e-acute: not UTF-8
    b"\xc0\xaf",          # overlong "/"
    b"\xed\xa0\x80",      # a UTF-16 surrogate encoded as UTF-8 (CESU-8)
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xff\xfe",          # a stray byte-order mark
    b"\x80",              # a lone continuation byte
])
def test_invalid_utf8_bytes(forge: Forge, rs256: LocalSetup, raw: bytes) -> None:
    """Bytes that are not well-formed UTF-8 inside a claim's string value.

    Source: RFC 3629 section 3 (overlong forms, surrogates, > U+10FFFF are invalid); RFC 8259
    section 8.1; RFC 8725 section 3.7.
    """
    _, claims = forge.parts()
    payload = json.dumps({**claims, "x": "@@"}).encode().replace(b"@@", raw)
    refused(rs256.verifier, forge.raw_claims(payload), "token_malformed")


@pytest.mark.parametrize("member", ["iss", "x", "kid-in-header"])
@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\ud800x", "\\udc00\\ud800"])
def test_lone_surrogate_escapes(forge: Forge, rs256: LocalSetup, member: str,
                                escape: str) -> None:
    r"""A ``\uD800``-style escape with no partner: valid JSON syntax, but no Unicode string, so
    nothing downstream (the database, the log, a UTF-8 encoder) can hold it.

    Found by this suite: a forged token whose ``iss`` was a lone surrogate reached the
    idempotency table and the gateway answered 500 (see test_http_attacks).

    Source: RFC 7493 section 2.1 (I-JSON: MUST NOT contain unpaired surrogates); RFC 8259
    section 8.2.
    """
    head, claims = forge.parts()
    if member == "kid-in-header":
        raw_head = json.dumps({**head, "kid": "@@"}).replace("@@", escape).encode()
        token = forge.raw(raw_head, json.dumps(claims).encode())
    else:
        token = forge.raw_claims(json.dumps({**claims, member: "@@"}).replace("@@", escape)
                                 .encode())
    refused(rs256.verifier, token, "token_malformed")


def test_paired_surrogate_escapes_are_text(forge: Forge, rs256: LocalSetup) -> None:
    r"""The check above refuses only unpaired surrogates: ``\ud83d\udcb3`` is U+1F4B3 and a
    claim may hold it.

    Source: RFC 8259 section 7 (a character outside the BMP as a surrogate pair escape).
    """
    _, claims = forge.parts()
    payload = json.dumps({**claims, "x": "@@"}).replace("@@", "\\ud83d\\udcb3").encode()
    assert rs256.verifier.verify(forge.raw_claims(payload)).claims["x"] == "\U0001f4b3"


@pytest.mark.parametrize("reference", ["a\x00b", "line\nbreak", "\x1b[31mred", "tab\there",
                                       "del\x7f", "c1\x85"])
def test_control_characters_in_the_payment_reference(forge: Forge, rs256: LocalSetup,
                                                     reference: str) -> None:
    """The ``payment.reference`` lands in the ledger and the API's answers: a NUL (PostgreSQL
    text cannot hold it), a line break or terminal escape (log and report injection).

    Found by this suite: a NUL or lone surrogate there was charged, then failed the ledger
    insert (a 500 after the charge).

    Source: CWE-117 (improper output neutralization for logs); RFC 7493 section 2.1;
    PostgreSQL documentation, "Character Types" (NUL is not allowed in text).
    """
    token = forge.token(claims={"payment": {"amount": 100, "currency": "USD",
                                            "reference": reference}})
    refused(rs256.verifier, token, "token_malformed")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_card_json_in_another_encoding(forge: Forge, rs256: LocalSetup, encoding: str) -> None:
    """A card plaintext as UTF-16, UTF-32 or UTF-8 with a BOM.

    Source: RFC 8259 section 8.1.
    """
    plaintext = json.dumps({"card_number": "4242424242424242", "expiry_date": "12/2099",
                            "cvv": "123"}).encode(encoding)
    refused_open(rs256, sealed_plaintext(rs256, forge, plaintext), "meta_data_malformed")
