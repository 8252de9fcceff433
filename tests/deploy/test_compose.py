"""The Dockerfile and docker-compose.yml carry everything the gateway needs.

No Docker engine runs here, so these files are parsed and checked against the settings model:
every ``CARDSEAL_*`` variable must name a real setting, the gateways must share PostgreSQL and
Redis, TLS must be terminated in front of them, and the image must be multi-stage and non-root.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cardseal.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _setting_exists(var: str) -> bool:
    """True when CARDSEAL_<SECTION>__<KEY> names a field of the settings model."""
    path = var.removeprefix("CARDSEAL_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_gateways_share_postgres_and_redis_behind_tls_proxy() -> None:
    services = _compose()["services"]
    assert {"postgres", "redis", "nginx", "migrate", "gateway1", "gateway2"} <= services.keys()
    for name in ("gateway1", "gateway2"):
        env = services[name]["environment"]
        assert env["CARDSEAL_GATEWAY__DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in env["CARDSEAL_GATEWAY__DATABASE_URL"]
        assert env["CARDSEAL_GATEWAY__REPLAY_STORE"].startswith("redis://redis:6379")
        assert env["CARDSEAL_CONFIG"] == "/etc/cardseal/cardseal.toml"
        assert int(env["CARDSEAL_GATEWAY__WORKERS"]) >= 1
        assert any(v.endswith(":/etc/cardseal:ro") for v in services[name]["volumes"])
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully")
        for var in env:
            if var.startswith("CARDSEAL_") and var != "CARDSEAL_CONFIG":
                assert _setting_exists(var), var
    assert services["migrate"]["command"] == ["cardseal", "db", "upgrade"]
    assert "8443:8443" in services["nginx"]["ports"]


def test_plain_http_only_behind_the_proxy() -> None:
    services = _compose()["services"]
    for name in ("gateway1", "gateway2"):
        assert services[name]["environment"]["CARDSEAL_GATEWAY__INSECURE_HTTP"] == "true"
        assert "ports" not in services[name]  # reachable only through nginx
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(r"listen 8443 ssl;", nginx)
    assert "server gateway1:8443" in nginx and "server gateway2:8443" in nginx
    assert "client_max_body_size 64k;" in nginx
    assert "non_idempotent" not in nginx  # a POST that reached a gateway is never resent


def test_dockerfile_is_multistage_slim_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)
    assert len(stages) >= 2 and all("slim" in s for s in stages)
    assert "COPY --from=build" in text
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^CMD \["cardseal", "serve"', text, flags=re.MULTILINE)
    assert "HEALTHCHECK" in text
    assert "CARDSEAL_CONFIG=/etc/cardseal/cardseal.toml" in text


def test_setting_check_rejects_unknown_names() -> None:
    assert _setting_exists("CARDSEAL_GATEWAY__PORT")
    assert not _setting_exists("CARDSEAL_GATEWAY__NOPE")
    assert not _setting_exists("CARDSEAL_NOPE__PORT")
