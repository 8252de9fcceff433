"""Fuzz the ``meta_data`` parsers: ``envelope`` (``EnvelopeOpener.open``), ``kms-direct``
(``decode_kms_direct`` + ``open_kms_direct``), and the card JSON behind both
(``CardOpener.open_card`` on correctly sealed, correctly signed tokens around any plaintext).

Random text, genuine ``meta_data`` with characters flipped, bits flipped inside a part, parts
spliced, the protected header's members changed, the base64 alphabet and padding played with:
the openers return plaintext only for a genuine input and otherwise raise a ``CardsealError``
with a contract code (``meta_data_malformed``, ``decryption_failed``, ``kms_key_not_allowed``,
``card_*``), never anything else.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.card import Card
from cardseal.envelope import decode_kms_direct, open_kms_direct
from cardseal.errors import CardsealError
from cardseal.testing import AUDIENCE, ISSUER, SAMPLE_PANS, sample_card_json
from tests.fuzz.conftest import FUZZ, Material
from tests.fuzz.strategies import (
    assert_contract_error,
    b64_std,
    changed_members,
    dumps,
    flipped_part,
    json_values,
    mutated_text,
    spliced,
)

ALLOWED = ("local://main",)
META_DATA_CODES = {"meta_data_malformed", "decryption_failed", "kms_key_not_allowed"}
HEADER_VALUES: dict[str, list[Any]] = {
    "alg": ["kms", "KMS", "dir", "A256KW", "", None],
    "enc": ["A256GCM", "A128GCM", "a256gcm", None],
    "kid": ["local://main", "local://other", "local://missing", "aws-kms://alias/x",
            "nonsense", "local://", "", None, ["local://main"]],
    "jti": ["", None, 1, "x" * 300],
}


def open_envelope(material: Material, meta_data: str, jti: str) -> bytes | None:
    try:
        return material.setup.opener.envelope.open(
            meta_data, allowed_keys=ALLOWED, iss=ISSUER, aud=AUDIENCE, jti=jti)
    except CardsealError as err:
        assert err.code in META_DATA_CODES, err.code
        assert_contract_error(err, [meta_data])
    return None


def open_direct(material: Material, meta_data: str, context: dict[str, str] | None
                ) -> bytes | None:
    try:
        blob = decode_kms_direct(meta_data)
        return open_kms_direct(material.setup.providers, blob, allowed_keys=ALLOWED,
                               context=context)
    except CardsealError as err:
        assert err.code in META_DATA_CODES, err.code
        assert_contract_error(err, [meta_data])
    return None


def direct_context(jti: str) -> dict[str, str]:
    return {"purpose": "cardseal/meta_data", "iss": ISSUER, "aud": AUDIENCE, "jti": jti}


@FUZZ
@given(text=st.text(max_size=300), jti=st.text(max_size=30))
def test_random_meta_data(material: Material, text: str, jti: str) -> None:
    assert open_envelope(material, text, jti) is None
    assert open_direct(material, text, direct_context(jti)) is None
    assert open_direct(material, text, None) is None


@FUZZ
@given(st.data())
def test_mutated_envelopes(material: Material, data: st.DataObject) -> None:
    (meta_data, jti), (other, _) = (data.draw(st.sampled_from(material.envelopes))
                                    for _ in range(2))
    mutant = data.draw(st.one_of(mutated_text(meta_data), flipped_part(meta_data),
                                 spliced(meta_data, other)))
    plaintext = open_envelope(material, mutant, jti)
    if plaintext is not None:  # only an unchanged envelope opens
        assert mutant == meta_data


@FUZZ
@given(st.data())
def test_changed_protected_header(material: Material, data: st.DataObject) -> None:
    meta_data, jti = data.draw(st.sampled_from(material.envelopes))
    head, *rest = meta_data.split(".")
    header = json.loads(b64url_decode(head))
    changed = data.draw(changed_members(header, [*HEADER_VALUES, "zip", "x"], HEADER_VALUES))
    mutant = ".".join([b64url_encode(dumps(changed).encode()), *rest])
    plaintext = open_envelope(material, mutant, jti)
    assert plaintext is None or changed == header  # the header is authenticated (AAD)


@FUZZ
@given(st.data())
def test_mutated_kms_direct(material: Material, data: st.DataObject) -> None:
    meta_data, jti = data.draw(st.sampled_from(material.kms_direct))
    blob = decode_kms_direct(meta_data)
    mutant = data.draw(st.one_of(
        mutated_text(meta_data, alphabet="+/=-_ \n.AZaz09\u00e9"),
        st.just(meta_data.rstrip("=")),  # padding is optional
        st.just(meta_data.replace("+", "-").replace("/", "_")),  # url-safe is accepted
        st.binary(max_size=len(blob)).map(lambda junk: b64_std(junk + blob[len(junk):])),
    ))
    context = direct_context(jti) if data.draw(st.booleans()) else None
    plaintext = open_direct(material, mutant, context)
    if plaintext is not None:
        assert context is not None and decode_kms_direct(mutant) == blob


def card_plaintexts() -> st.SearchStrategy[bytes]:
    """Card JSON as a client might send it, mutated, or anything at all."""
    genuine = sample_card_json(SAMPLE_PANS["visa"])
    fields = st.fixed_dictionaries({}, optional={
        "card_number": st.one_of(st.sampled_from(sorted(SAMPLE_PANS.values())),
                                 st.text("0123456789 -", max_size=25), json_values),
        "expiry_date": st.one_of(st.sampled_from(["12/29", "12/2099", "13/29", "00/30", "1/30",
                                                  "12/99999", "12-29", "1229", ""]),
                                 json_values),
        "cvv": st.one_of(st.text("0123456789", max_size=5), json_values),
        "cardholder_name": json_values,
        "extra": json_values,
    })
    return st.one_of(
        fields.map(lambda value: dumps(value).encode()),
        mutated_text(genuine.decode()).map(lambda t: t.encode("utf-8", "surrogatepass")),
        json_values.map(lambda value: dumps(value).encode()),
        st.binary(max_size=200),
    )


@FUZZ
@given(st.data())
def test_card_json_behind_a_genuine_envelope(material: Material, data: st.DataObject) -> None:
    """Through the whole opening path: a correctly signed token whose ``meta_data`` is a correct
    envelope around a fuzzed plaintext."""
    plaintext = data.draw(card_plaintexts())
    jti = "fuzz-" + data.draw(st.text("abcdef0123456789", min_size=16, max_size=16))
    token = material.sign(material.claims(material.envelope(plaintext, jti), jti))
    verified = material.setup.verifier.verify(token)
    try:
        card = material.setup.opener.open_card(verified)
    except CardsealError as err:
        assert err.code in {"meta_data_malformed", *(
            f"card_{c}" for c in ("number_invalid", "expired", "cvv_invalid",
                                  "brand_unsupported"))}, err.code
        assert_contract_error(err, [plaintext.decode(errors="replace")])
        return
    assert isinstance(card, Card)
    assert card.pan not in repr(card)
