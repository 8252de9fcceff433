"""Payment processors behind one interface; the sandbox is the embedded default."""

from cardseal.processor.base import ChargeRequest, ChargeResult, PaymentProcessor
from cardseal.processor.sandbox import SandboxProcessor

__all__ = ["ChargeRequest", "ChargeResult", "PaymentProcessor", "SandboxProcessor"]
