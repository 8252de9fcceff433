"""Request and response bodies of the HTTP API (CONTRACT.md section 5), for parsing and OpenAPI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from cardseal.jws import MAX_TOKEN_BYTES
from cardseal.tokens import MAX_REFERENCE_CHARS


class PaymentRequest(BaseModel):
    """``POST /v1/payments``. ``amount``/``currency`` may be omitted when the token carries a
    ``payment`` claim; when both are given they must agree."""

    model_config = ConfigDict(extra="forbid", strict=True)
    token: StrictStr = Field(min_length=1, max_length=MAX_TOKEN_BYTES)
    amount: StrictInt | None = Field(default=None, gt=0, le=10**12)
    currency: StrictStr | None = Field(default=None, min_length=3, max_length=3,
                                       pattern=r"^[A-Za-z]{3}$")
    reference: StrictStr | None = Field(default=None, max_length=MAX_REFERENCE_CHARS)


class CardOut(BaseModel):
    brand: str
    last4: str
    masked: str
    exp_month: int
    exp_year: int
    fingerprint: str


class PaymentOut(BaseModel):
    id: str
    status: Literal["authorized", "declined"]
    amount: int
    currency: str
    reference: str | None
    card: CardOut
    issuer: str
    created_at: str = Field(description="RFC 3339 UTC timestamp")
    decline_code: str | None = None


class ErrorDetail(BaseModel):
    code: str = Field(description="The contract's error code")
    message: str
    decline_code: str | None = Field(default=None, description="Only for payment_declined")
    payment_id: str | None = Field(default=None, description="Only for payment_declined")


class ErrorBody(BaseModel):
    error: ErrorDetail


class HealthOut(BaseModel):
    status: str
    checks: dict[str, str] = {}
