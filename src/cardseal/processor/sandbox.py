"""The sandbox processor (CONTRACT.md section 6): approves every valid card except Stripe's
test decline numbers, and honours the payment id as an idempotency key.

It is idempotent by construction and keeps nothing: the answer is a function of the card (the
decline table) and of the payment id (the reference is a hash of it), so a retry under the same
payment id gets the same answer, on any worker, after a restart, however long after.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, Final

from cardseal.processor.base import ChargeRequest, ChargeResult, PaymentProcessor

DECLINES: Final[dict[str, str]] = {
    "4000000000000002": "generic_decline",
    "4000000000009995": "insufficient_funds",
    "4000000000009987": "lost_card",
    "4000000000009979": "stolen_card",
    "4000000000000069": "expired_card",
    "4000000000000127": "incorrect_cvc",
    "4000000000000119": "processing_error",
}


class SandboxProcessor(PaymentProcessor):
    blocking: ClassVar[bool] = False  # a table lookup and a hash: no I/O

    def charge(self, request: ChargeRequest) -> ChargeResult:
        decline = DECLINES.get(request.card.pan)
        # The payment id is random (96 bits) and no secret: its hash is a stable reference.
        digest = hashlib.sha256(request.payment_id.encode()).hexdigest()[:16]
        return ChargeResult(
            status="declined" if decline else "authorized",
            processor_ref="sbx_" + digest,
            decline_code=decline,
        )
