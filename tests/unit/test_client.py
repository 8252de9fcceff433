"""The sealing side's token bytes: the header and claim set as the JSON encoder writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cardseal import jws
from cardseal._encoding import b64url_decode
from cardseal.testing import LocalSetup, sample_card
from cardseal.tokens import TOKEN_TYPE, Payment


@pytest.mark.parametrize("payment", [None, Payment(amount=1999, currency="EUR"),
                                     Payment(amount=5, currency="USD", reference='r"\u00e9\\')])
@pytest.mark.parametrize("format", ["envelope", "kms-direct"])
def test_claims_and_header_are_the_encoders_bytes(
    tmp_path: Path, format: str, payment: Payment | None
) -> None:
    setup = LocalSetup.create(tmp_path, format=format)
    parsed = jws.parse_compact(setup.sealer.seal(sample_card(), payment=payment))
    claims = json.loads(parsed.payload)
    assert parsed.payload == json.dumps(claims, separators=(",", ":")).encode()
    assert list(claims)[:6] == ["iss", "aud", "iat", "exp", "jti", "meta_data"]
    assert claims["exp"] - claims["iat"] == 300
    assert ("payment" in claims) == (payment is not None)
    header = json.loads(b64url_decode(parsed.signing_input.split(b".")[0].decode()))
    assert header == {"alg": "RS256", "kid": setup.signer.kid, "typ": TOKEN_TYPE}
    if format == "envelope":
        protected = json.loads(b64url_decode(claims["meta_data"].split(".")[0]))
        assert protected == {"alg": "kms", "enc": "A256GCM", "kid": "local://main",
                             "jti": claims["jti"]}
    verified = setup.verifier.verify(setup.sealer.seal(sample_card(), payment=payment))
    assert setup.opener.open_card(verified).to_json() == sample_card().to_json()
