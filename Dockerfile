# bol-proxy as a sidecar image: multi-stage, unprivileged, health-checked.
#   docker build -t bol-proxy .
#   docker run -p 127.0.0.1:8080:8080 -e BOL_CLIENT_ID=... -e BOL_CLIENT_SECRET=... bol-proxy
#   (publish on loopback only: whoever reaches the proxy spends its credentials)

# --- build: a wheel of the project, installed with its dependencies into a venv
FROM python:3.12-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/bol-proxy \
 && /opt/bol-proxy/bin/pip install "$(ls /wheels/*.whl)[fast]"

# --- runtime: the venv only, as an unprivileged user
FROM python:3.12-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bolproxy
COPY --from=build /opt/bol-proxy /opt/bol-proxy
COPY config/example.yaml /etc/bol-proxy/example.yaml
ENV PATH=/opt/bol-proxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BOL_PROXY_HOST=0.0.0.0 \
    BOL_PROXY_PORT=8080
USER 10001
EXPOSE 8080
# No curl in the image: the health check uses the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:%s/_proxy/health' % os.environ.get('BOL_PROXY_PORT', '8080'), timeout=2).status != 200)"]
ENTRYPOINT ["bol-proxy"]
