# cardseal gateway image: multi-stage, slim, non-root.
# Build: docker build -t cardseal .   Run: see docker-compose.yml.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/cardseal
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/cardseal/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/cardseal/bin/pip install --no-cache-dir .

FROM python:3.11-slim AS runtime
RUN groupadd --system cardseal && useradd --system --gid cardseal --home /srv/cardseal cardseal \
 && mkdir -p /srv/cardseal && chown cardseal:cardseal /srv/cardseal
COPY --from=build /opt/cardseal /opt/cardseal
# Behind a TLS proxy (docker-compose.yml) the health check speaks plain HTTP; set
# CARDSEAL_HEALTH_URL if the gateway serves HTTPS itself.
ENV PATH=/opt/cardseal/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CARDSEAL_CONFIG=/etc/cardseal/cardseal.toml
USER cardseal
WORKDIR /srv/cardseal
EXPOSE 8443
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import os,urllib.request; urllib.request.urlopen(os.environ.get('CARDSEAL_HEALTH_URL', 'http://127.0.0.1:8443/healthz'), timeout=2)"
CMD ["cardseal", "serve", "--host", "0.0.0.0", "--port", "8443", "--workers", "2"]
