"""The ``PaymentProcessor`` interface: what a real processor adapter implements.

``charge`` is called with the decrypted card inside the gateway's charge step and must not
keep it. ``payment_id`` is the idempotency key for the processor: a retry of the same token
reuses it, so a processor that honours idempotency never charges twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from cardseal.card import Card


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    payment_id: str
    amount: int
    currency: str
    reference: str | None
    card: Card = field(repr=False)


@dataclass(frozen=True, slots=True)
class ChargeResult:
    status: Literal["authorized", "declined"]
    processor_ref: str
    decline_code: str | None = None


class PaymentProcessor(ABC):
    """Charges cards. Raise ``ProcessorError`` (processor_unavailable) when the outcome is
    unknown or the processor cannot be reached; return a declined result for a refusal.

    ``charge`` of a ``blocking`` processor (the default: a real one calls its API over the
    network) runs in a thread of its own, bounded by the gateway's ``processor.timeout``. A
    processor that answers from memory at once (the sandbox) sets ``blocking = False`` and is
    called directly, without the thread hop.
    """

    blocking: ClassVar[bool] = True

    @abstractmethod
    def charge(self, request: ChargeRequest) -> ChargeResult: ...
