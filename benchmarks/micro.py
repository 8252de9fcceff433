"""Micro-benchmarks: seal/s and open/s next to the raw cryptography they rest on, same run.

Each row is measured ``--runs`` times; the table shows the median rate, the spread (min-max of
the runs) and the ratio of medians to the baseline measured in the same process seconds
earlier. Run through ``make bench`` or ``python benchmarks/micro.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cardseal import jws
from cardseal.testing import LocalSetup, sample_card


@dataclass
class Row:
    name: str
    rates: list[float]
    baseline: Row | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def line(self) -> str:
        spread = f"{min(self.rates):>9,.0f}-{max(self.rates):<9,.0f}"
        ratio = f"{self.median / self.baseline.median:6.2f}x" if self.baseline else "  base"
        return f"{self.name:<50} {self.median:>10,.0f}/s  [{spread}]  {ratio}"


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after a short warm-up)."""
    for _ in range(20):
        fn()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def measure(name: str, fn: Callable[[], object], runs: int, seconds: float,
            baseline: Row | None = None) -> Row:
    row = Row(name, [rate(fn, seconds) for _ in range(runs)], baseline)
    print(row.line(), flush=True)
    return row


def bench_alg(alg: str, runs: int, seconds: float) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        setup = LocalSetup.create(tmp, alg=alg)
        card = sample_card()
        token = setup.sealer.seal(card)
        parsed = jws.parse_compact(token)
        private = setup.signer._key  # the same key object, for the raw floor
        public = setup.signer.public_key
        message = parsed.signing_input

        if isinstance(private, rsa.RSAPrivateKey):
            def raw_sign() -> object:
                return private.sign(message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(private, ec.EllipticCurvePrivateKey):
            def raw_sign() -> object:
                return private.sign(message, ec.ECDSA(hashes.SHA256()))
        else:
            def raw_sign() -> object:
                return private.sign(message)

        aead = AESGCM(os.urandom(32))
        iv = os.urandom(12)
        plaintext = card.to_json()
        aad = b"x" * 120
        sealed = aead.encrypt(iv, plaintext, aad)

        if isinstance(public, rsa.RSAPublicKey):
            def raw_verify() -> None:
                public.verify(parsed.signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(int.from_bytes(parsed.signature[:32], "big"),
                                       int.from_bytes(parsed.signature[32:], "big"))

            def raw_verify() -> None:
                public.verify(der, message, ec.ECDSA(hashes.SHA256()))
        else:
            def raw_verify() -> None:
                public.verify(parsed.signature, message)

        def raw_verify_decrypt() -> object:
            raw_verify()
            return aead.decrypt(iv, sealed, aad)

        def open_token() -> object:
            return setup.opener.open_card(setup.verifier.verify(token))

        sign_floor = measure(f"raw {alg} sign (cryptography)", raw_sign, runs, seconds)
        seal = measure(f"cardseal seal {alg} (envelope)", lambda: setup.sealer.seal(card),
                       runs, seconds, sign_floor)
        open_floor = measure(f"raw {alg} verify + AES-GCM decrypt", raw_verify_decrypt,
                             runs, seconds)
        opened = measure(f"cardseal open {alg} (verify+unwrap+decrypt+card)", open_token,
                         runs, seconds, open_floor)
        calls = setup.providers.calls
        print(f"{'':<50} KMS calls for all of the above: {dict(calls)}")
        return [sign_floor, seal, open_floor, opened]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(f"cardseal micro-benchmarks: {args.runs} runs x {args.seconds}s per row, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{'row':<50} {'median':>12}  [{'spread (min-max)':^19}]  ratio")
    for alg in ("RS256", "ES256"):
        bench_alg(alg, args.runs, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
