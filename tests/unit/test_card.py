"""Card: Luhn, brand by IIN range, lengths, CVV, expiry, masking, and keeping the PAN private."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardseal._encoding import dumps_compact
from cardseal.card import MIN_MASKED_DIGITS, Card, CardView, luhn_valid
from cardseal.errors import CardError, RequestError
from cardseal.testing import SAMPLE_PANS, sample_card_json

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)


def luhn_complete(prefix: str, length: int) -> str:
    """``prefix`` padded with zeros to ``length - 1`` digits plus the Luhn check digit."""
    body = prefix.ljust(length - 1, "0")
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


def fullwidth(text: str) -> str:
    """``text`` in Unicode full-width forms (digits that ``int()`` would accept)."""
    return "".join(chr(ord(c) + 0xFEE0) for c in text)


def make(pan: str, *, cvv: str | None = None, expiry: str = "12/2099",
         now: datetime = NOW) -> Card:
    if cvv is None:
        cvv = "1234" if pan[:2] in ("34", "37") else "123"
    return Card(card_number=pan, expiry_date=expiry, cvv=cvv, now=now)


def card_error(pan: str, **kwargs: object) -> str:
    with pytest.raises(CardError) as excinfo:
        make(pan, **kwargs)  # type: ignore[arg-type]
    return excinfo.value.code


# -- Luhn -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pan", [*SAMPLE_PANS.values(), "79927398713", "0"])
def test_luhn_valid(pan: str) -> None:
    assert luhn_valid(pan)


@pytest.mark.parametrize("pan", ["4242424242424241", "79927398710", "1"])
def test_luhn_invalid(pan: str) -> None:
    assert not luhn_valid(pan)


def test_luhn_failure_is_card_number_invalid() -> None:
    assert card_error("4242424242424241") == "card_number_invalid"


# -- brands -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLE_PANS))
def test_sample_pans_have_their_brand(name: str) -> None:
    assert make(SAMPLE_PANS[name]).brand == name.removesuffix("_2series")


@pytest.mark.parametrize(
    ("prefix", "length", "brand"),
    [
        ("4", 16, "visa"), ("51", 16, "mastercard"), ("55", 16, "mastercard"),
        ("2221", 16, "mastercard"), ("2720", 16, "mastercard"), ("34", 15, "amex"),
        ("37", 15, "amex"), ("6011", 16, "discover"), ("644", 16, "discover"),
        ("649", 19, "discover"), ("65", 16, "discover"), ("622126", 16, "discover"),
        ("622925", 16, "discover"), ("622125", 16, "unionpay"), ("622926", 16, "unionpay"),
        ("62", 19, "unionpay"), ("3528", 16, "jcb"), ("3589", 19, "jcb"), ("300", 14, "diners"),
        ("305", 16, "diners"), ("3095", 14, "diners"), ("36", 14, "diners"), ("38", 14, "diners"),
        ("39", 16, "diners"), ("5018", 12, "maestro"), ("5020", 16, "maestro"),
        ("5038", 19, "maestro"), ("5893", 16, "maestro"), ("6304", 16, "maestro"),
        ("6759", 16, "maestro"), ("6761", 16, "maestro"), ("6763", 16, "maestro"),
    ],
)
def test_brand_by_iin_range(prefix: str, length: int, brand: str) -> None:
    assert make(luhn_complete(prefix, length)).brand == brand


@pytest.mark.parametrize(
    "prefix",
    ["2220", "2721", "1", "7", "8", "9", "3527", "3590", "306", "6012", "643", "5019", "50"],
)
def test_luhn_valid_number_of_no_known_brand_is_unsupported(prefix: str) -> None:
    assert card_error(luhn_complete(prefix, 16)) == "card_brand_unsupported"


@pytest.mark.parametrize(
    ("prefix", "length"),
    [
        ("4", 15), ("4", 17), ("4", 12),
        ("51", 15), ("51", 17), ("2221", 19),
        ("34", 14), ("37", 16),
        ("6011", 15), ("3528", 15), ("62", 15),
        ("36", 13), ("5018", 20), ("4", 11),
    ],
)
def test_length_must_fit_the_brand(prefix: str, length: int) -> None:
    assert card_error(luhn_complete(prefix, length)) == "card_number_invalid"


@pytest.mark.parametrize("length", [13, 16, 19])
def test_visa_lengths(length: int) -> None:
    assert make(luhn_complete("4", length)).brand == "visa"


@pytest.mark.parametrize(
    "number",
    ["", "abcd", "4242424242424242x", fullwidth("4242424242424242"), "4242\t4242424242424242",
     "4242.4242.4242.4242", "4" * 40],
)
def test_malformed_numbers_are_invalid(number: str) -> None:
    assert card_error(number) == "card_number_invalid"


def test_spaces_and_dashes_are_stripped() -> None:
    card = make("4242 4242-4242 4242")
    assert card.pan == "4242424242424242"
    assert card.masked == "424242******4242"


# -- CVV --------------------------------------------------------------------------------------


def test_amex_takes_a_four_digit_cvv() -> None:
    assert make(SAMPLE_PANS["amex"], cvv="1234").cvv == "1234"
    assert card_error(SAMPLE_PANS["amex"], cvv="123") == "card_cvv_invalid"


@pytest.mark.parametrize("name", [n for n in SAMPLE_PANS if n != "amex"])
def test_other_brands_take_a_three_digit_cvv(name: str) -> None:
    assert make(SAMPLE_PANS[name], cvv="123").cvv == "123"
    assert card_error(SAMPLE_PANS[name], cvv="1234") == "card_cvv_invalid"


@pytest.mark.parametrize("cvv", ["", "12", "12a", " 123", fullwidth("123"), "12345"])
def test_malformed_cvv(cvv: str) -> None:
    assert card_error(SAMPLE_PANS["visa"], cvv=cvv) == "card_cvv_invalid"


# -- expiry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("expiry", ["12/29", "12/2029"])
def test_valid_through_the_last_moment_of_the_month(expiry: str) -> None:
    last = datetime(2029, 12, 31, 23, 59, 59, tzinfo=UTC)
    card = make(SAMPLE_PANS["visa"], expiry=expiry, now=last)
    assert (card.exp_month, card.exp_year) == (12, 2029)
    first = datetime(2030, 1, 1, tzinfo=UTC)
    assert card_error(SAMPLE_PANS["visa"], expiry=expiry, now=first) == "card_expired"


def test_expiry_month_and_year_in_the_view() -> None:
    view = make(SAMPLE_PANS["visa"], expiry="03/27").view(b"k" * 32)
    assert (view.exp_month, view.exp_year) == (3, 2027)


def test_without_now_the_current_time_is_used() -> None:
    card = Card(card_number=SAMPLE_PANS["visa"], expiry_date="01/2099", cvv="123")
    assert card.exp_year == 2099
    with pytest.raises(CardError) as excinfo:
        Card(card_number=SAMPLE_PANS["visa"], expiry_date="01/2000", cvv="123")
    assert excinfo.value.code == "card_expired"


@pytest.mark.parametrize(
    "expiry",
    ["", "1229", "1/29", "12/9", "12/029", "12/20299", "00/29", "13/29", "12-29", "ab/cd",
     "12/29 ", " 12/29", fullwidth("12/29"), "12//29", "+1/29"],
)
def test_malformed_expiry(expiry: str) -> None:
    assert card_error(SAMPLE_PANS["visa"], expiry=expiry) == "card_expired"


# -- never showing the PAN or CVV ---------------------------------------------------------------


def test_repr_and_str_hide_pan_and_cvv() -> None:
    card = make("4242424242424242", cvv="987")
    for text in (repr(card), str(card), f"{card}", repr([card])):
        assert "4242424242424242" not in text
        assert "987" not in text
        assert "424242******4242" in text


@pytest.mark.parametrize("name", list(SAMPLE_PANS))
def test_masked_is_first_six_and_last_four(name: str) -> None:
    pan = SAMPLE_PANS[name]
    card = make(pan)
    if len(pan) >= 15:
        assert card.masked == pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
    assert len(card.masked) == len(pan)
    assert card.last4 == pan[-4:]


@pytest.mark.parametrize(("pan", "masked"), [
    ("501800000009", "501*****0009"),  # Maestro, 12 digits: was 501800**0009
    ("4222222222222", "4222*****2222"),  # Visa, 13 digits
    ("36227206271667", "36227*****1667"),  # Diners, 14 digits
    ("378282246310005", "378282*****0005"),  # Amex, 15: first six and last four
    ("6759649826438453", "675964******8453"),
])
def test_a_masked_pan_hides_at_least_five_digits(pan: str, masked: str) -> None:
    """PCI DSS 3.4.1 allows BIN and last four at most. On a 12-digit PAN those leave two
    digits, and the Luhn digit narrows them to ten numbers: the PAN in all but name, in every
    response and ledger row. Below 15 digits fewer leading digits show."""
    assert make(pan).masked == masked
    assert masked.count("*") >= MIN_MASKED_DIGITS


def test_fingerprint_is_keyed_and_stable() -> None:
    a = make("4242424242424242")
    b = make("4242 4242 4242 4242", cvv="321", expiry="01/2098")
    secret = b"s" * 32
    assert a.fingerprint(secret) == b.fingerprint(secret)
    assert a.fingerprint(secret).startswith("fp_")
    assert a.fingerprint(secret) != a.fingerprint(b"t" * 32)
    assert a.fingerprint(secret) != make(SAMPLE_PANS["mastercard"]).fingerprint(secret)
    plain = hashlib.sha256(b"4242424242424242").hexdigest()
    assert a.fingerprint(secret)[3:] not in plain


def test_view_is_the_contract_card() -> None:
    view = make("4242424242424242", expiry="12/29").view(b"s" * 32)
    assert isinstance(view, CardView)
    assert view.to_dict() == {
        "brand": "visa",
        "last4": "4242",
        "masked": "424242******4242",
        "exp_month": 12,
        "exp_year": 2029,
        "fingerprint": make("4242424242424242").fingerprint(b"s" * 32),
    }


def test_card_cannot_be_pickled() -> None:
    card = make("4242424242424242")
    with pytest.raises(TypeError):
        pickle.dumps(card)


# -- parsing card JSON --------------------------------------------------------------------------


def test_from_json_round_trip() -> None:
    card = Card.from_json(
        b'{"card_number": "4242-4242-4242-4242", "expiry_date": "12/29", "cvv": "123",'
        b' "cardholder_name": "A N Other"}',
        now=NOW,
    )
    again = Card.from_json(card.to_json(), now=NOW)
    assert (again.pan, again.cvv, again.exp_month, again.exp_year, again.cardholder_name) == (
        "4242424242424242", "123", 12, 2029, "A N Other"
    )


def test_sample_card_json_parses() -> None:
    assert Card.from_json(sample_card_json(SAMPLE_PANS["amex"])).brand == "amex"


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        "4242424242424242",
        {"card_number": "4242424242424242", "expiry_date": "12/29"},
        {"card_number": "4242424242424242", "cvv": "123"},
        {"expiry_date": "12/29", "cvv": "123"},
        {"card_number": 4242424242424242, "expiry_date": "12/29", "cvv": "123"},
        {"card_number": "4242424242424242", "expiry_date": "12/29", "cvv": 123},
        {"card_number": "4242424242424242", "expiry_date": None, "cvv": "123"},
        {"card_number": "4242424242424242", "expiry_date": "12/29", "cvv": "123", "pin": "1"},
        {"card_number": "4242424242424242", "expiry_date": "12/29", "cvv": "123",
         "cardholder_name": 7},
        {"card_number": "4242424242424242", "expiry_date": "12/29", "cvv": "123",
         "cardholder_name": "x" * 129},
    ],
)
def test_parse_shape_errors_are_request_invalid(value: object) -> None:
    with pytest.raises(RequestError) as excinfo:
        Card.parse(value, now=NOW)
    assert excinfo.value.code == "request_invalid"


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[", b'{"card_number": "1", "card_number": "2"}', b"\xff\xfe{}",
     b'{"card_number": "' + b"4" * 2000 + b'"}', b'{"a": {"b": {"c": 1}}}'],
)
def test_from_json_errors_are_request_invalid(data: bytes) -> None:
    with pytest.raises(RequestError) as excinfo:
        Card.from_json(data, now=NOW)
    assert excinfo.value.code == "request_invalid"


def test_overlong_number_is_card_number_invalid_without_parsing() -> None:
    value = {"card_number": "4" * 33, "expiry_date": "12/29", "cvv": "123"}
    with pytest.raises(CardError) as excinfo:
        Card.parse(value, now=NOW)
    assert excinfo.value.code == "card_number_invalid"


def test_card_errors_never_echo_the_number() -> None:
    with pytest.raises(CardError) as excinfo:
        make("4242424242424241")
    assert "4242" not in str(excinfo.value)
    assert "4242" not in repr(excinfo.value)


@pytest.mark.parametrize("name", [None, "Ada Lovelace", 'O"Brien \\ Ünal', "\u00e9\u4e2d\n"])
def test_to_json_is_the_compact_sorted_json_of_the_card(name: str | None) -> None:
    card = Card(card_number="4111 1111 1111 1111", expiry_date="07/2031", cvv="123",
                cardholder_name=name)
    value = {"card_number": "4111111111111111", "expiry_date": "07/2031", "cvv": "123"}
    if name is not None:
        value["cardholder_name"] = name
    assert card.to_json() == dumps_compact(value)
    assert Card.from_json(card.to_json()).to_json() == card.to_json()


def _outcome(make: Callable[[], Card]) -> str:
    try:
        return make().to_json().decode()
    except (CardError, RequestError) as err:
        return err.code


@given(number=st.text("0123456789", min_size=10, max_size=21),
       cvv=st.text("0123456789", min_size=2, max_size=5),
       month=st.integers(0, 99), year=st.integers(0, 9999))
def test_the_canonical_card_shortcut_agrees_with_the_parser(
    number: str, cvv: str, month: int, year: int
) -> None:
    data = (f'{{"card_number":"{number}","cvv":"{cvv}",'
            f'"expiry_date":"{month:02d}/{year:04d}"}}').encode()
    now = datetime(2026, 11, 29, tzinfo=UTC)
    assert _outcome(lambda: Card.from_json(data, now=now)) == _outcome(
        lambda: Card.parse(json.loads(data), now=now))


# -- the canonical shortcut of from_json: the constructor's outcome, without the parser --------


def _outcome(build: Callable[[], Card]) -> object:
    try:
        card = build()
    except CardError as err:
        return err.code
    return (card.brand, card.masked, card.exp_month, card.exp_year, card.pan, card.cvv)


@given(pan=st.text("0123456789", min_size=12, max_size=19) | st.sampled_from(
           [luhn_complete(p, n) for p in ("4", "51", "34", "6011", "62", "2221")
            for n in (13, 15, 16, 19)]),
       cvv=st.text("0123456789", min_size=3, max_size=4),
       month=st.integers(0, 19), year=st.integers(2020, 2035))
def test_the_canonical_card_json_shortcut_agrees_with_the_constructor(
    pan: str, cvv: str, month: int, year: int
) -> None:
    expiry = f"{month:02d}/{year}"
    data = dumps_compact({"card_number": pan, "cvv": cvv, "expiry_date": expiry})
    assert _outcome(lambda: Card.from_json(data, now=NOW)) == _outcome(
        lambda: Card(card_number=pan, expiry_date=expiry, cvv=cvv, now=NOW))


def test_the_current_month_turns_at_midnight_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    import cardseal.card as card_module

    pan = SAMPLE_PANS["visa"]
    last_second = datetime(2027, 3, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    monkeypatch.setattr(card_module, "_this_month", (0, 0.0))  # nothing cached
    monkeypatch.setattr(card_module.time, "time", lambda: last_second)
    assert make(pan, expiry="03/2027", now=None).exp_month == 3  # valid through March
    monkeypatch.setattr(card_module.time, "time", lambda: last_second + 1)  # April 1st
    assert card_error(pan, expiry="03/2027", now=None) == "card_expired"
    assert make(pan, expiry="04/2027", now=None).exp_month == 4
    monkeypatch.setattr(card_module.time, "time", lambda: last_second - 86400 * 31)  # Feb
    monkeypatch.setattr(card_module, "_this_month", (0, 0.0))
    assert make(pan, expiry="02/2027", now=None).exp_year == 2027
