"""A fast, structure-aware mutator for the long fuzz run (no coverage guidance, no deps).

Text edits (replace, insert, delete, duplicate, truncate, splice with another input), edits of
one base64url part of a dot-separated string (decoded, bits flipped, encoded again, so the
result stays canonical and reaches the next parser), and edits of one member of a JSON object
(set to an interesting or random value, removed, or an unexpected member added). Everything
is drawn from one seeded ``random.Random``: a run is reproducible from its seed.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import string
from collections.abc import Sequence
from typing import Any, Final

B64URL: Final = string.ascii_letters + string.digits + "-_"
NASTY: Final = ".=+/ \t\r\n\x00\"'\\{}[]:,-_\u00e9\u2028\ufeff\ud800\U0001f4b3"
ALPHABET: Final = B64URL + NASTY
INTERESTING: Final[list[Any]] = [
    None, True, False, 0, -1, 1, 2**31, 2**53, 2**63, 10**21, 10**400, 1.5, -0.0, 1e308,
    float("nan"), float("inf"), "", "a", "0", "null", "x" * 300, "\u00e9" * 20, "\ud800", [],
    {}, [None], {"": None}, "RS256", "none", "HS256", "USD", "usd",
]


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode_loose(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


class Mutator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - reproducible fuzzing, not secrets

    # -- values -------------------------------------------------------------------------------

    def junk(self, max_size: int = 64, alphabet: str = ALPHABET) -> str:
        return "".join(self.rng.choices(alphabet, k=self.rng.randint(0, max_size)))

    def value(self, depth: int = 0) -> Any:
        """An interesting scalar, a random string or number, or a small nested structure."""
        roll = self.rng.random()
        if roll < 0.45:
            return self.rng.choice(INTERESTING)
        if roll < 0.65:
            return self.junk(24)
        if roll < 0.8:
            return self.rng.randint(-(2**70), 2**70)
        if depth >= 3:
            return None
        if roll < 0.9:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        return {self.junk(6): self.value(depth + 1) for _ in range(self.rng.randint(0, 3))}

    # -- edits ----------------------------------------------------------------------------------

    def text(self, base: str, others: Sequence[str] = (), alphabet: str = ALPHABET) -> str:
        """``base`` after 1-4 text edits."""
        text = base
        rng = self.rng
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(7)
            at = rng.randint(0, max(len(text) - 1, 0))
            if op <= 1 and text:
                text = text[:at] + rng.choice(alphabet) + text[at + 1:]
            elif op == 2:
                text = text[:at] + self.junk(8, alphabet) + text[at:]
            elif op == 3:
                text = text[:at] + text[at + rng.randint(1, 16):]
            elif op == 4:
                text = text[:at] + text[at:at + rng.randint(1, 64)] + text[at:]
            elif op == 5:
                text = text[:at]
            elif others:
                other = rng.choice(others)
                cut = rng.randint(0, len(other))
                text = text[:at] + other[cut:]
        return text

    def flip_part(self, base: str) -> str:
        """One dot-separated base64url part decoded, 1-3 bits flipped, encoded again."""
        parts = base.split(".")
        index = self.rng.randrange(len(parts))
        raw = b64url_decode_loose(parts[index])
        if not raw:
            return self.text(base)
        data = bytearray(raw)
        for _ in range(self.rng.randint(1, 3)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        parts[index] = b64url_encode(bytes(data))
        return ".".join(parts)

    def splice(self, base: str, other: str) -> str:
        """Parts of two dot-separated strings mixed, or one part dropped or repeated."""
        pa, pb = base.split("."), other.split(".")
        mode = self.rng.randrange(3)
        if mode == 0:
            return ".".join(self.rng.choice((x, y)) for x, y in zip(pa, pb, strict=False))
        at = self.rng.randrange(len(pa))
        if mode == 1:
            return ".".join(pa[:at] + pa[at + 1:])
        return ".".join(pa[:at + 1] + pa[at:])

    def members(self, obj: dict[str, Any], names: Sequence[str],
                interesting: dict[str, list[Any]]) -> dict[str, Any]:
        """``obj`` with 1-3 members changed, removed or added."""
        value = dict(obj)
        for _ in range(self.rng.randint(1, 3)):
            name = self.rng.choice(names)
            roll = self.rng.random()
            if roll < 0.2:
                value.pop(name, None)
            elif roll < 0.65 and interesting.get(name):
                value[name] = self.rng.choice(interesting[name])
            elif roll < 0.9:
                value[name] = self.value()
            else:
                value[self.junk(8)] = self.value()
        return value

    def json_part(self, base: str, index: int, names: Sequence[str],
                  interesting: dict[str, list[Any]]) -> str:
        """Part ``index`` of a dot-separated string taken as base64url JSON, members changed,
        encoded again (the rest unchanged)."""
        parts = base.split(".")
        raw = b64url_decode_loose(parts[index]) if index < len(parts) else None
        try:
            obj = json.loads(raw) if raw else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return self.text(base)
        parts[index] = b64url_encode(dumps(self.members(obj, names, interesting)).encode(
            "utf-8", "surrogatepass"))
        return ".".join(parts)
