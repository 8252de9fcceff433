"""Integration fixtures: moto's KMS server on a free port driven by the real boto3 client.

Credentials are fake and every ``AWS_*`` variable of the host is hidden, so nothing here can
reach a real AWS account. Each test makes its own keys on the one emulator.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from cryptography.hazmat.primitives import serialization
from moto.server import ThreadedMotoServer

from cardseal import jws
from cardseal.config import AwsKmsSettings
from cardseal.keys.aws_kms import AwsKmsKeyProvider
from cardseal.keys.signing import PemSigner, Signer, generate_private_key_pem
from cardseal.testing import AUDIENCE, ISSUER
from tests.integration.kms_proxy import KmsProxy

REGION = "us-east-1"


@dataclass(frozen=True)
class SymmetricKey:
    key_id: str
    arn: str
    alias: str

    def uri(self, name: str) -> str:
        """``aws-kms://`` + the key's ``id``, ``arn`` or ``alias``."""
        return "aws-kms://" + {"id": self.key_id, "arn": self.arn, "alias": self.alias}[name]


@dataclass(frozen=True)
class KmsEmulator:
    endpoint: str
    client: Any  # mypy_boto3_kms.KMSClient

    def symmetric_key(self) -> SymmetricKey:
        meta = self.client.create_key()["KeyMetadata"]
        alias = "alias/cardseal-" + meta["KeyId"][:8]
        self.client.create_alias(AliasName=alias, TargetKeyId=meta["KeyId"])
        return SymmetricKey(meta["KeyId"], meta["Arn"], alias)

    def signing_key(self, key_spec: str) -> str:
        """A new asymmetric SIGN_VERIFY key (``RSA_2048``, ``ECC_NIST_P256``): its ARN."""
        meta = self.client.create_key(KeyUsage="SIGN_VERIFY", KeySpec=key_spec)["KeyMetadata"]
        arn: str = meta["Arn"]
        return arn


def pem_signer(alg: str = "RS256") -> PemSigner:
    private = serialization.load_pem_private_key(generate_private_key_pem(alg), None)
    return PemSigner(private, alg=alg)  # type: ignore[arg-type]


def signed_token(signer: Signer, meta_data: str, jti: str) -> str:
    """A well-formed card token around a ``meta_data`` built by hand."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 60, "jti": jti,
              "meta_data": meta_data}
    header = {"alg": signer.alg, "kid": signer.kid, "typ": "card+jwt"}
    return jws.encode_compact(header, json.dumps(claims).encode(), signer.sign)


def aws_settings(endpoint: str, **overrides: Any) -> AwsKmsSettings:
    return AwsKmsSettings(region=REGION, endpoint_url=endpoint, **overrides)


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                mp.delenv(name)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def kms(aws_env: None) -> Iterator[KmsEmulator]:
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)  # one access-log line per KMS call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.session.Session().client("kms", region_name=REGION, endpoint_url=endpoint)
    try:
        yield KmsEmulator(endpoint, client)
    finally:
        client.close()
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture
def proxy(kms: KmsEmulator) -> Iterator[KmsProxy]:
    proxy = KmsProxy(kms.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def provider(kms: KmsEmulator) -> Iterator[AwsKmsKeyProvider]:
    """A provider talking straight to the emulator."""
    provider = AwsKmsKeyProvider.from_settings(aws_settings(kms.endpoint))
    try:
        yield provider
    finally:
        provider.client.close()
