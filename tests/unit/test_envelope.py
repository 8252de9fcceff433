"""``meta_data`` sealing and opening: the envelope JWE and data-key reuse."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardseal._encoding import b64url_decode, b64url_encode, dumps_compact, loads_strict
from cardseal.envelope import (
    MAX_REUSE_AGE,
    MAX_REUSE_USES,
    DataKeyReuse,
    EnvelopeOpener,
    EnvelopeSealer,
    _canonical_kid,
    _parsed_kid,
    envelope_context,
)
from cardseal.errors import ConfigError, DecryptionError, KeyProviderError
from cardseal.keys.base import KeyProviders
from cardseal.keys.local import LocalKeyProvider, create_keyring

MAIN = "local://main"
OTHER = "local://other"
ISS, AUD, JTI = "payment-service", "payment-gateway", "jti-0123456789abcdef"
CARD = b'{"card_number":"4242424242424242","cvv":"123","expiry_date":"12/2099"}'


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def providers(tmp_path: Path) -> KeyProviders:
    create_keyring(tmp_path / "keyring.json", ["main", "other"])
    return KeyProviders(LocalKeyProvider.from_file(tmp_path / "keyring.json"))


@pytest.fixture
def sealer(providers: KeyProviders) -> EnvelopeSealer:
    return EnvelopeSealer(providers=providers, key_uri=MAIN)


@pytest.fixture
def opener(providers: KeyProviders) -> EnvelopeOpener:
    return EnvelopeOpener(providers=providers)


def open_code(opener: EnvelopeOpener, meta_data: str, *, jti: str = JTI,
              allowed: tuple[str, ...] = (MAIN,), iss: str = ISS, aud: str = AUD) -> str:
    with pytest.raises(DecryptionError) as excinfo:
        opener.open(meta_data, allowed_keys=allowed, iss=iss, aud=aud, jti=jti)
    return excinfo.value.code


def with_part(meta_data: str, index: int, part: str) -> str:
    parts = meta_data.split(".")
    parts[index] = part
    return ".".join(parts)


def with_header(meta_data: str, change: Callable[[dict[str, object]], object]) -> str:
    header = json.loads(b64url_decode(meta_data.split(".")[0]))
    change(header)
    return with_part(meta_data, 0, b64url_encode(json.dumps(header).encode()))


def flip(part: str) -> str:
    raw = bytearray(b64url_decode(part))
    raw[0] ^= 1
    return b64url_encode(bytes(raw))


# -- round trip -------------------------------------------------------------------------------


def test_round_trip_and_layout(sealer: EnvelopeSealer, opener: EnvelopeOpener) -> None:
    meta_data = sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI)
    protected, wrapped, iv, ciphertext, tag = meta_data.split(".")
    assert json.loads(b64url_decode(protected)) == {
        "alg": "kms", "enc": "A256GCM", "kid": MAIN, "jti": JTI}
    assert len(b64url_decode(iv)) == 12
    assert len(b64url_decode(tag)) == 16
    assert len(b64url_decode(ciphertext)) == len(CARD)
    assert b"4242" not in b64url_decode(ciphertext) + b64url_decode(wrapped)
    assert opener.open(meta_data, allowed_keys=(MAIN,), iss=ISS, aud=AUD, jti=JTI) == CARD


def test_wrapped_key_is_under_the_iss_aud_context(
    sealer: EnvelopeSealer, providers: KeyProviders
) -> None:
    wrapped = b64url_decode(sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI).split(".")[1])
    assert len(providers.decrypt(MAIN, wrapped, envelope_context(ISS, AUD))) == 32
    with pytest.raises(DecryptionError) as excinfo:
        providers.decrypt(MAIN, wrapped, None)
    assert excinfo.value.code == "decryption_failed"


def test_other_issuer_or_audience_cannot_open(
    sealer: EnvelopeSealer, opener: EnvelopeOpener
) -> None:
    meta_data = sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI)
    assert open_code(opener, meta_data, iss="someone-else") == "decryption_failed"
    assert open_code(opener, meta_data, aud="another-gateway") == "decryption_failed"


# -- data-key reuse on the sealing side ---------------------------------------------------------


def test_reuse_by_count(providers: KeyProviders, opener: EnvelopeOpener) -> None:
    sealer = EnvelopeSealer(providers=providers, key_uri=MAIN, reuse=DataKeyReuse(max_uses=3))
    sealed = [sealer.seal(CARD, iss=ISS, aud=AUD, jti=f"{JTI}{i}") for i in range(7)]
    assert providers.calls["generate_data_key"] == 3
    wrapped = [m.split(".")[1] for m in sealed]
    assert len(set(wrapped[0:3])) == len(set(wrapped[3:6])) == 1
    assert len(set(wrapped)) == 3
    for i, meta_data in enumerate(sealed):
        assert opener.open(meta_data, allowed_keys=(MAIN,), iss=ISS, aud=AUD,
                           jti=f"{JTI}{i}") == CARD
    assert len({m.split(".")[2] for m in sealed}) == 7  # a fresh IV every time


def test_reuse_by_age(providers: KeyProviders) -> None:
    clock = FakeClock()
    sealer = EnvelopeSealer(providers=providers, key_uri=MAIN,
                            reuse=DataKeyReuse(max_uses=1000, max_age=60), clock=clock)
    sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI)
    clock.now += 59.9
    sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI)
    assert providers.calls["generate_data_key"] == 1
    clock.now += 0.1
    sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI)
    assert providers.calls["generate_data_key"] == 2
    sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI)
    assert providers.calls["generate_data_key"] == 2


def test_one_data_key_per_context(providers: KeyProviders) -> None:
    sealer = EnvelopeSealer(providers=providers, key_uri=MAIN)
    for aud in ("a", "b", "a", "b"):
        sealer.seal(CARD, iss=ISS, aud=aud, jti=JTI)
    assert providers.calls["generate_data_key"] == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"max_uses": 0}, {"max_uses": -1}, {"max_uses": MAX_REUSE_USES + 1},
     {"max_age": 0}, {"max_age": -5}, {"max_age": MAX_REUSE_AGE + 1}],
)
def test_reuse_bounds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        DataKeyReuse(**kwargs)  # type: ignore[arg-type]
    assert excinfo.value.code == "config_invalid"


def test_reuse_limits_themselves_are_allowed() -> None:
    assert DataKeyReuse(max_uses=1, max_age=MAX_REUSE_AGE).max_uses == 1
    assert DataKeyReuse(max_uses=MAX_REUSE_USES).max_uses == MAX_REUSE_USES


def test_sealer_checks_the_key_scheme_eagerly(providers: KeyProviders) -> None:
    with pytest.raises(ConfigError) as excinfo:
        EnvelopeSealer(providers=providers, key_uri="aws-kms://alias/x")
    assert excinfo.value.code == "config_invalid"


@pytest.mark.parametrize("kwargs", [{"cache_size": -1}, {"cache_size": 100_001},
                                    {"cache_ttl": 0}, {"cache_ttl": 3601}])
def test_opener_cache_bounds(providers: KeyProviders, kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        EnvelopeOpener(providers=providers, **kwargs)  # type: ignore[arg-type]
    assert excinfo.value.code == "config_invalid"


# -- the five parts -----------------------------------------------------------------------------


@pytest.fixture
def meta_data(sealer: EnvelopeSealer) -> str:
    return sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI)


def _malformed(m: str) -> list[str]:
    parts = m.split(".")
    twelve, sixteen = b64url_encode(b"\0" * 12), b64url_encode(b"\0" * 16)
    return [
        "", ".".join(parts[:4]), m + ".", m + ".x", m.replace(".", "", 1),
        with_part(m, 0, parts[0] + "="), with_part(m, 2, parts[2] + "\n"),
        with_part(m, 3, parts[3] + "!"), with_part(m, 1, ""), with_part(m, 1, parts[1] + "A"),
        with_part(m, 0, b64url_encode(b"[1]")), with_part(m, 0, b64url_encode(b"not json")),
        with_part(m, 0, b64url_encode(b'{"alg":"kms","alg":"kms"}')),
        with_header(m, lambda h: h.update(zip="DEF")),
        with_header(m, lambda h: h.pop("jti")),
        with_header(m, lambda h: h.pop("kid")),
        with_header(m, lambda h: h.update(alg="dir")),
        with_header(m, lambda h: h.update(alg="RSA-OAEP")),
        with_header(m, lambda h: h.update(enc="A128GCM")),
        with_header(m, lambda h: h.update(kid=["local://main"])),
        with_header(m, lambda h: h.update(jti=7)),
        with_part(m, 2, b64url_encode(b"\0" * 16)), with_part(m, 2, b64url_encode(b"\0" * 11)),
        with_part(m, 4, twelve), with_part(m, 4, b64url_encode(b"\0" * 17)),
        with_part(m, 2, sixteen), with_part(m, 3, "A" * 3000),
        with_part(m, 1, b64url_encode(b"\0" * 1025)), "A" * 9000,
    ]


def test_malformed_parts(meta_data: str, opener: EnvelopeOpener,
                         providers: KeyProviders) -> None:
    for bad in _malformed(meta_data):
        assert open_code(opener, bad) == "meta_data_malformed", bad[:80]
    assert providers.calls["decrypt"] == 0


@pytest.mark.parametrize("kid", [OTHER, "local://nope", "aws-kms://alias/main", "main", ""])
def test_header_kid_not_allowed_never_calls_the_kms(
    meta_data: str, opener: EnvelopeOpener, providers: KeyProviders, kid: str
) -> None:
    moved = with_header(meta_data, lambda h: h.update(kid=kid))
    assert open_code(opener, moved) == "kms_key_not_allowed"
    assert providers.calls["decrypt"] == 0


def test_sealed_under_a_key_not_allowed(providers: KeyProviders, opener: EnvelopeOpener) -> None:
    other = EnvelopeSealer(providers=providers, key_uri=OTHER).seal(CARD, iss=ISS, aud=AUD,
                                                                     jti=JTI)
    assert open_code(opener, other) == "kms_key_not_allowed"
    assert providers.calls["decrypt"] == 0
    assert opener.open(other, allowed_keys=(MAIN, OTHER), iss=ISS, aud=AUD, jti=JTI) == CARD


def test_kid_claiming_main_over_a_key_wrapped_by_other(
    providers: KeyProviders, opener: EnvelopeOpener
) -> None:
    other = EnvelopeSealer(providers=providers, key_uri=OTHER).seal(CARD, iss=ISS, aud=AUD,
                                                                     jti=JTI)
    relabelled = with_header(other, lambda h: h.update(kid=MAIN))
    assert open_code(opener, relabelled) == "kms_key_not_allowed"


def test_meta_data_moved_to_another_token(meta_data: str, opener: EnvelopeOpener,
                                          providers: KeyProviders) -> None:
    assert open_code(opener, meta_data, jti=JTI + "x") == "decryption_failed"
    assert providers.calls["decrypt"] == 0


@pytest.mark.parametrize("index", [1, 2, 3, 4])
def test_tampered_parts(meta_data: str, opener: EnvelopeOpener, index: int) -> None:
    parts = meta_data.split(".")
    assert open_code(opener, with_part(meta_data, index, flip(parts[index]))) == (
        "decryption_failed")


def test_tampered_protected_header(meta_data: str, opener: EnvelopeOpener) -> None:
    # Same members and values, other bytes: the AAD is the encoded header, so it fails.
    reencoded = with_header(meta_data, lambda h: None)
    assert reencoded.split(".")[0] != meta_data.split(".")[0]
    assert open_code(opener, reencoded) == "decryption_failed"


def test_truncated_or_extended_ciphertext(meta_data: str, opener: EnvelopeOpener) -> None:
    ct = b64url_decode(meta_data.split(".")[3])
    for bad in (ct[:-1], ct + b"\0", b""):
        assert open_code(opener, with_part(meta_data, 3, b64url_encode(bad))) == (
            "decryption_failed")


def test_all_decrypt_failures_share_one_message(meta_data: str, opener: EnvelopeOpener) -> None:
    messages = set()
    for bad in (with_part(meta_data, 4, flip(meta_data.split(".")[4])),
                with_part(meta_data, 1, flip(meta_data.split(".")[1]))):
        with pytest.raises(DecryptionError) as excinfo:
            opener.open(bad, allowed_keys=(MAIN,), iss=ISS, aud=AUD, jti=JTI)
        messages.add(excinfo.value.message)
    with pytest.raises(DecryptionError) as excinfo:
        opener.open(meta_data, allowed_keys=(MAIN,), iss=ISS, aud=AUD, jti="other-jti-12345678")
    messages.add(excinfo.value.message)
    assert len(messages) == 1


class SlowKeyring(LocalKeyProvider):
    """The local keyring with a KMS's round trip (and, on demand, its outage)."""

    delay = 0.2
    down = False

    def decrypt(self, key_uri: str, ciphertext: bytes,
                context: Mapping[str, str] | None) -> bytes:
        time.sleep(self.delay)
        if self.down:
            raise KeyProviderError()
        return super().decrypt(key_uri, ciphertext, context)


@pytest.mark.parametrize("down", [False, True])
def test_concurrent_misses_of_one_data_key_make_one_decrypt(tmp_path: Path, down: bool) -> None:
    create_keyring(tmp_path / "keyring.json", ["main"])
    keyring = SlowKeyring.from_file(tmp_path / "keyring.json")
    assert isinstance(keyring, SlowKeyring)
    providers = KeyProviders(keyring)
    meta_data = EnvelopeSealer(providers=providers, key_uri=MAIN).seal(
        CARD, iss=ISS, aud=AUD, jti=JTI)
    opener = EnvelopeOpener(providers=providers)
    keyring.down = down
    start = threading.Barrier(8)

    def open_one() -> bytes | str:
        start.wait()
        try:
            return opener.open(meta_data, allowed_keys=(MAIN,), iss=ISS, aud=AUD, jti=JTI)
        except KeyProviderError as err:
            return err.code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: open_one(), range(8)))
    assert results == (["kms_unavailable"] * 8 if down else [CARD] * 8)  # the leader's outcome
    assert providers.calls["decrypt"] == 1  # one KMS call for eight requests
    keyring.down = False  # a failure is not cached: the next request tries again
    assert opener.open(meta_data, allowed_keys=(MAIN,), iss=ISS, aud=AUD, jti=JTI) == CARD
    assert providers.calls["decrypt"] == (2 if down else 1)


@given(kid=st.text(max_size=60) | st.text(min_size=400, max_size=500),
       jti=st.text(max_size=40), other=st.text(max_size=40))
def test_the_canonical_header_shortcut_agrees_with_the_strict_parser(
    kid: str, jti: str, other: str
) -> None:
    try:
        protected = dumps_compact({"alg": "kms", "enc": "A256GCM", "kid": kid, "jti": jti})
        loads_strict(protected, max_bytes=1024, max_depth=1)
    except (ValueError, UnicodeEncodeError):  # lone surrogates: not a header anyone can send
        return
    # Every header the sealer writes takes the shortcut, to the key the strict parser names;
    # one over the size limit takes neither.
    if len(protected) <= 512:
        assert _canonical_kid(protected, jti, ("local://x", kid)) == kid
        assert _parsed_kid(KeyProviders(), protected, jti, (kid,), False) == kid
    else:
        assert _canonical_kid(protected, jti, (kid,)) is None
    if other != jti:
        assert _canonical_kid(protected, other, (kid,)) is None  # another token's: parsed
    if other != kid:
        assert _canonical_kid(protected, jti, (other,)) is None  # a key not allowed: parsed


@given(jti=st.text(max_size=20), kid=st.text(max_size=20), cut=st.integers(0, 40),
       insert=st.binary(max_size=4), rest=st.binary(max_size=60), data=st.booleans())
def test_the_canonical_header_shortcut_never_accepts_what_the_parser_refuses(
    jti: str, kid: str, cut: int, insert: bytes, rest: bytes, data: bool
) -> None:
    # The sealer's header for (jti, kid) with bytes inserted somewhere in its end, or a head
    # followed by arbitrary bytes: whatever the shortcut accepts, the parser accepts alike.
    try:
        head = b'{"alg":"kms","enc":"A256GCM","jti":' + json.dumps(jti).encode()
        tail = (',"kid":' + json.dumps(kid, ensure_ascii=False) + "}").encode()
    except UnicodeEncodeError:
        return
    raw = head + (tail[:cut] + insert + tail[cut:] if data else rest)
    fast = _canonical_kid(raw, jti, ("local://x", kid))
    if fast is not None:
        assert _parsed_kid(KeyProviders(), raw, jti, ("local://x", kid), False) == fast


@pytest.mark.parametrize("jti", ["\ud800", "jti-\udfff-0123456789", "\ud83d"])
def test_a_jti_no_encoder_can_write_is_refused_not_raised(
    sealer: EnvelopeSealer, opener: EnvelopeOpener, jti: str
) -> None:
    # Found by fuzz/run.py: the shortcut encoded the jti before anything else, and a lone
    # surrogate (no verified token carries one, but open() takes any str) raised
    # UnicodeEncodeError out of open().
    meta_data = sealer.seal(CARD, iss=ISS, aud=AUD, jti=JTI)
    assert open_code(opener, meta_data, jti=jti) == "decryption_failed"
    assert _canonical_kid(b'{"alg":"kms"}', jti, (MAIN,)) is None
