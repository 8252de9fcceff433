"""The sandbox processor (CONTRACT.md section 6): approves every valid card except Stripe's
test decline numbers, and honours the payment id as an idempotency key."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from typing import Final

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
_REMEMBERED: Final = 100_000


class SandboxProcessor(PaymentProcessor):
    def __init__(self) -> None:
        self._results: OrderedDict[str, ChargeResult] = OrderedDict()
        self._lock = threading.Lock()

    def charge(self, request: ChargeRequest) -> ChargeResult:
        with self._lock:
            known = self._results.get(request.payment_id)
            if known is not None:
                return known
            decline = DECLINES.get(request.card.pan)
            result = ChargeResult(
                status="declined" if decline else "authorized",
                processor_ref="sbx_" + secrets.token_hex(8),
                decline_code=decline,
            )
            self._results[request.payment_id] = result
            if len(self._results) > _REMEMBERED:
                self._results.popitem(last=False)
            return result
