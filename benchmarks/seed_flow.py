"""The seed's reference flow (``shared/seed/000_20a51ebf4fec5c82.txt``), the baseline.

Written as the seed's author meant it to run, call for call:

client (``SeedClient.create_jwt``), per token
    1. ``kms_client.encrypt(KeyId=KMS_KEY_ID, Plaintext=json.dumps(card).encode())`` - one KMS
       call, no encryption context;
    2. the payload ``iss``, ``aud``, ``iat``, ``exp`` (+30 minutes) and ``meta_data``;
    3. ``private_key = open('private.pem').read()`` - the PEM re-read for every token;
    4. ``jwt.encode(payload, private_key, algorithm='RS256')`` - PyJWT parses the PEM string
       on every call.

server (``SeedServer.process_jwt``), per token
    1. ``jwt.decode(token, public_key, algorithms=['RS256'], audience='payment-gateway')``
       with ``public_key`` the PEM *string* read once at start, so PyJWT parses it per call;
    2. ``kms_client.decrypt(CiphertextBlob=...)`` - one KMS call, no ``KeyId``;
    3. ``json.loads`` of the plaintext; "proceed with payment processing logic".

Two things the seed's text cannot do as written, done the way it intends:
- ``meta_data`` is the ``CiphertextBlob`` as *bytes*, which no JSON encoder takes; it is
  standard base64 here (and decoded before Decrypt), the form CONTRACT.md calls the seed's
  ``kms-direct`` format.
- ``exp`` is ``datetime.utcnow() + 30 min`` turned into a timestamp, which ``timestamp()``
  reads as *local* time: off by the UTC offset (already expired east of UTC+0:30). Here it
  is now + 30 minutes in UTC, which is what the line means; the cost is the same.
The server's ``print`` of the decrypted card is left out (card data on stdout); the card is
returned instead.

``new_kms_client()`` is the seed's ``boto3.client('kms', region_name='us-east-1')``; the
emulator's endpoint comes from ``AWS_ENDPOINT_URL_KMS``, boto3's own variable.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import jwt
from cryptography.hazmat.primitives import serialization

ISSUER = "payment-service"
AUDIENCE = "payment-gateway"


def new_kms_client() -> Any:  # mypy_boto3_kms.KMSClient
    """``boto3.client('kms', region_name='us-east-1')``, as the seed writes it."""
    return boto3.client("kms", region_name="us-east-1")


class SeedClient:
    """Step 1 of the seed: encrypt with KMS, then build and sign the JWT."""

    def __init__(self, *, kms_client: Any, key_id: str, private_pem: Path) -> None:
        self.kms_client = kms_client
        self.key_id = key_id
        self.private_pem = private_pem

    def encrypt_credit_card_data(self, data: dict[str, str]) -> bytes:
        response = self.kms_client.encrypt(
            KeyId=self.key_id,
            Plaintext=json.dumps(data).encode("utf-8"),
        )
        blob: bytes = response["CiphertextBlob"]
        return blob

    def create_jwt(self, credit_card_data: dict[str, str]) -> str:
        encrypted_data = self.encrypt_credit_card_data(credit_card_data)
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": int(time.time()),
            "exp": int((datetime.now(UTC) + timedelta(minutes=30)).timestamp()),
            "meta_data": base64.b64encode(encrypted_data).decode("ascii"),
        }
        # Signing JWT with private key: the seed reads the PEM file for every token.
        return jwt.encode(payload, self.signing_key(), algorithm="RS256")

    def signing_key(self) -> Any:
        """``open('private.pem').read()``: PyJWT parses (and checks) the PEM every time."""
        with self.private_pem.open() as handle:
            return handle.read()


class PresealingSeedClient(SeedClient):
    """The seed's client with its RSA key parsed once, for making tokens outside the timed
    part (row 2's and row 4's pools, row 3's count). Its tokens are the seed's tokens, byte
    for byte in form, and cost the same KMS call; only the PEM parsing per token (about
    60 ms: ``cryptography`` checks an RSA private key when it loads it) is skipped."""

    def __init__(self, *, kms_client: Any, key_id: str, private_pem: Path) -> None:
        super().__init__(kms_client=kms_client, key_id=key_id, private_pem=private_pem)
        self._key = serialization.load_pem_private_key(private_pem.read_bytes(), None)

    def signing_key(self) -> Any:
        return self._key


class SeedServer:
    """Step 2 of the seed: verify the JWT, decrypt ``meta_data`` with KMS."""

    def __init__(self, *, kms_client: Any, public_pem: Path) -> None:
        self.kms_client = kms_client
        # Load public key for JWT signature verification: a PEM string, read once.
        with public_pem.open() as handle:
            self.public_key = handle.read()

    def decrypt_credit_card_data(self, encrypted_data: bytes) -> dict[str, Any]:
        response = self.kms_client.decrypt(CiphertextBlob=encrypted_data)
        decrypted_data = response["Plaintext"].decode("utf-8")
        card: dict[str, Any] = json.loads(decrypted_data)
        return card

    def process_jwt(self, jwt_token: str) -> dict[str, Any] | None:
        """The decrypted card, or None where the seed prints "JWT has expired." / "Invalid
        JWT." (a failed KMS call raises, as in the seed)."""
        try:
            decoded_jwt = jwt.decode(jwt_token, self.public_key, algorithms=["RS256"],
                                     audience=AUDIENCE)
            encrypted_meta_data = base64.b64decode(decoded_jwt["meta_data"])
            return self.decrypt_credit_card_data(encrypted_meta_data)
            # Proceed with payment processing logic...
        except jwt.ExpiredSignatureError:
            return None
        except jwt.InvalidTokenError:
            return None


SEED_CARD = {"card_number": "4111111111111111", "expiry_date": "12/29", "cvv": "123"}
"""The seed's dummy card (its expiry moved from 12/25 into the future)."""
