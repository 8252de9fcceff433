"""Payment cards: parsing the contract's card JSON, Luhn, brand, expiry, masking.

Written here rather than taken from a library: the rules are a page long (CONTRACT.md section 2),
the maintained Python packages for them either pull in far more (schemas, locales) or lag the
current IIN tables (Mastercard's 2-series), and the hot path wants no extra allocation.

A ``Card`` holds the PAN and CVV in private slots; its ``repr`` and ``str`` never show them. The
only view of a card that may leave the process is ``Card.view()`` (the contract's ``CARD``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from json.encoder import encode_basestring
from typing import Any, Final

from cardseal._encoding import loads_strict
from cardseal.errors import CardError, RequestError

MAX_CARD_JSON_BYTES: Final = 1024
_CARD_FIELDS: Final = frozenset({"card_number", "expiry_date", "cvv", "cardholder_name"})
# Card JSON exactly as ``Card.to_json`` writes it without a name: valid JSON whose strings hold
# only digits and "/", so it means what ``loads_strict`` would make of it; anything else
# (another layout, a name, escapes) goes through the parser.
_CANONICAL_CARD: Final = re.compile(
    rb'\{"card_number":"([0-9]{12,19})","cvv":"([0-9]{3,4})","expiry_date":"([0-9]{2})/([0-9]{4})"\}')
_MAX_NAME_CHARS: Final = 128
_DIGITS: Final = frozenset("0123456789")
MIN_MASKED_DIGITS: Final = 5
"""Digits a masked PAN always hides: with its Luhn digit checked and its brand known (which
may fix one more digit), 10^3 candidates at least, where BIN and last four left ten."""


@dataclass(frozen=True, slots=True)
class _Brand:
    name: str
    lengths: frozenset[int]
    cvv_length: int


_VISA = _Brand("visa", frozenset({13, 16, 19}), 3)
_MASTERCARD = _Brand("mastercard", frozenset({16}), 3)
_AMEX = _Brand("amex", frozenset({15}), 4)
_DISCOVER = _Brand("discover", frozenset(range(16, 20)), 3)
_JCB = _Brand("jcb", frozenset(range(16, 20)), 3)
_DINERS = _Brand("diners", frozenset(range(14, 20)), 3)
_UNIONPAY = _Brand("unionpay", frozenset(range(16, 20)), 3)
_MAESTRO = _Brand("maestro", frozenset(range(12, 20)), 3)

# (prefix length, low, high, brand), most specific first: the first match wins.
_IIN_RANGES: Final[tuple[tuple[int, int, int, _Brand], ...]] = (
    (6, 622126, 622925, _DISCOVER),  # Discover co-branded range inside UnionPay's 62
    (4, 6011, 6011, _DISCOVER),
    (4, 5018, 5018, _MAESTRO),
    (4, 5020, 5020, _MAESTRO),
    (4, 5038, 5038, _MAESTRO),
    (4, 5893, 5893, _MAESTRO),
    (4, 6304, 6304, _MAESTRO),
    (4, 6759, 6759, _MAESTRO),
    (4, 6761, 6763, _MAESTRO),
    (4, 2221, 2720, _MASTERCARD),
    (4, 3528, 3589, _JCB),
    (4, 3095, 3095, _DINERS),
    (3, 644, 649, _DISCOVER),
    (3, 300, 305, _DINERS),
    (2, 65, 65, _DISCOVER),
    (2, 62, 62, _UNIONPAY),
    (2, 51, 55, _MASTERCARD),
    (2, 34, 34, _AMEX),
    (2, 37, 37, _AMEX),
    (2, 36, 36, _DINERS),
    (2, 38, 39, _DINERS),
    (1, 4, 4, _VISA),
)


_SCALE: Final = {size: 10 ** (6 - size) for size in range(1, 7)}


# Each digit's Luhn contribution when doubled (2d, less 9 when over 9), as ASCII digits.
_LUHN_DOUBLED: Final = bytes.maketrans(b"0123456789", b"0246813579")


def mask_pan(pan: str) -> str:
    """``pan`` (digits) masked for display: BIN (first six) and last four, the rest ``*``
    (PCI DSS 3.4.1's most), with at least ``MIN_MASKED_DIGITS`` hidden, so a PAN under 15
    digits shows fewer leading ones."""
    lead = max(0, min(6, len(pan) - 4 - MIN_MASKED_DIGITS))
    return pan[:lead] + "*" * (len(pan) - lead - 4) + pan[-4:]


def luhn_valid(number: str) -> bool:
    """True when ``number`` is ASCII digits that pass the Luhn (mod 10) check."""
    if not (number.isascii() and number.isdigit()):
        return False
    return _luhn_digits(number.encode("ascii"))


def _luhn_digits(digits: bytes) -> bool:
    """The Luhn check of ASCII digits (the caller has checked that they are digits)."""
    kept = digits[-1::-2]
    doubled = digits[-2::-2].translate(_LUHN_DOUBLED)
    return (sum(kept) + sum(doubled) - 48 * len(digits)) % 10 == 0


@lru_cache(maxsize=4096)
def _brand_of(bin6: str) -> _Brand | None:
    """The brand of a card whose first six digits are ``bin6`` (cached: a BIN may be shown)."""
    six = int(bin6)
    for size, low, high, brand in _IIN_RANGES:
        if low <= six // _SCALE[size] <= high:
            return brand
    return None


def _brand_for(pan: str, digits: bytes) -> _Brand:
    """The brand of a PAN of 12-19 digits (``digits``: the same as ASCII), after the Luhn
    check and the brand's lengths; else the contract's card error."""
    if not _luhn_digits(digits):
        raise CardError(code="card_number_invalid")
    brand = _brand_of(pan[:6])
    if brand is None:
        raise CardError(code="card_brand_unsupported")
    if len(pan) not in brand.lengths:
        raise CardError(code="card_number_invalid")
    return brand


def _parse_expiry(text: str) -> tuple[int, int]:
    month_s, sep, year_s = text.partition("/")
    if (
        not sep
        or len(month_s) != 2
        or len(year_s) not in (2, 4)
        or not set(month_s + year_s) <= _DIGITS
    ):
        raise CardError("The card's expiry date is invalid.", code="card_expired")
    return int(month_s), int(year_s) + (2000 if len(year_s) == 2 else 0)


# The current month as year * 12 + month - 1, and the time.time() at which it ends.
_this_month: tuple[int, float] = (0, 0.0)


def _month_now() -> int:
    """The current UTC month as ``year * 12 + month - 1`` (computed once a month)."""
    global _this_month
    now = time.time()
    if now >= _this_month[1]:
        today = datetime.fromtimestamp(now, UTC)
        month = today.year * 12 + today.month - 1
        ends = datetime(month // 12 + (month % 12 == 11), (month + 1) % 12 + 1, 1, tzinfo=UTC)
        _this_month = (month, ends.timestamp())
    return _this_month[0]


def _check_expiry(month: int, year: int, now: datetime | None) -> None:
    """``card_expired`` for a month outside 1-12 or a card whose month has ended."""
    if not 1 <= month <= 12:
        raise CardError("The card's expiry date is invalid.", code="card_expired")
    current = _month_now() if now is None else now.year * 12 + now.month - 1
    if year * 12 + month - 1 < current:
        raise CardError(code="card_expired")


@dataclass(frozen=True, slots=True)
class CardView:
    """The contract's ``CARD``: the only view of a card that leaves the gateway."""

    brand: str
    last4: str
    masked: str
    exp_month: int
    exp_year: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "brand": self.brand,
            "last4": self.last4,
            "masked": self.masked,
            "exp_month": self.exp_month,
            "exp_year": self.exp_year,
            "fingerprint": self.fingerprint,
        }


class Card:
    """A validated payment card. Construct with ``Card.parse`` or ``Card.from_json``.

    Validation happens in the constructor: a ``Card`` that exists is Luhn-valid, of a known
    brand with a length and CVV length right for it, and not expired at ``now``.
    """

    __slots__ = ("_cvv", "_pan", "brand", "cardholder_name", "exp_month", "exp_year")

    def __init__(
        self,
        *,
        card_number: str,
        expiry_date: str,
        cvv: str,
        cardholder_name: str | None = None,
        now: datetime | None = None,
    ) -> None:
        pan = card_number.replace(" ", "").replace("-", "")
        if not pan or not set(pan) <= _DIGITS or not 12 <= len(pan) <= 19:
            raise CardError(code="card_number_invalid")
        brand = _brand_for(pan, pan.encode("ascii"))
        month, year = _parse_expiry(expiry_date)
        _check_expiry(month, year, now)
        if len(cvv) != brand.cvv_length or not set(cvv) <= _DIGITS:
            raise CardError(code="card_cvv_invalid")
        self._set(pan, cvv, brand, month, year, cardholder_name)

    def _set(self, pan: str, cvv: str, brand: _Brand, month: int, year: int,
             cardholder_name: str | None) -> None:
        self._pan = pan
        self._cvv = cvv
        self.brand = brand.name
        self.exp_month = month
        self.exp_year = year
        self.cardholder_name = cardholder_name

    @classmethod
    def _from_canonical(cls, number: bytes, cvv: bytes, month: bytes, year: bytes,
                        now: datetime | None) -> Card:
        """``__init__``'s checks, in its order, for fields ``_CANONICAL_CARD`` has already
        found to be digits of the right lengths (the card JSON of every cardseal client)."""
        pan = number.decode("ascii")
        brand = _brand_for(pan, number)
        month_n, year_n = int(month), int(year)
        _check_expiry(month_n, year_n, now)
        if len(cvv) != brand.cvv_length:
            raise CardError(code="card_cvv_invalid")
        card = cls.__new__(cls)
        card._set(pan, cvv.decode("ascii"), brand, month_n, year_n, None)
        return card

    @classmethod
    def parse(cls, value: object, *, now: datetime | None = None) -> Card:
        """Build a card from the contract's card JSON object (already decoded).

        Raises ``RequestError`` for a wrong shape (not an object, a missing or unknown field,
        a wrong type) and ``CardError`` with the contract code for a card that is not valid.
        """
        if not isinstance(value, dict) or not value.keys() <= _CARD_FIELDS:
            raise RequestError("The card must be an object with the contract's fields.")
        number = value.get("card_number")
        expiry = value.get("expiry_date")
        cvv = value.get("cvv")
        name = value.get("cardholder_name")
        if not (isinstance(number, str) and isinstance(expiry, str) and isinstance(cvv, str)):
            raise RequestError("card_number, expiry_date and cvv are required strings.")
        if name is not None and (not isinstance(name, str) or len(name) > _MAX_NAME_CHARS):
            raise RequestError("cardholder_name must be a string of at most 128 characters.")
        if len(number) > 32:
            raise CardError(code="card_number_invalid")
        return cls(card_number=number, expiry_date=expiry, cvv=cvv, cardholder_name=name, now=now)

    @classmethod
    def from_json(cls, data: bytes | str, *, now: datetime | None = None) -> Card:
        """Parse card JSON (at most ``MAX_CARD_JSON_BYTES``); see ``parse`` for the errors."""
        canonical = _CANONICAL_CARD.fullmatch(data) if isinstance(data, bytes) else None
        if canonical is not None:  # what ``to_json`` writes: no parser needed for these bytes
            number, cvv, month, year = canonical.groups()
            return cls._from_canonical(number, cvv, month, year, now)
        try:
            value = loads_strict(data, max_bytes=MAX_CARD_JSON_BYTES, max_depth=2)
        except ValueError as err:
            raise RequestError("The card is not valid JSON.") from err
        return cls.parse(value, now=now)

    @property
    def pan(self) -> str:
        """The full card number. Read it only to hand it to a processor."""
        return self._pan

    @property
    def cvv(self) -> str:
        """The card verification code. Read it only to hand it to a processor."""
        return self._cvv

    @property
    def last4(self) -> str:
        return self._pan[-4:]

    @property
    def masked(self) -> str:
        """``mask_pan``'s view: BIN and last four from 15 digits on, fewer leading digits
        below (a 12-digit Maestro shown as ``501800**0009`` would be one of ten numbers once
        its Luhn digit is checked: it is ``501*****0009``)."""
        return mask_pan(self._pan)

    def fingerprint(self, secret: bytes) -> str:
        """A keyed hash of the PAN (HMAC-SHA-256 under ``secret``), stable per secret."""
        digest = hmac.new(secret, self._pan.encode("ascii"), hashlib.sha256).digest()
        return "fp_" + digest[:16].hex()

    def view(self, fingerprint_secret: bytes) -> CardView:
        return CardView(
            brand=self.brand,
            last4=self.last4,
            masked=self.masked,
            exp_month=self.exp_month,
            exp_year=self.exp_year,
            fingerprint=self.fingerprint(fingerprint_secret),
        )

    def to_json(self) -> bytes:
        """The contract's card JSON (with PAN and CVV): the plaintext that gets sealed."""
        # dumps_compact's bytes (sorted keys), written out: PAN and CVV are digits by now.
        name = self.cardholder_name
        named = "" if name is None else ',"cardholder_name":' + encode_basestring(name)
        return (f'{{"card_number":"{self._pan}"{named},"cvv":"{self._cvv}",'
                f'"expiry_date":"{self.exp_month:02d}/{self.exp_year:04d}"}}').encode()

    def __repr__(self) -> str:
        return f"Card(brand={self.brand!r}, masked={self.masked!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # keep card data out of pickles (and so out of caches)
        raise TypeError("Card objects cannot be pickled")
