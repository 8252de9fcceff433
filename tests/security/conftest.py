"""Fixtures of the security suite: shared local setups, a token forge, and the HTTPS gateway.

Library-level attacks run against ``cardseal.testing.LocalSetup`` objects built once per session
(one per signing algorithm) with a fixed clock, so that every forged token differs from a genuine
one only in what the test changes. HTTP-level attacks reuse the gateway suite's fixtures (a real
``cardseal serve`` over HTTPS): they are imported from ``tests/gateway/conftest.py``, unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from cardseal import jws
from cardseal._encoding import b64url_encode
from cardseal.card import Card
from cardseal.errors import CardsealError
from cardseal.testing import SAMPLE_PANS, LocalSetup, sample_card_json
from cardseal.tokens import TokenVerifier, VerifiedToken

# The gateway suite's fixtures, re-exported so that pytest finds them for tests/security.
from tests.gateway.conftest import (  # noqa: F401
    client,
    database_url,
    gateway,
    leak_registry,
    replay_store,
)

T = 1_750_000_000
"""The fixed clock of every library-level setup (cards expire in 2099, so that is fine)."""

CARD = Card.from_json(sample_card_json(SAMPLE_PANS["visa"]))


class Forge:
    """Genuine tokens of one ``LocalSetup``, and forgeries that change one thing at a time."""

    def __init__(self, setup: LocalSetup) -> None:
        self.setup = setup

    def genuine(self) -> str:
        return self.setup.sealer.seal(CARD)

    def parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The header and claims of a freshly sealed token."""
        parsed = jws.parse_compact(self.genuine())
        return dict(parsed.header), json.loads(parsed.payload)

    def token(
        self,
        *,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
        drop_header: Iterable[str] = (),
        drop_claims: Iterable[str] = (),
        sign: Callable[[bytes], bytes] | None = None,
    ) -> str:
        """A freshly sealed token with members replaced or dropped, signed again by the setup's
        key unless ``sign`` is given."""
        head, body = self.parts()
        head.update(header or {})
        body.update(claims or {})
        for name in drop_header:
            head.pop(name, None)
        for name in drop_claims:
            body.pop(name, None)
        return jws.encode_compact(head, json.dumps(body).encode(), sign or self.setup.signer.sign)

    def raw(self, header: bytes, payload: bytes, sign: Callable[[bytes], bytes] | None = None
            ) -> str:
        """A token whose header and payload are exactly these bytes, validly signed."""
        signing_input = b64url_encode(header) + "." + b64url_encode(payload)
        signature = (sign or self.setup.signer.sign)(signing_input.encode("ascii"))
        return signing_input + "." + b64url_encode(signature)

    def raw_claims(self, payload: bytes) -> str:
        """A token with the setup's genuine header and exactly these claim bytes."""
        head, _ = self.parts()
        return self.raw(json.dumps(head).encode(), payload)

    def with_meta_data(self, meta_data: str, **claims: Any) -> str:
        return self.token(claims={"meta_data": meta_data, **claims})


def _setup(tmp_path_factory: pytest.TempPathFactory, alg: str) -> LocalSetup:
    return LocalSetup.create(tmp_path_factory.mktemp(f"setup-{alg}"), alg=alg, now=lambda: T)


@pytest.fixture(scope="session")
def rs256(tmp_path_factory: pytest.TempPathFactory) -> LocalSetup:
    return _setup(tmp_path_factory, "RS256")


@pytest.fixture(scope="session")
def es256(tmp_path_factory: pytest.TempPathFactory) -> LocalSetup:
    return _setup(tmp_path_factory, "ES256")


@pytest.fixture(scope="session")
def eddsa(tmp_path_factory: pytest.TempPathFactory) -> LocalSetup:
    return _setup(tmp_path_factory, "EdDSA")


@pytest.fixture
def forge(rs256: LocalSetup) -> Forge:
    return Forge(rs256)


@pytest.fixture
def fresh(tmp_path: Path) -> LocalSetup:
    """A setup of its own (RS256), for tests that count KMS calls or change key material."""
    return LocalSetup.create(tmp_path, now=lambda: T)


def refused(verifier: TokenVerifier, token: str | bytes, code: str) -> CardsealError:
    """Assert ``verify(token)`` refuses with exactly ``code``; return the error."""
    with pytest.raises(CardsealError) as excinfo:
        verifier.verify(token)
    assert excinfo.value.code == code, (excinfo.value.code, excinfo.value.message)
    return excinfo.value


def refused_open(setup: LocalSetup, token: str, code: str) -> CardsealError:
    """Assert the token verifies, and that opening its card refuses with exactly ``code``."""
    verified: VerifiedToken = setup.verifier.verify(token)
    with pytest.raises(CardsealError) as excinfo:
        setup.opener.open_card(verified)
    assert excinfo.value.code == code, (excinfo.value.code, excinfo.value.message)
    return excinfo.value
