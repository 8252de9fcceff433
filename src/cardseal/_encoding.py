"""Strict base64url and bounded JSON, shared by the token and envelope parsers.

Both functions raise ``ValueError`` on any deviation; callers turn that into their own contract
code. Nothing here echoes its input in an error message.

Both sit on the token hot path, so each leans on a C library, used only where its result is
proven equal to the strict one: ``pybase64`` decodes base64url after this module has ruled out
every text it would read more leniently than RFC 7515 (padding, the standard alphabet's ``+``
and ``/``, non-zero unused bits), and ``orjson`` parses JSON whose bytes it gives back exactly
when it serializes the result (which rules out duplicate members, escapes and every other form
the strict parser would judge differently); other JSON goes to the standard library's parser
with the checks below.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Final

import orjson
import pybase64

_B64_STD_OR_URL: Final = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
# Index of each base64url character, to check that unused trailing bits are zero.
_B64URL_INDEX: Final = {
    c: i
    for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}

_STD_TO_URL: Final = bytes.maketrans(b"+/", b"-_")
# pybase64.b64decode(text, altchars, validate): SIMD, and a tenth of a microsecond a call when
# given its arguments by position; binascii with the translation it needs takes 0.16 us for
# an IV and 1.4 us for a claim set of 480 bytes, pybase64 0.13 and 0.21.
_pybase64_decode: Final = pybase64.b64decode
_PADDING: Final = ("", "", "==", "=")  # by length % 4
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)

MAX_JSON_DEPTH: Final = 8
"""Deepest nesting of objects and arrays accepted in a header, claim set or card."""


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return binascii.b2a_base64(data, newline=False).translate(_STD_TO_URL).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url (RFC 7515 section 2) in its one canonical form.

    Rejects padding, whitespace, any other character, an impossible length and non-zero unused
    bits in the last character (so that exactly one string encodes each byte string).
    """
    # pybase64 with altchars "-_" would also take "+", "/" and padding: refused first;
    # validate=True refuses any other byte outside the alphabet (whitespace, non-ASCII).
    if "=" in text or "+" in text or "/" in text:
        raise ValueError("not base64url")
    rem = len(text) % 4
    if rem:
        if rem == 1:
            raise ValueError("impossible base64url length")
        last = _B64URL_INDEX.get(text[-1])
        if last is None or last & (0x0F if rem == 2 else 0x03):
            raise ValueError("non-canonical base64url")
    try:  # positional arguments: keywords double the cost of the call
        return _pybase64_decode(text + _PADDING[rem], b"-_", True)
    except ValueError:  # binascii.Error is one
        raise ValueError("not base64url") from None


def b64_decode_lenient_alphabet(text: str) -> bytes:
    """Decode standard base64 whose padding is optional and whose alphabet may be url-safe.

    This is the ``kms-direct`` ``meta_data`` format: the seed's client base64-encodes a KMS
    ``CiphertextBlob``. Mixed alphabets, whitespace and misplaced padding are rejected.
    """
    if not _B64_STD_OR_URL.fullmatch(text):
        raise ValueError("not base64")
    body = text.rstrip("=")
    urlsafe = "-" in body or "_" in body
    if urlsafe and ("+" in body or "/" in body):
        raise ValueError("mixed base64 alphabets")
    if len(text) != len(body) and len(text) % 4:
        raise ValueError("bad base64 padding")
    if urlsafe:
        body = body.replace("-", "+").replace("_", "/")
    rem = len(body) % 4
    if rem == 1:
        raise ValueError("impossible base64 length")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error as err:
        raise ValueError("not base64") from err


def _reject_constant(_name: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate JSON member")
    return result


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _parse_int(text: str) -> int:
    if len(text) > 20:  # well past any timestamp or amount; blocks giant-integer work
        raise ValueError("number out of range")
    return int(text)


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_constant=_reject_constant,
    parse_float=_parse_float,
    parse_int=_parse_int,
)


def _depth_within(text: str, limit: int) -> bool:
    """True when no object/array nesting in ``text`` goes deeper than ``limit``.

    The fast path counts brackets in C: fewer brackets than the limit cannot nest deeper.
    """
    if text.count("{") + text.count("[") <= limit:
        return True
    depth = 0
    in_string = False
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            if depth > limit:
                return False
        elif ch in "}]":
            depth -= 1
    return True


def loads_strict(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON from strict UTF-8 with size, depth and duplicate-member limits.

    Rejects: more than ``max_bytes``, invalid UTF-8 (and so UTF-16/32), a byte-order mark,
    nesting deeper than ``max_depth``, duplicate object members, NaN/Infinity, numbers that
    overflow a float, integers of more than 20 digits, ``\\uD800``-style escapes of unpaired
    surrogates (RFC 7493 section 2.1: no database, log or UTF-8 encoder can hold them).
    """
    if len(data) > max_bytes:  # cheap first: a str has at most as many characters as bytes
        raise ValueError("JSON too large")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ValueError("JSON too large")
    # The fast path: ``raw`` is exactly orjson's own compact serialization of what orjson
    # reads in it (members in document order). orjson keeps the last of duplicate members and
    # reads any escape; bytes it writes back unchanged have neither duplicates (the value would
    # be shorter), nor an escape it would not write, nor a lone surrogate (it refuses to write
    # one), nor NaN, nor a number in other than its shortest form, nor an integer past 64
    # bits: one strict JSON text, whose value the standard parser below would give too. It
    # spares that parser (~5x slower) for claim sets written compactly, as cardseal's and most
    # JWT libraries write them. More brackets than the depth allows: the slow path decides.
    if raw.count(b"{") + raw.count(b"[") <= max_depth:
        try:
            value = orjson.loads(raw)
            if orjson.dumps(value) == raw:
                return value
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            pass
    return _loads_standard(raw, max_depth)


def _loads_standard(raw: bytes, max_depth: int) -> Any:
    """``loads_strict`` by the standard library's parser and the checks around it."""
    text = raw.decode("utf-8")
    if not _depth_within(text, max_depth):
        raise ValueError("JSON nested too deeply")
    try:
        value = _DECODER.decode(text)
    except RecursionError as err:  # pragma: no cover - the depth check comes first
        raise ValueError("JSON nested too deeply") from err
    if "\\u" in text:  # strict UTF-8 text holds no surrogate: only an escape can make one
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("unpaired surrogate in a JSON string") from None
    return value


def dumps_compact(value: Any) -> bytes:
    """Compact, sorted-key JSON as UTF-8 bytes (deterministic, for signing and AAD)."""
    return _COMPACT.encode(value).encode()
