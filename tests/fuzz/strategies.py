"""Hypothesis strategies for the fuzz tests: random input, and structured mutations of valid
tokens, ``meta_data`` and request bodies (flipped characters, spliced parts, changed header
members and claims), plus the oracle every target shares.
"""

from __future__ import annotations

import base64
import json
import string
from typing import Any

from hypothesis import strategies as st

from cardseal._encoding import b64url_decode, b64url_encode
from cardseal.errors import ALL_CODES, CardsealError

B64URL = string.ascii_letters + string.digits + "-_"
# Characters a parser may trip on: separators, padding, the other base64 alphabet, JSON syntax,
# whitespace, controls, non-ASCII (including a lone surrogate and a byte-order mark).
NASTY = ".=+/ \t\r\n\x00\"'\\{}[]:,-_\u00e9\u2028\ufeff\ud800\U0001f4b3"
INTERESTING_ALGS = ["RS256", "PS256", "ES256", "EdDSA", "none", "None", "HS256", "RS512",
                    "ES512", "", "rs256", "RS256 "]
INTERESTING_NUMBERS = [0, -1, 1, 2**31, 2**53, 2**63, 10**21, 10**400, 1.5, -0.0, 1e308]

json_scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(INTERESTING_NUMBERS)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def dumps(value: Any) -> str:
    """JSON as an attacker may write it: NaN, Infinity and huge numbers included."""
    return json.dumps(value, allow_nan=True)


@st.composite
def mutated_text(draw: st.DrawFn, base: str, *, alphabet: str = B64URL + NASTY) -> str:
    """``base`` after 1-4 edits: replace, insert, delete, duplicate, truncate."""
    text = base
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "duplicate", "truncate"]))
        at = draw(st.integers(0, max(len(text) - 1, 0)))
        if op == "replace" and text:
            text = text[:at] + draw(st.sampled_from(alphabet)) + text[at + 1:]
        elif op == "insert":
            text = text[:at] + draw(st.text(alphabet=alphabet, min_size=1, max_size=8)) + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 16)):]
        elif op == "duplicate":
            text = text[:at] + text[at:at + draw(st.integers(1, 64))] + text[at:]
        else:
            text = text[:at]
    return text


@st.composite
def flipped_part(draw: st.DrawFn, base: str) -> str:
    """One base64url part of a dot-separated string decoded, a bit flipped, encoded again: the
    result is still canonical base64url, so the parser gets past the charset checks."""
    parts = base.split(".")
    index = draw(st.integers(0, len(parts) - 1))
    try:
        raw = bytearray(b64url_decode(parts[index]))
    except ValueError:
        return base
    if raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] ^= 1 << draw(st.integers(0, 7))
    parts[index] = b64url_encode(bytes(raw))
    return ".".join(parts)


@st.composite
def spliced(draw: st.DrawFn, a: str, b: str) -> str:
    """Parts of ``a`` and ``b`` mixed, position by position, or one part repeated/dropped."""
    pa, pb = a.split("."), b.split(".")
    mode = draw(st.sampled_from(["mix", "drop", "repeat"]))
    if mode == "mix":
        return ".".join(draw(st.sampled_from([x, y])) for x, y in zip(pa, pb, strict=False))
    at = draw(st.integers(0, len(pa) - 1))
    if mode == "drop":
        return ".".join(pa[:at] + pa[at + 1:])
    return ".".join(pa[:at + 1] + pa[at:])


@st.composite
def changed_members(draw: st.DrawFn, base: dict[str, Any], names: list[str],
                    interesting: dict[str, list[Any]]) -> dict[str, Any]:
    """``base`` with 1-3 members set to interesting or random JSON values, or removed, and
    sometimes an unexpected member added."""
    value = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        action = draw(st.sampled_from(["interesting", "random", "drop"]))
        if action == "drop":
            value.pop(name, None)
        elif action == "interesting" and interesting.get(name):
            value[name] = draw(st.sampled_from(interesting[name]))
        else:
            value[name] = draw(json_values)
    return value


def b64_std(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def assert_contract_error(err: CardsealError, secrets: list[str]) -> None:
    """The oracle of the parsers: a cardseal error with a contract code, a client's fault
    (4xx) or a dependency's (503), whose message quotes none of the input."""
    assert err.code in ALL_CODES
    assert 400 <= err.http_status < 500 or err.http_status == 503, err.code
    assert err.http_status != 500
    for secret in secrets:
        for piece in secret.split("."):
            if len(piece) >= 12:
                assert piece not in err.message, "an error message quotes the input"
