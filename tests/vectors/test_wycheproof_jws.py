"""Wycheproof JWS and JWK vectors against cardseal's verifier.

Each token goes through what ``TokenVerifier.verify`` does before it reads a claim:
``jws.parse_compact``; the algorithm allow-list (here all of ``jws.ALGORITHMS``, the widest an
issuer may configure); then ``TokenVerifier._select_key``: the key by ``kid``, the JWK's ``alg``
honoured, the key type fitting the algorithm, ``jws.verify_signature``. Keys are the group's
public JWK (its private one when it has no public one: symmetric keys) loaded through
``VerificationKeySet.from_jwks``, which honours ``use`` and ``key_ops`` and refuses symmetric and
private keys ("keys_refused" below: nothing can verify).

Every vector applies. "Valid" vectors that cardseal refuses, by design:

=============================  =====  =======  ======================  =====================
file                           tests  applied  result                  count, reason
=============================  =====  =======  ======================  =====================
json_web_signature_test.json   401    401      invalid: rejected       355 / 355
                                               valid: accepted         32 / 46
                                               valid: refused, no HMAC 10 (tcId 1, 348, 352,
                                                                       357-359, 372, 373,
                                                                       376, 377): HS256
                                               valid: refused, JWK alg 4 (346, 350: key alg
                                                                       PS256, token PS384;
                                                                       347, 351: key alg
                                                                       "ES521", token ES512)
json_web_key_test.json         26     26       invalid: rejected       21 / 21
                                               valid: accepted         1 / 5
                                               valid: refused, no HMAC 4 (2, 13, 14, 15)
=============================  =====  =======  ======================  =====================

Refusal codes of the invalid vectors: signatures 295 token_signature_invalid, 36
token_malformed (missing parts, whitespace, bad characters, non-canonical base64url, JSON
serialization), 18 token_algorithm_not_allowed (none, HS256 key confusion), 6 token_key_unknown
(modified kid, use=enc / key_ops without verify); keys 13 token_algorithm_not_allowed, 4
keys_refused, 2 token_key_unknown, 2 token_signature_invalid (the ROCA and the 1024-bit key).

Vectors 372 and 373 are marked valid although a '?' sits inside the header / payload: they check
that a lenient base64 decoder which skips junk still MACs the bytes as sent. They are HS256, and
cardseal has no HMAC (its verifiers hold public keys only), so it refuses them; its strict
base64url refuses the '?' even before the algorithm is read (token_malformed). Likewise, invalid
vectors 367 and 370 ("invalidBase64Padding...") are byte for byte the valid 357: the padding
their names promise is not in the file, so a verifier that accepts 357 must "fail" them; cardseal
refuses all three (HS256).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import pytest

from cardseal import jws
from cardseal.errors import ConfigError, TokenError
from cardseal.keys.jwk import VerificationKey, VerificationKeySet
from cardseal.tokens import IssuerPolicy, TokenVerifier

SIGNATURES: Final = "json_web_signature_test.json"
KEYS: Final = "json_web_key_test.json"
HMAC_VALID: Final = {
    SIGNATURES: {1, 348, 352, 357, 358, 359, 372, 373, 376, 377},
    KEYS: {2, 13, 14, 15},
}
# Valid by Wycheproof; refused because the JWK's own alg names another algorithm.
KEY_ALG_MISMATCH: Final = {SIGNATURES: {346, 347, 350, 351}, KEYS: set[int]()}


def load(directory: Path, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / name).read_text())
    return document


def cases(document: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for group in document["testGroups"]:
        for test in group["tests"]:
            yield group, test


def group_jwk(group: Mapping[str, Any]) -> dict[str, Any]:
    jwk: dict[str, Any] = group.get("public") or group["private"]
    return jwk


def load_keys(jwk: Mapping[str, Any]) -> VerificationKeySet | None:
    """The key (set) as cardseal loads it; None when cardseal refuses it."""
    try:
        return VerificationKeySet.from_jwks(dict(jwk) if "keys" in jwk else {"keys": [jwk]})
    except ConfigError:
        return None


def verdict(token: object, keys: VerificationKeySet | None) -> str:
    """"accepted", or the contract code (or "keys_refused") the token is refused with."""
    if not isinstance(token, str):  # JSON serialization: cardseal reads compact only
        token = json.dumps(token)
    try:
        parsed = jws.parse_compact(token)
        if parsed.header["alg"] not in jws.ALGORITHMS:
            return "token_algorithm_not_allowed"
        if keys is None:
            return "keys_refused"
        policy = IssuerPolicy(iss="wycheproof", audience="wycheproof", keys=keys,
                              allowed_kms_keys=("local://unused",), algorithms=jws.ALGORITHMS)
        key = TokenVerifier(issuers=[policy])._select_key(parsed, policy)
    except TokenError as err:
        return err.code
    return "accepted" if key is not None else "token_signature_invalid"


def run_file(directory: Path, name: str) -> tuple[Counter[str], Counter[str]]:
    """Assert every vector's outcome; return (tally by outcome, refusal codes of invalids)."""
    document = load(directory, name)
    tally: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    for group, test in cases(document):
        result = verdict(test["jws"], load_keys(group_jwk(group)))
        tc = test["tcId"]
        assert test["result"] in ("valid", "invalid"), tc  # no "acceptable" in these files
        if test["result"] == "invalid":
            assert result != "accepted", tc
            tally["invalid rejected"] += 1
            codes[result] += 1
        elif tc in HMAC_VALID[name]:
            assert result in ("token_algorithm_not_allowed", "token_malformed"), tc
            tally["valid, no HMAC"] += 1
        elif tc in KEY_ALG_MISMATCH[name]:
            assert result == "token_algorithm_not_allowed", tc
            tally["valid, JWK alg differs"] += 1
        else:
            assert result == "accepted", (tc, result)
            tally["valid accepted"] += 1
    assert sum(tally.values()) == document["numberOfTests"]
    return tally, codes


def test_json_web_signature_vectors(wycheproof_dir: Path) -> None:
    tally, codes = run_file(wycheproof_dir, SIGNATURES)
    assert tally == {"invalid rejected": 355, "valid accepted": 32, "valid, no HMAC": 10,
                     "valid, JWK alg differs": 4}
    assert codes == {"token_signature_invalid": 295, "token_malformed": 36,
                     "token_algorithm_not_allowed": 18, "token_key_unknown": 6}


def test_json_web_key_vectors(wycheproof_dir: Path) -> None:
    tally, codes = run_file(wycheproof_dir, KEYS)
    assert tally == {"invalid rejected": 21, "valid accepted": 1, "valid, no HMAC": 4}
    assert codes == {"token_algorithm_not_allowed": 13, "keys_refused": 4,
                     "token_key_unknown": 2, "token_signature_invalid": 2}


def lenient_alg(token: object) -> str | None:
    """The header's alg as a forgiving reader sees it (to find the HMAC vectors)."""
    try:
        head = str(token).split(".")[0].strip().rstrip("#?")
        return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["alg"])
    except (ValueError, KeyError, TypeError):
        return None


@pytest.mark.parametrize(("name", "expected"), [(SIGNATURES, 34), (KEYS, 15)])
def test_hmac_tokens_are_refused_even_with_a_usable_key(
    wycheproof_dir: Path, name: str, expected: int
) -> None:
    document = load(wycheproof_dir, name)
    usable = [k for g, _ in cases(document) if (k := load_keys(group_jwk(g))) is not None]
    keys = [key.key for key_set in usable for key in key_set]
    refused = malformed = 0
    for group, test in cases(document):
        alg = lenient_alg(test["jws"])
        if alg is None or not alg.startswith("HS"):
            continue
        refused += 1
        assert alg not in jws.ALGORITHMS
        for jwk in group_jwk(group).get("keys", [group_jwk(group)]):
            if jwk.get("kty") == "oct":
                with pytest.raises(ConfigError):
                    VerificationKey.from_jwk(jwk)
        with pytest.raises(ConfigError):  # no issuer can even be configured for it
            IssuerPolicy(iss="i", audience="a", keys=usable[0], allowed_kms_keys=("local://k",),
                         algorithms=frozenset({alg}))
        try:
            parsed = jws.parse_compact(test["jws"])
        except TokenError as err:  # whitespace, '?', '#', bad padding: refused even earlier
            assert err.code == "token_malformed"
            malformed += 1
            continue
        assert not any(jws.verify_signature(parsed, key, alg) for key in keys)
    assert refused == expected
    assert malformed == {SIGNATURES: 18, KEYS: 0}[name]


def test_vectors_372_373_are_hmac_with_a_stray_character(wycheproof_dir: Path) -> None:
    tests = {t["tcId"]: t for _, t in cases(load(wycheproof_dir, SIGNATURES))}
    for tc in (372, 373):
        token = tests[tc]["jws"]
        assert tests[tc]["result"] == "valid" and "?" in token
        assert verdict(token.replace("?", ""), None) == "token_algorithm_not_allowed"
        with pytest.raises(TokenError) as excinfo:
            jws.parse_compact(token)
        assert excinfo.value.code == "token_malformed"


def test_keys_not_for_verification_verify_nothing(wycheproof_dir: Path) -> None:
    """use=enc or key_ops without "verify": from_jwk refuses the key, from_jwks skips it; the
    very same key with those members removed accepts the same token (so that is the reason)."""
    checked = 0
    for name in (SIGNATURES, KEYS):
        for group, test in cases(load(wycheproof_dir, name)):
            public = group.get("public", {})
            (jwk,) = public.get("keys", [public])
            if jwk.get("use", "sig") == "sig" and "verify" in jwk.get("key_ops", ["verify"]):
                continue
            with pytest.raises(ConfigError):
                VerificationKey.from_jwk(jwk)
            assert len(load_keys(jwk) or ()) == 0
            assert verdict(test["jws"], load_keys(jwk)) == "token_key_unknown"
            bare = {k: v for k, v in jwk.items() if k not in ("use", "key_ops", "alg")}
            assert verdict(test["jws"], load_keys(bare)) == "accepted"
            checked += 1
    assert checked == 6  # tcId 353-356 of the signatures, 6 and 21 of the keys


def test_key_alg_mismatch_is_the_only_reason(wycheproof_dir: Path) -> None:
    """Without the JWK's alg the RFC 7520 PS384 and ES512 signatures verify."""
    for group, test in cases(load(wycheproof_dir, SIGNATURES)):
        if test["tcId"] in KEY_ALG_MISMATCH[SIGNATURES]:
            bare = {k: v for k, v in group["public"].items() if k != "alg"}
            assert verdict(test["jws"], load_keys(bare)) == "accepted", test["tcId"]
