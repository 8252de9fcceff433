"""Rows 1-3: seal/s and open/s against the raw cryptography and the seed; KMS calls per token.

Rows 1 and 2 interleave their candidates: in repeat i every candidate runs for the same
time in alternating slices of ~20 ms (``interleaved_rates``), so that load from elsewhere on
the machine, which comes and goes within a second, hits them alike; each ratio is taken per
repeat (candidate i / baseline i) and shown as median [min-max].

- Row 1, seal: ``Sealer.seal`` (envelope; ``local://`` and ``aws-kms://`` on moto) against a
  raw ``cryptography`` signature by the same key over a signing input of the same size, and
  against the seed's client (KMS Encrypt per token, PEM re-read and parsed per token).
- Row 2, open: ``TokenVerifier.verify`` + ``CardOpener.open_card`` (data key from the cache,
  AES-GCM, card validation) against a raw verify of the same signature + AES-GCM decrypt of
  a same-size card under a same-size AAD (the floor), and against the seed's server.
- Row 3, KMS calls per 1,000 tokens at cardseal's defaults (``cardseal init``, ``aws-kms://``
  key) and for the seed, counted as HTTP requests to KMS by a botocore ``before-send`` hook on
  each side's own client (retries would count too), next to cardseal's own counter.

The seed's tokens that are only *made* here (row 2's pool, row 3's count) come from
``PresealingSeedClient``: the same tokens and KMS calls, without the ~60 ms PEM parse per
token that row 1 times.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.common import Progress, Rate, Spread, interleaved_rates, ratio_spread
from benchmarks.seed_flow import (
    SEED_CARD,
    PresealingSeedClient,
    SeedClient,
    SeedServer,
    new_kms_client,
)
from benchmarks.services import REGION, Home, Moto
from cardseal import jws
from cardseal._encoding import b64url_decode
from cardseal.client import Sealer
from cardseal.config import (
    AwsKmsSettings,
    build_issuer_policies,
    build_opener,
    build_providers,
    build_sealer,
    build_verifier,
    load_settings,
)
from cardseal.keys.aws_kms import AwsKmsKeyProvider
from cardseal.keys.base import KeyProviders
from cardseal.opener import CardOpener
from cardseal.testing import AUDIENCE, ISSUER, LocalSetup, sample_card
from cardseal.tokens import IssuerPolicy, TokenVerifier

_POOL = 1000  # distinct tokens cycled through by the open rows


@dataclass
class Findings:
    """Numbers the target check reads, by name (``cpu_`` ratios: per CPU-second)."""

    ratios: dict[str, Spread] = field(default_factory=dict)
    kms: dict[str, dict[str, int]] = field(default_factory=dict)


def _interleaved(candidates: list[tuple[str, Callable[[], object]]], repeats: int,
                 seconds: float, progress: Progress) -> dict[str, list[Rate]]:
    rates: dict[str, list[Rate]] = {name: [] for name, _ in candidates}
    for run in range(repeats):
        progress.tick(f"run {run + 1}/{repeats}: {', '.join(name for name, _ in candidates)}")
        measured = interleaved_rates([fn for _, fn in candidates], seconds)
        for (name, _), result in zip(candidates, measured, strict=True):
            rates[name].append(result)
    return rates


def _print(progress: Progress, rates: dict[str, list[Rate]], labels: dict[str, str],
           against: dict[str, str]) -> dict[str, Spread]:
    """One line per candidate: wall-clock rate median [min-max], CPU-time rate median, then
    the ratios to its baselines (against the raw floor: wall and CPU; against the seed,
    whose time is mostly spent waiting on KMS: wall only)."""
    ratios: dict[str, Spread] = {}
    for name, values in rates.items():
        wall = [r.wall for r in values]
        cpu = [r.cpu for r in values]
        line = (f"  {labels[name]:<58} {Spread.of(wall).fmt():>26}  "
                f"{Spread.of(cpu).median:>9,.0f}/cpu-s")
        for base in against.get(name, "").split(","):
            if base not in rates:
                continue
            ratio = ratio_spread(wall, [r.wall for r in rates[base]])
            ratios[f"{name}/{base}"] = ratio
            line += f"  {ratio.median:5.2f}x {base} [{ratio.low:.2f}-{ratio.high:.2f}]"
            if base != "seed":
                cost = ratio_spread(cpu, [r.cpu for r in rates[base]])
                ratios[f"cpu_{name}/{base}"] = cost
                line += f" cpu {cost.median:.2f}x"
        progress.emit(line)
    return ratios


def _header(progress: Progress, title: str, repeats: int, seconds: float) -> None:
    progress.emit(f"{title}, {repeats} runs x {seconds:g}s, interleaved in ~20 ms slices; "
                  "ratios per run, median [min-max]")
    progress.emit(f"  {'':<58} {'calls/s (wall)':>26}  {'calls/cpu-s':>15}  ratio")


def _aws_side(setup: LocalSetup, kms_uri: str, endpoint: str
              ) -> tuple[Sealer, TokenVerifier, CardOpener, KeyProviders]:
    """The setup's signing key with an ``aws-kms://`` key on the emulator instead."""
    providers = KeyProviders(AwsKmsKeyProvider.from_settings(
        AwsKmsSettings(region=REGION, endpoint_url=endpoint)))
    policy = IssuerPolicy(iss=ISSUER, audience=AUDIENCE, keys=setup.policy.keys,
                          allowed_kms_keys=(kms_uri,), algorithms=setup.policy.algorithms,
                          formats=setup.policy.formats)
    sealer = Sealer(signer=setup.signer, issuer=ISSUER, audience=AUDIENCE, kms_key=kms_uri,
                    providers=providers)
    opener = CardOpener(providers=providers, issuers=[policy])
    return sealer, TokenVerifier(issuers=[policy]), opener, providers


def _raw_sign(private: Any, message: bytes) -> Callable[[], object]:
    if isinstance(private, rsa.RSAPrivateKey):
        return lambda: private.sign(message, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return lambda: private.sign(message, ec.ECDSA(hashes.SHA256()))
    raise TypeError(type(private).__name__)


def _raw_verify_decrypt(public: Any, token: str) -> Callable[[], object]:
    """Verify the token's own signature, then AES-GCM-decrypt a card of the token's size
    under an AAD of its protected header's size: the least any open can cost."""
    parsed = jws.parse_compact(token)
    message, signature = parsed.signing_input, parsed.signature
    meta_data = json.loads(parsed.payload)["meta_data"]
    protected, _wrapped, _iv, ciphertext, _tag = meta_data.split(".")
    aead = AESGCM(os.urandom(32))
    iv = os.urandom(12)
    aad = protected.encode("ascii")
    sealed = aead.encrypt(iv, os.urandom(len(b64url_decode(ciphertext))), aad)
    if isinstance(public, rsa.RSAPublicKey):
        def verify() -> None:
            public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(public, ec.EllipticCurvePublicKey):
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                   int.from_bytes(signature[32:], "big"))

        def verify() -> None:
            public.verify(der, message, ec.ECDSA(hashes.SHA256()))
    else:
        raise TypeError(type(public).__name__)

    def floor() -> object:
        verify()
        return aead.decrypt(iv, sealed, aad)

    return floor


def _seed_pair(setup: LocalSetup, key_arn: str, directory: Path) -> tuple[SeedClient, SeedServer]:
    """The seed's client and server with the setup's RSA key as private.pem / public.pem."""
    private = setup.signer._key  # the same key object cardseal signs with
    private_pem = directory / "private.pem"
    private_pem.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    public_pem = directory / "public.pem"
    public_pem.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return (SeedClient(kms_client=new_kms_client(), key_id=key_arn, private_pem=private_pem),
            SeedServer(kms_client=new_kms_client(), public_pem=public_pem))


def _seed_tokens(client: SeedClient, count: int) -> list[str]:
    """``count`` seed tokens, made outside the timed part (``PresealingSeedClient``)."""
    maker = PresealingSeedClient(kms_client=client.kms_client, key_id=client.key_id,
                                 private_pem=client.private_pem)
    return [maker.create_jwt(SEED_CARD) for _ in range(count)]


def seal_and_open_rows(*, moto: Moto, key_arn: str, repeats: int, seconds: float,
                       rows: set[str], progress: Progress, findings: Findings) -> None:
    for alg in ("RS256", "ES256"):
        with tempfile.TemporaryDirectory(prefix="cardseal-bench-") as tmp:
            _rows_for(alg, Path(tmp), moto=moto, key_arn=key_arn, repeats=repeats,
                      seconds=seconds, rows=rows, progress=progress, findings=findings)


def _rows_for(alg: str, tmp: Path, *, moto: Moto, key_arn: str, repeats: int, seconds: float,
              rows: set[str], progress: Progress, findings: Findings) -> None:
    kms_uri = f"aws-kms://{key_arn}"
    card = sample_card()
    setup = LocalSetup.create(tmp, alg=alg)
    aws_sealer, aws_verifier, aws_opener, aws_providers = _aws_side(setup, kms_uri,
                                                                    moto.endpoint)
    token = setup.sealer.seal(card)
    signing_input = jws.parse_compact(token).signing_input
    seed = _seed_pair(setup, key_arn, tmp) if alg == "RS256" else None
    public = setup.signer.public_key
    bits = f"RSA-{public.key_size}" if isinstance(public, rsa.RSAPublicKey) else "P-256"
    try:
        if "seal" in rows:
            progress.step(f"row 1: seal/s {alg}")
            candidates: list[tuple[str, Callable[[], object]]] = [
                ("raw", _raw_sign(setup.signer._key, signing_input)),
                ("local", lambda: setup.sealer.seal(card)),
                ("aws", lambda: aws_sealer.seal(card)),
            ]
            if seed is not None:
                seed_client = seed[0]
                candidates.append(("seed", lambda: seed_client.create_jwt(SEED_CARD)))
            rates = _interleaved(candidates, repeats, seconds, progress)
            _header(progress, f"Row 1 - seal/s, {alg} ({bits})", repeats, seconds)
            ratios = _print(progress, rates, {
                "raw": f"raw: cryptography sign, same key, {len(signing_input)} B input",
                "local": "cardseal seal (envelope, local://)",
                "aws": "cardseal seal (envelope, aws-kms:// on moto)",
                "seed": "seed client (KMS Encrypt + PEM + PyJWT per token)",
            }, {"local": "raw", "aws": "raw,seed"})
            findings.ratios.update({f"seal_{alg}_{k}": v for k, v in ratios.items()})
            progress.emit()
            progress.finish_step()

        if "open" in rows:
            progress.step(f"row 2: open/s {alg}")
            progress.tick("sealing the token pools")
            local_pool = cycle([setup.sealer.seal(card) for _ in range(_POOL)])
            aws_pool = cycle([aws_sealer.seal(card) for _ in range(_POOL)])
            verifier, opener = setup.verifier, setup.opener
            candidates = [
                ("floor", _raw_verify_decrypt(public, token)),
                ("local", lambda: opener.open_card(verifier.verify(next(local_pool)))),
                ("aws", lambda: aws_opener.open_card(aws_verifier.verify(next(aws_pool)))),
            ]
            if seed is not None:
                progress.tick("sealing the seed's tokens")
                seed_server = seed[1]
                seed_pool = cycle(_seed_tokens(seed[0], max(50, int(500 * seconds))))
                candidates.append(("seed", lambda: seed_server.process_jwt(next(seed_pool))))
            rates = _interleaved(candidates, repeats, seconds, progress)
            _header(progress, f"Row 2 - open/s, {alg} ({bits})", repeats, seconds)
            ratios = _print(progress, rates, {
                "floor": "floor: raw verify + AES-GCM decrypt (same sizes)",
                "local": "cardseal open (verify+cached unwrap+decrypt+card, local://)",
                "aws": "cardseal open (same, aws-kms:// on moto)",
                "seed": "seed server (PyJWT+PEM, KMS Decrypt per token)",
            }, {"local": "floor", "aws": "floor,seed"})
            findings.ratios.update({f"open_{alg}_{k}": v for k, v in ratios.items()})
            progress.emit(f"  KMS calls of the aws-kms:// sealer and opener in rows 1-2 ({alg}):"
                          f" {dict(aws_providers.calls)}")
            progress.emit()
            progress.finish_step()
    finally:
        _aws_client(aws_providers, kms_uri).close()
        if seed is not None:
            seed[0].kms_client.close()
            seed[1].kms_client.close()


# -- row 3 -------------------------------------------------------------------------------------


def _count_requests(client: Any) -> Counter[str]:
    """HTTP requests ``client`` sends to KMS, by operation (a botocore ``before-send`` hook)."""
    counts: Counter[str] = Counter()

    def hook(event_name: str, **_kwargs: Any) -> None:
        counts[event_name.rsplit(".", 1)[-1]] += 1

    client.meta.events.register("before-send.kms", hook)
    return counts


def _aws_client(providers: KeyProviders, uri: str) -> Any:
    provider = providers.provider_for(uri)
    assert isinstance(provider, AwsKmsKeyProvider)
    return provider.client


def kms_row(*, home: Home, key_arn: str, tokens: int, progress: Progress,
            findings: Findings) -> None:
    """Row 3: KMS requests for ``tokens`` tokens sealed then opened, each side on its own."""
    progress.step("row 3: KMS calls per 1,000 tokens")
    settings = load_settings(home.config)
    client_side = build_providers(settings)
    gateway_side = build_providers(settings)
    sealed_counts = _count_requests(_aws_client(client_side, home.kms_uri))
    opened_counts = _count_requests(_aws_client(gateway_side, home.kms_uri))
    sealer = build_sealer(settings, client_side)
    policies = build_issuer_policies(settings)
    verifier = build_verifier(settings, policies)
    opener = build_opener(settings, policies, gateway_side)
    card = sample_card()
    progress.tick(f"cardseal: sealing {tokens}")
    batch = [sealer.seal(card) for _ in range(tokens)]
    progress.tick(f"cardseal: opening {tokens}")
    for token in batch:
        opener.open_card(verifier.verify(token))

    with tempfile.TemporaryDirectory(prefix="cardseal-bench-") as tmp:
        private = serialization.load_pem_private_key(home.signing_pem.read_bytes(), None)
        pem = Path(tmp) / "private.pem"
        pem.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        seed_client = PresealingSeedClient(kms_client=new_kms_client(), key_id=key_arn,
                                           private_pem=pem)
        seed_server = SeedServer(kms_client=new_kms_client(), public_pem=home.public_pem)
        seed_sealed = _count_requests(seed_client.kms_client)
        seed_opened = _count_requests(seed_server.kms_client)
        progress.tick(f"seed: sealing {tokens}")
        seed_tokens = [seed_client.create_jwt(SEED_CARD) for _ in range(tokens)]
        progress.tick(f"seed: opening {tokens}")
        for token in seed_tokens:
            assert seed_server.process_jwt(token) is not None
        seed_client.kms_client.close()
        seed_server.kms_client.close()

    scale = 1000 / tokens
    progress.emit(f"Row 3 - KMS requests per 1,000 tokens ({tokens} sealed, then opened; "
                  "HTTP requests to KMS, retries included)")
    progress.emit(f"  {'':<44} {'seal side':>10} {'open side':>10}   by operation")
    for name, sealed, opened, own in (
        ("cardseal defaults (envelope, aws-kms://)", sealed_counts, opened_counts,
         f"cardseal's own count: client {dict(client_side.calls)}, "
         f"gateway {dict(gateway_side.calls)}"),
        ("seed (Encrypt / Decrypt per token)", seed_sealed, seed_opened, ""),
    ):
        progress.emit(f"  {name:<44} {sum(sealed.values()) * scale:>10,.0f} "
                      f"{sum(opened.values()) * scale:>10,.0f}   seal {dict(sealed)}, "
                      f"open {dict(opened)}")
        if own:
            progress.emit(f"  {'':<44} {own}")
    findings.kms = {"cardseal_seal": dict(sealed_counts), "cardseal_open": dict(opened_counts),
                    "seed_seal": dict(seed_sealed), "seed_open": dict(seed_opened),
                    "tokens": {"n": tokens}}
    progress.emit(f"  (data_key_max_uses = {settings.client.data_key_max_uses}, "
                  f"data_key_max_age = {settings.client.data_key_max_age:g} s, "
                  f"gateway cache {settings.gateway.data_key_cache_size} keys / "
                  f"{settings.gateway.data_key_cache_ttl:g} s)")
    progress.emit()
    progress.finish_step()
