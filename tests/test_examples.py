"""The shipped examples (config/, Dockerfile): they parse, and their configuration is valid."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_file, summary

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "acme"
    path.write_text("example-secret-from-a-file\n")
    return path


def test_example_configuration_is_valid_without_any_environment() -> None:
    config = load_file(CONFIG / "example.yaml", env={})
    assert config.listen.host == "127.0.0.1"  # loopback unless told otherwise
    assert config.default_credentials == "acme"
    assert "replace-me" not in "\n".join(summary(config))


def test_sidecar_configuration_is_valid_with_its_secret_mounted(
    tmp_path: Path, secret_file: Path
) -> None:
    text = (CONFIG / "sidecar.yaml").read_text().replace("/run/secrets/acme", str(secret_file))
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    config = load_file(path, env={"ACME_CLIENT_ID": "acme-id", "BOL_PROXY_HOST": "0.0.0.0",
                                  "BOL_PROXY_PORT": "8080"})
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 8080)  # the image's
    assert config.credentials["acme"].client_secret.reveal() == "example-secret-from-a-file"


def test_compose_runs_a_tool_beside_the_proxy_without_publishing_it() -> None:
    (compose,) = documents(CONFIG / "docker-compose.yaml")
    proxy, tool = compose["services"]["bol-proxy"], compose["services"]["stock-job"]
    assert "ports" not in proxy  # reachable on the compose network only
    assert any(v.startswith("./sidecar.yaml:") for v in proxy["volumes"])
    assert proxy["environment"]["BOL_PROXY_CONFIG"] == "/etc/bol-proxy/config.yaml"
    assert tool["depends_on"]["bol-proxy"]["condition"] == "service_healthy"
    assert any("http://bol-proxy:8080/retailer/" in part for part in tool["command"])
    grace = int(proxy["stop_grace_period"].rstrip("s"))
    (sidecar,) = documents(CONFIG / "sidecar.yaml")
    assert grace > sidecar["shutdown_timeout"]  # in-flight requests get to finish


def test_kubernetes_pod_keeps_the_proxy_on_loopback_with_probes_and_a_secret(
    tmp_path: Path, secret_file: Path
) -> None:
    docs = {d["kind"]: d for d in documents(CONFIG / "kubernetes-pod.yaml")}
    pod = docs["Pod"]["spec"]
    (proxy,) = [c for c in pod["containers"] if c["name"] == "bol-proxy"]
    env = {e["name"]: e for e in proxy["env"]}
    assert env["ACME_CLIENT_ID"]["valueFrom"]["secretKeyRef"]["name"] == docs["Secret"][
        "metadata"]["name"]
    for probe, path in (("readinessProbe", "/_proxy/ready"), ("livenessProbe", "/_proxy/health")):
        assert path in " ".join(proxy[probe]["exec"]["command"])

    text = docs["ConfigMap"]["data"]["config.yaml"].replace(
        "/run/secrets/acme/client-secret", str(secret_file))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = load_file(path, env={"ACME_CLIENT_ID": "acme-id"})
    assert config.listen.host == "127.0.0.1"
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_timeout


def test_dockerfile_runs_unprivileged_with_an_exec_entry_point_and_a_health_check() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["python:3.12-slim", "python:3.12-slim"]
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["bol-proxy"\]$', text, re.M)
    assert "/_proxy/health" in text and "curl" not in text.split("HEALTHCHECK", 1)[1]
    assert "BOL_PROXY_HOST=0.0.0.0" in text


def test_replicas_example_shares_one_redis_that_keeps_rotations(
    tmp_path: Path, secret_file: Path
) -> None:
    (compose,) = documents(CONFIG / "replicas" / "docker-compose.yaml")
    services = compose["services"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    proxies = [services["proxy-a"], services["proxy-b"]]
    for proxy in proxies:
        assert "ports" not in proxy
        assert proxy["environment"]["BOL_PROXY_REDIS_URL"].startswith("redis://")
        assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    assert proxies[0]["volumes"][-1] != proxies[1]["volumes"][-1]  # a state folder each
    text = (CONFIG / "replicas" / "proxy.yaml").read_text().replace("/run/secrets/acme",
                                                                    str(secret_file))
    text = text.replace("/run/secrets/partner", str(secret_file))
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    password = "example-redis-password"
    config = load_file(path, env={"ACME_CLIENT_ID": "a", "PARTNER_CLIENT_ID": "p",
                                  "BOL_PROXY_REDIS_URL": f"redis://:{password}@redis:6379/0"})
    assert config.shared_state.enabled
    assert password not in "\n".join(summary(config))
