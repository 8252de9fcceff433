"""Strict base64url, the lenient kms-direct base64, and bounded strict JSON."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardseal import _encoding
from cardseal._encoding import (
    MAX_JSON_DEPTH,
    b64_decode_lenient_alphabet,
    b64url_decode,
    b64url_encode,
    dumps_compact,
    loads_strict,
)

# -- strict base64url -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [*range(40), 480, 1000])
def test_b64url_round_trip(size: int) -> None:
    data = os.urandom(size)
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize(("text", "data"), [("", b""), ("QQ", b"A"), ("QUI", b"AB"),
                                            ("QUJD", b"ABC"), ("-_8", b"\xfb\xff")])
def test_b64url_known_answers(text: str, data: bytes) -> None:
    assert b64url_decode(text) == data


@pytest.mark.parametrize(
    "text",
    [
        "QQ==", "QUI=", "QQ=", "=",  # padding
        "QQ\n", " QQ", "Q Q", "QQ\t", "QUJD\r\n",  # whitespace
        "+_8", "-/8", "QQ!", "QQ.", "\uff31", "QQ\x00",  # characters outside the alphabet
        "Q", "QUJDR", "QUJDRUZHS",  # length % 4 == 1
        "QR", "QZ", "QUJ", "QUL", "-_9",  # non-zero unused trailing bits
    ],
)
@pytest.mark.parametrize("prefix", ["", "AAAA" * 64], ids=["short", "long"])
def test_b64url_rejects(text: str, prefix: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode(prefix + text)


def test_b64url_has_one_encoding_per_byte_string() -> None:
    # Every 2-character string decodes to at most one byte string; only 1 in 16 is canonical.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    decoded = {}
    for a in alphabet:
        for b in alphabet:
            try:
                decoded[a + b] = b64url_decode(a + b)
            except ValueError:
                continue
    assert len(decoded) == 256
    assert len(set(decoded.values())) == 256


# -- lenient kms-direct base64 ----------------------------------------------------------------

BLOB = bytes(range(256)) + b"\xfb\xff\xfe"


@pytest.mark.parametrize(
    "encode",
    [
        base64.b64encode,
        base64.urlsafe_b64encode,
        lambda b: base64.b64encode(b).rstrip(b"="),
        lambda b: base64.urlsafe_b64encode(b).rstrip(b"="),
    ],
    ids=["std", "urlsafe", "std-unpadded", "urlsafe-unpadded"],
)
@pytest.mark.parametrize("size", [1, 2, 3, 4, 100, len(BLOB)])
def test_lenient_accepts_std_and_urlsafe_padding_optional(encode: object, size: int) -> None:
    data = BLOB[-size:]
    text = encode(data).decode()  # type: ignore[operator]
    assert b64_decode_lenient_alphabet(text) == data


def test_lenient_known_answers() -> None:
    assert b64_decode_lenient_alphabet("+/8=") == b"\xfb\xff"
    assert b64_decode_lenient_alphabet("-_8") == b"\xfb\xff"
    assert b64_decode_lenient_alphabet("") == b""


@pytest.mark.parametrize(
    "text",
    [
        "+_8=", "-/8", "+/-_",  # mixed alphabets
        "QQ=", "QQ===", "QUJD=", "=", "==", "Q=Q=", "=QQ",  # misplaced or wrong padding
        "Q", "QUJDR", "Q===",  # impossible lengths
        "QQ==\n", " QQ==", "QU JD", "QQ\t",  # whitespace
        "QQ!", "QQ.", "\uff31",  # other characters
    ],
)
def test_lenient_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="base64"):
        b64_decode_lenient_alphabet(text)


# -- loads_strict -----------------------------------------------------------------------------


def test_loads_strict_parses_ordinary_json() -> None:
    assert loads_strict(b'{"a": [1, 2.5, "x", null, true]}', max_bytes=100) == {
        "a": [1, 2.5, "x", None, True]
    }
    assert loads_strict('{"é": "ü"}', max_bytes=100) == {"é": "ü"}


def test_size_cap() -> None:
    data = b'{"a": "' + b"x" * 100 + b'"}'
    assert loads_strict(data, max_bytes=len(data)) == {"a": "x" * 100}
    with pytest.raises(ValueError, match="too large"):
        loads_strict(data, max_bytes=len(data) - 1)


def test_size_cap_counts_utf8_bytes_of_text() -> None:
    text = '"' + "€" * 10 + '"'  # 12 characters, 32 bytes
    assert loads_strict(text, max_bytes=32) == "€" * 10
    with pytest.raises(ValueError, match="too large"):
        loads_strict(text, max_bytes=12)


def test_depth_cap() -> None:
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_strict(ok, max_bytes=1000) is not None
    too_deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(ValueError, match="deeply"):
        loads_strict(too_deep, max_bytes=1000)
    with pytest.raises(ValueError, match="deeply"):
        loads_strict('{"a": {"b": 1}}', max_bytes=1000, max_depth=1)
    with pytest.raises(ValueError, match="deeply"):
        loads_strict("[" * 100_000, max_bytes=200_000)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    text = '{"a": "[[[[{{{{\\"[[[["}'
    assert loads_strict(text, max_bytes=1000, max_depth=1) == {"a": '[[[[{{{{"[[[['}
    assert loads_strict('[{"a": 1}, {"b": [2]}]', max_bytes=1000, max_depth=3) is not None


@pytest.mark.parametrize(
    "text", ['{"a": 1, "a": 1}', '{"a": 1, "b": {"c": 1, "c": 2}}', '[{"x": 0, "x": 0}]',
             '{"a":1,"a":1}', '{"a":1,"b":{"c":1,"c":2}}', '[{"x":0,"x":0}]',  # compact
             '{"iss":"x","aud":"y","iss":"x"}', '{"a":{},"a":{}}']
)
def test_duplicate_members(text: str) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        loads_strict(text, max_bytes=1000)


# -- the orjson fast path: equal to the standard parser, or not taken ----------------------------

_JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=12,
)


def _standard(raw: bytes, max_depth: int) -> Any:
    try:
        return ("ok", _encoding._loads_standard(raw, max_depth))
    except (ValueError, RecursionError) as err:
        return ("error", type(err).__name__)


def _strict(raw: bytes, max_depth: int) -> Any:
    try:
        return ("ok", loads_strict(raw, max_bytes=10_000, max_depth=max_depth))
    except ValueError as err:
        return ("error", type(err).__name__)


@given(value=_JSON_VALUES, depth=st.integers(1, 8), how=st.sampled_from(["orjson", "json"]))
def test_the_fast_path_agrees_with_the_standard_parser(value: Any, depth: int, how: str) -> None:
    try:
        raw = (orjson.dumps(value) if how == "orjson"
               else json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, orjson.JSONEncodeError, UnicodeEncodeError):  # too big, surrogates
        return
    assert _strict(raw, depth) == _standard(raw, depth)


@given(text=st.text(alphabet='{}[]":,01-.eE\\ntrufalsu"ab ', max_size=40),
       depth=st.integers(1, 8))
def test_the_fast_path_never_accepts_what_the_standard_parser_refuses(text: str,
                                                                      depth: int) -> None:
    raw = text.encode()
    assert _strict(raw, depth) == _standard(raw, depth)


@pytest.mark.parametrize("raw", [
    b'{"a":1,"a":2}', b'{"a":{"b":1,"b":1}}', b'{"a":"\\ud800"}', b'{"a":"\\u0041"}',
    b'{"a":1.0e1}', b'{"a":-0}', b'{"a":' + b"9" * 21 + b"}", b'{"a":NaN}', b'{"a":1e400}',
    b'\xef\xbb\xbf{"a":1}', b'{"a":"\xff"}', b'{"a":[[[[[[[[[1]]]]]]]]]}',
])
def test_the_fast_path_leaves_every_doubtful_text_to_the_standard_parser(raw: bytes) -> None:
    assert _strict(raw, 8) == _standard(raw, 8)


def test_compact_json_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(raw: bytes, max_depth: int) -> Any:
        raise AssertionError("the standard parser was used")

    monkeypatch.setattr(_encoding, "_loads_standard", refuse)
    claims = b'{"iss":"a","aud":["b"],"iat":1,"exp":2,"jti":"j","payment":{"amount":5}}'
    assert loads_strict(claims, max_bytes=1000, max_depth=4)["payment"] == {"amount": 5}


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"a": NaN}', "[Infinity]"])
def test_nan_and_infinity(text: str) -> None:
    with pytest.raises(ValueError, match="NaN"):
        loads_strict(text, max_bytes=1000)


@pytest.mark.parametrize("text", ["1e400", "-1e400", '{"exp": 1E999}', "[1.5e309]"])
def test_float_overflow(text: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        loads_strict(text, max_bytes=1000)


def test_integer_size() -> None:
    assert loads_strict("9" * 20, max_bytes=100) == int("9" * 20)
    assert loads_strict("-" + "9" * 19, max_bytes=100) == -int("9" * 19)
    for text in ("1" * 21, "-" + "9" * 20, "[" + "7" * 5000 + "]"):
        with pytest.raises(ValueError, match="out of range"):
            loads_strict(text, max_bytes=10_000)


@pytest.mark.parametrize(
    "data",
    [
        b'"\xff"',  # invalid UTF-8
        b'{"a": "\xc3"}',  # truncated sequence
        b'"\xed\xa0\x80"',  # encoded surrogate
        '{"a": 1}'.encode("utf-16"),
        '{"a": 1}'.encode("utf-16-le"),
        '{"a": 1}'.encode("utf-32"),
        b'\xef\xbb\xbf{"a": 1}',  # UTF-8 byte-order mark
    ],
    ids=["ff", "truncated", "surrogate", "utf16", "utf16le", "utf32", "bom"],
)
def test_only_strict_utf8_without_bom(data: bytes) -> None:
    with pytest.raises(ValueError):
        loads_strict(data, max_bytes=1000)


@pytest.mark.parametrize("text", ['\ufeff{"a": 1}', '"\ud800"'], ids=["bom", "lone-surrogate"])
def test_text_that_is_not_utf8_encodable_or_has_a_bom(text: str) -> None:
    with pytest.raises(ValueError):
        loads_strict(text, max_bytes=1000)


@pytest.mark.parametrize("text", ["", " ", "{", '{"a": 1} x', "'a'", "[1,]", '{"a" 1}'])
def test_invalid_json(text: str) -> None:
    with pytest.raises(ValueError):
        loads_strict(text, max_bytes=1000)


def test_errors_never_echo_the_input() -> None:
    secret = "4242424242424242"
    for text in ('{"pan": "' + secret + '", "pan": 1}', '{"pan": "' + secret + '" x}'):
        with pytest.raises(ValueError) as excinfo:
            loads_strict(text, max_bytes=1000)
        assert secret not in str(excinfo.value)


def test_dumps_compact_is_sorted_and_compact() -> None:
    assert dumps_compact({"b": 1, "a": [1, 2], "é": "x"}) == '{"a":[1,2],"b":1,"é":"x"}'.encode()
