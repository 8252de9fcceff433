"""The payment gateway: ``create_app(settings)`` and ``serve``."""

from cardseal.gateway.app import create_app

__all__ = ["create_app"]
