"""End-to-end runs of the real command: checks, serving, signals, logs, authorize.

Every test starts ``python -m proxy`` in a subprocess; where it needs bol, the recording
imitation (``FakeBol``) runs in the test process on 127.0.0.1:0 as its upstream. No test
sleeps to wait for a state: they read the command's output line by line or poll the
proxy, always under a timeout, and every subprocess is killed on the way out.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import os
import re
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy import __version__
from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, ORDER, V10, FakeBol
from tests.conftest import SECRET_B, base_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(20)]

WAIT = 5.0  # seconds any single step may take before the test fails
START = 10.0  # seconds for a step that includes starting Python (slow on a loaded machine)
LISTENING = re.compile(r"listening on http://([^:\s]+):(\d+)")
REDIRECT_URI = "https://partner.example/bol/callback"


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A port nobody listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command_env(**variables: str) -> dict[str, str]:
    """The test's environment without any BOL_* configuration, plus ``variables``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BOL_") and k != "UNSET_VARIABLE"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(variables)
    return env


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def basic(client_id: str, secret: str) -> str:
    return base64.b64encode(f"{client_id}:{secret}".encode()).decode()


@dataclass
class Finished:
    """What a command left behind when it exited."""

    status: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


class Running:
    """A running ``bol-proxy``: its output as it comes, line by line, and its exit."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}

    async def line(self, stream: str, pattern: str | re.Pattern[str],
                   within: float = WAIT) -> re.Match[str]:
        """Read ``stream`` until a line matches ``pattern``; fail after ``within`` seconds."""
        reader = self.process.stdout if stream == "stdout" else self.process.stderr
        assert reader is not None
        lines = self.seen[stream]
        try:
            async with asyncio.timeout(within):
                while raw := await reader.readline():
                    lines.append(raw.decode().rstrip("\n"))
                    if match := re.search(pattern, lines[-1]):
                        return match
        except TimeoutError:
            pass
        raise AssertionError(f"no {stream} line matching {pattern!r}; so far: {lines}")

    async def port(self) -> int:
        """The main listener's port, from the ``listening on`` log line."""
        return int((await self.line("stderr", LISTENING, START)).group(2))

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def finish(self, within: float = WAIT) -> Finished:
        """Wait for the exit (bounded) and collect the rest of the output."""
        out, err = await asyncio.wait_for(self.process.communicate(), within)
        self.seen["stdout"] += out.decode().splitlines()
        self.seen["stderr"] += err.decode().splitlines()
        assert self.process.returncode is not None
        return Finished(self.process.returncode, "\n".join(self.seen["stdout"]),
                        "\n".join(self.seen["stderr"]))


@asynccontextmanager
async def started(*args: str, env: Mapping[str, str] | None = None) -> AsyncIterator[Running]:
    """``python -m proxy ARGS`` in a subprocess, killed on the way out whatever happens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=command_env() if env is None else dict(env),
    )
    try:
        yield Running(process)
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.communicate(), WAIT)


async def run(*args: str, env: Mapping[str, str] | None = None) -> Finished:
    """Run a command that is expected to exit by itself."""
    async with started(*args, env=env) as command:
        return await command.finish(START)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT), http.get(url) as response:
        return response.status, await response.read()


def partner_config(url: str, folder: Path) -> dict[str, Any]:
    """``base_config`` plus ``partner``, an authorised-party set (refresh-token grant)."""
    raw = base_config(url)
    raw["credentials"]["partner"] = {
        "grant": "refresh_token", "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
        "refresh_token_file": str(folder / "state" / "partner.refresh"),
        "redirect_uri": REDIRECT_URI,
    }
    return raw


# --------------------------------------------------------------------------- --check
# ----------------------------------------------------------------------------- --check


async def test_check_of_a_valid_file_prints_a_summary_without_secrets(tmp_path: Path) -> None:
    raw = base_config("http://127.0.0.1:9")
    raw["credentials"]["setb"]["client_secret"] = "${SETB_SECRET}"
    path = write_config(tmp_path / "proxy.yaml", raw)

    done = await run("--check", "--config", str(path), env=command_env(SETB_SECRET=SECRET_B))

    assert done.status == 0, done.stderr
    assert "valid" in done.stdout
    assert "seta: client_id demo-client" in done.stdout
    assert "setb: client_id client-b" in done.stdout
    for secret in (DEMO_CLIENT_SECRET, SECRET_B):
        assert secret not in done.stdout + done.stderr


SETA = "credentials:\n  seta: {client_id: a, client_secret: b}\n"


@pytest.mark.parametrize(("text", "status", "named"), [
    pytest.param("listen: {colour: blue}\n" + SETA, 2, "colour", id="unknown-key"),
    pytest.param("credentials:\n  seta: {client_id: a, client_secret: '${UNSET_VARIABLE}'}\n",
                 2, "UNSET_VARIABLE", id="unset-variable"),
    pytest.param("credentials: [\n", 2, "not valid YAML", id="broken-yaml"),
    pytest.param(None, 1, "absent.yaml", id="missing-file"),
])
async def test_check_of_a_bad_file_fails_with_one_line_naming_the_problem(
    tmp_path: Path, text: str | None, status: int, named: str
) -> None:
    path = tmp_path / "absent.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")

    done = await run("--check", "--config", str(path))

    assert done.status == status
    assert done.stdout == ""
    assert len(done.stderr_lines) == 1, done.stderr
    assert named in done.stderr
    assert "Traceback" not in done.stderr


async def test_check_of_a_misspelt_key_suggests_the_known_one(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("listen: {prot: 9000}\n" + SETA, encoding="utf-8")

    done = await run("--check", "--config", str(path))

    assert done.status == 2
    assert done.stderr_lines == [
        "bol-proxy: listen.prot: unknown key 'prot' (did you mean 'port'?)"]


async def test_check_of_a_yaml_syntax_error_names_reason_line_and_column(
    tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("credentials:\n  seta:\n\tclient_id: a\n", encoding="utf-8")

    done = await run("--check", "--config", str(path))

    assert done.status == 2
    assert done.stderr_lines == [
        f"bol-proxy: {path}: not valid YAML: line 3, column 1: found character '\\t' that "
        "cannot start any token"]


async def test_check_summary_says_1_credential_set(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(SETA, encoding="utf-8")

    done = await run("--check", "--config", str(path))

    assert done.status == 0, done.stderr
    assert "1 credential set (default: seta)" in done.stdout.splitlines()


async def test_version_prints_the_name_and_version_and_exits_0() -> None:
    done = await run("--version")

    assert done.status == 0, done.stderr
    assert done.stdout == f"bol-proxy {__version__}"
    assert importlib.metadata.version("bol-proxy") == __version__  # one version, not two


async def test_authorize_help_explains_both_steps() -> None:
    done = await run("authorize", "--help")

    assert done.status == 0, done.stderr
    text = " ".join(done.stdout.split())
    for step in ("Run it without --code", "prints bol's authorize URL",
                 "redirects the browser to the set's redirect_uri with ?code=...&state=...",
                 "Run it again with that code, written --code=CODE (a code may start with '-')",
                 "bol-proxy authorize partner-shop --config config.yaml --code=CODE"):
        assert step in text


async def test_check_without_any_configuration_says_how_to_configure() -> None:
    done = await run("--check")

    assert done.status == 2
    assert len(done.stderr_lines) == 1, done.stderr
    for hint in ("--config", "BOL_PROXY_CONFIG", "BOL_CLIENT_ID", "BOL_CLIENT_SECRET"):
        assert hint in done.stderr


@pytest.mark.parametrize("args", [["--check", "--port", "70000"], ["--port", "70000"],
                                  ["demo", "--port", "70000"]], ids=["check", "run", "demo"])
async def test_a_port_option_out_of_range_is_a_configuration_error(
    tmp_path: Path, args: list[str]
) -> None:
    path = write_config(tmp_path / "proxy.yaml", base_config("http://127.0.0.1:9"))

    done = await run("--config", str(path), *args)

    assert done.status == 2
    assert len(done.stderr_lines) == 1, done.stderr
    assert "port" in done.stderr and "70000" in done.stderr


# --------------------------------------------------------------------------- serving
# ------------------------------------------------------------ serving (zero-config, demo)


async def test_zero_config_from_the_environment_serves_orders(
    bol: tuple[FakeBol, str], http: aiohttp.ClientSession
) -> None:
    fake, url = bol
    port = free_port()
    env = command_env(BOL_CLIENT_ID=DEMO_CLIENT_ID, BOL_CLIENT_SECRET=DEMO_CLIENT_SECRET,
                      BOL_PROXY_PORT=str(port), BOL_API_URL=url, BOL_TOKEN_URL=url + "/token")
    async with started(env=env) as proxy:
        assert await proxy.port() == port

        status, body = await get(http, f"http://127.0.0.1:{port}/retailer/orders")

        assert status == 200
        assert json.loads(body)["orders"][0]["orderId"] == "1043946570"
        assert fake.api_requests[-1].client_id == DEMO_CLIENT_ID
        proxy.send(signal.SIGTERM)
        assert (await proxy.finish()).status == 0


async def test_the_startup_line_counts_1_credential_set_in_the_singular(
    bol: tuple[FakeBol, str]
) -> None:
    _, url = bol
    env = command_env(BOL_CLIENT_ID=DEMO_CLIENT_ID, BOL_CLIENT_SECRET=DEMO_CLIENT_SECRET,
                      BOL_PROXY_PORT="0", BOL_API_URL=url, BOL_TOKEN_URL=url + "/token")
    async with started(env=env) as proxy:
        await proxy.line("stderr", r"listening on http://\S+ \(main\) \(1 credential set, default: "
                                   r"default;", START)
        proxy.send(signal.SIGTERM)
        assert (await proxy.finish()).status == 0


async def test_demo_answers_orders_with_json(http: aiohttp.ClientSession) -> None:
    port = free_port()
    async with started("demo", "--port", str(port)) as demo:
        curl = await demo.line("stdout", r"curl .*'Accept: (\S+)' (http://\S+/retailer/orders)",
                               START)
        assert curl.group(1) == V10
        assert curl.group(2) == f"http://127.0.0.1:{port}/retailer/orders"

        async with asyncio.timeout(WAIT), http.get(curl.group(2),
                                                   headers={"Accept": V10}) as response:
            assert response.status == 200
            assert response.content_type == V10
            assert "orders" in await response.json(content_type=None)
        demo.send(signal.SIGINT)
        assert (await demo.finish()).status == 0


async def test_demo_takes_logging_options_after_the_command_and_survives_sighup() -> None:
    async with started("demo", "--port", str(free_port()), "--log-format", "json") as demo:
        await demo.line("stdout", r"curl ", START)
        demo.send(signal.SIGHUP)
        await demo.line("stderr", r'"message": "SIGHUP: the demo has no configuration', WAIT)
        demo.send(signal.SIGTERM)
        done = await demo.finish()
    assert done.status == 0
    assert all(json.loads(line) for line in done.stderr_lines)


@pytest.mark.parametrize("command", ["proxy", "demo"])
async def test_port_in_use_exits_1_with_one_line(
    bol: tuple[FakeBol, str], tmp_path: Path, command: str
) -> None:
    _, url = bol
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        if command == "demo":
            done = await run("demo", "--port", port)
        else:
            path = write_config(tmp_path / "proxy.yaml", base_config(url))
            done = await run("--config", str(path), "--port", port)

    assert done.status == 1
    assert len(done.stderr_lines) == 1, done.stderr
    assert port in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_set_port_in_use_exits_1_naming_the_port_and_the_set(
    bol: tuple[FakeBol, str], tmp_path: Path,
) -> None:
    _, url = bol
    raw = base_config(url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        raw["credentials"]["setb"]["port"] = port
        done = await run("--config", str(write_config(tmp_path / "proxy.yaml", raw)))

    assert done.status == 1
    assert done.stderr_lines == [f"bol-proxy: cannot listen on 127.0.0.1:{port} (the dedicated "
                                 "port of set 'setb'): Address already in use"]


async def test_the_startup_line_names_every_listener(
    bol: tuple[FakeBol, str], tmp_path: Path,
) -> None:
    _, url = bol
    raw = base_config(url)
    raw["credentials"]["setb"]["port"] = set_port = free_port()
    async with started("--config", str(write_config(tmp_path / "proxy.yaml", raw))) as proxy:
        line = (await proxy.line("stderr", LISTENING, START)).string
    assert f":{set_port} (set setb)" in line
    assert "(main)" in line.split(f":{set_port}")[0]  # the main listener comes first
    assert "2 credential sets" in line


async def test_the_pure_python_http_parser_is_refused_at_start(
    bol: tuple[FakeBol, str], tmp_path: Path,
) -> None:
    # aiohttp's fallback parser has had request smuggling flaws; the C one refuses them.
    _, url = bol
    path = write_config(tmp_path / "proxy.yaml", base_config(url))
    done = await run("--config", str(path), env=command_env(AIOHTTP_NO_EXTENSIONS="1"))
    assert done.status == 1
    assert "without its C HTTP parser" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_lets_the_in_flight_request_finish_then_exits_0(
    bol: tuple[FakeBol, str], http: aiohttp.ClientSession, tmp_path: Path,
    sig: signal.Signals
) -> None:
    fake, url = bol
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await release.wait()  # a slow bol answer, still running when the signal comes
        return web.json_response({"slow": "done"})

    fake.extra["/retailer/slow"] = slow
    path = write_config(tmp_path / "proxy.yaml", base_config(url, shutdown_timeout=5))
    async with started("--config", str(path)) as proxy:
        port = await proxy.port()
        async with asyncio.TaskGroup() as group:
            request = group.create_task(get(http, f"http://127.0.0.1:{port}/retailer/slow"))
            await asyncio.wait_for(arrived.wait(), WAIT)
            proxy.send(sig)
            await proxy.line("stderr", "listeners closed; 1 requests in flight")
            with pytest.raises(ConnectionRefusedError):  # no longer accepting...
                await asyncio.open_connection("127.0.0.1", port)
            assert not request.done()  # ...still serving
            release.set()
        assert request.result() == (200, b'{"slow": "done"}')
        done = await proxy.finish()
    assert done.status == 0, done.stderr
    assert "stopped" in done.stderr_lines[-1]


async def test_sighup_reload_adds_a_set_and_a_broken_file_keeps_the_running_one(
    bol: tuple[FakeBol, str], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fake, url = bol
    raw = base_config(url)
    path = write_config(tmp_path / "proxy.yaml", raw)
    async with started("--config", str(path)) as proxy:
        base = f"http://127.0.0.1:{await proxy.port()}"
        assert (await get(http, base + "/setc/retailer/orders"))[0] == 400

        raw["credentials"]["setc"] = {"client_id": "client-b", "client_secret": SECRET_B}
        write_config(path, raw)
        proxy.send(signal.SIGHUP)
        await proxy.line("stderr", r"configuration reloaded .*1 set added \(setc\)")
        assert (await get(http, base + "/setc/retailer/orders"))[0] == 200
        assert fake.api_requests[-1].client_id == "client-b"

        path.write_text("credentials: [\n", encoding="utf-8")
        proxy.send(signal.SIGHUP)
        failed = await proxy.line("stderr", "reload failed")
        assert "not valid YAML" in failed.string
        for name in ("setc", "seta"):
            assert (await get(http, f"{base}/{name}/retailer/orders"))[0] == 200
        proxy.send(signal.SIGTERM)
        assert (await proxy.finish()).status == 0


async def test_a_reload_says_that_port_still_overrides_an_edited_listen_port(
    bol: tuple[FakeBol, str], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, url = bol
    raw = base_config(url)
    path = write_config(tmp_path / "proxy.yaml", raw)
    port = free_port()
    async with started("--config", str(path), "--port", str(port)) as proxy:
        assert await proxy.port() == port
        raw["listen"]["port"] = free_port()
        write_config(path, raw)
        proxy.send(signal.SIGHUP)
        await proxy.line("stderr", r"--host/--port still override listen of .*proxy\.yaml")
        assert (await get(http, f"http://127.0.0.1:{port}/retailer/orders"))[0] == 200


# ---------------------------------------------------------------------------- logs


async def test_json_log_format_makes_every_line_json_with_access_fields(
    bol: tuple[FakeBol, str], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, url = bol
    path = write_config(tmp_path / "proxy.yaml", base_config(url))
    async with started("--config", str(path), "--log-format", "json") as proxy:
        base = f"http://127.0.0.1:{await proxy.port()}"
        assert (await get(http, base + "/retailer/orders?status=OPEN"))[0] == 200
        assert (await get(http, f"{base}/setb/retailer/orders/{ORDER['orderId']}"))[0] == 200
        assert (await get(http, base + "/elsewhere"))[0] == 404
        proxy.send(signal.SIGTERM)
        done = await proxy.finish()

    assert done.status == 0
    entries = [json.loads(line) for line in done.stderr_lines]
    assert all(isinstance(entry, dict) and "message" in entry for entry in entries)
    access = [entry for entry in entries if entry["logger"] == "proxy.access"]
    assert len(access) == 3
    first = access[0]
    assert {k: first[k] for k in ("set", "method", "path", "status", "upstream_status",
                                  "replayed")} == {
        "set": "seta", "method": "GET", "path": "/retailer/orders", "status": 200,
        "upstream_status": 200, "replayed": False}
    assert isinstance(first["duration_ms"], int | float)
    assert first["bytes"] > 0
    assert (access[1]["set"], access[1]["path"]) == (
        "setb", f"/setb/retailer/orders/{ORDER['orderId']}")
    assert (access[2]["status"], access[2]["upstream_status"]) == (404, None)


async def test_debug_run_logs_no_client_secret_and_no_access_token(
    bol: tuple[FakeBol, str], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fake, url = bol
    path = write_config(tmp_path / "proxy.yaml", base_config(url))
    bodies: list[bytes] = []
    issued: set[str] = set()
    async with started("--config", str(path), "--log-level", "debug") as proxy:
        base = f"http://127.0.0.1:{await proxy.port()}"
        for target, status in (("/retailer/orders", 200), ("/setb/retailer/orders", 200),
                               ("/nosuch/retailer/orders", 400), ("/elsewhere", 404)):
            answer = await get(http, base + target)
            assert answer[0] == status
            bodies.append(answer[1])
        issued |= fake.tokens.keys()
        fake.revoke_all()  # the next request meets a 401: a new token is fetched, replayed
        assert (await get(http, base + "/retailer/orders"))[0] == 200
        for admin in ("/_proxy/ready", "/_proxy/metrics"):
            bodies.append((await get(http, base + admin))[1])
        proxy.send(signal.SIGTERM)
        done = await proxy.finish()

    issued |= fake.tokens.keys()
    assert done.status == 0
    assert " DEBUG " in done.stderr
    assert "replayed=yes" in done.stderr
    assert len(fake.token_requests) >= 3 and len(issued) >= 3
    leaks = [DEMO_CLIENT_SECRET, SECRET_B, basic(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET),
             basic("client-b", SECRET_B), *issued]
    everything = done.stdout + done.stderr + b"".join(bodies).decode()
    assert [secret for secret in leaks if secret in everything] == []


# ------------------------------------------------------------------------- authorize
# ----------------------------------------------------------------------- authorize


@pytest.mark.parametrize("given", ["--config after SET", "--config before", "BOL_PROXY_CONFIG"])
async def test_authorize_prints_the_authorize_url_of_the_set(
    bol: tuple[FakeBol, str], tmp_path: Path, given: str
) -> None:
    _, url = bol
    path = str(write_config(tmp_path / "proxy.yaml", partner_config(url, tmp_path)))
    if given == "BOL_PROXY_CONFIG":
        done = await run("authorize", "partner", env=command_env(BOL_PROXY_CONFIG=path))
    elif given == "--config before":
        done = await run("--config", path, "authorize", "partner")
    else:
        done = await run("authorize", "partner", "--config", path)

    assert done.status == 0, done.stderr
    found = re.search(r"https?://\S+\?\S+", done.stdout)
    assert found is not None, done.stdout
    link = urlsplit(found.group(0))
    assert f"{link.scheme}://{link.netloc}{link.path}" == url + "/authorize"
    query = parse_qs(link.query)
    assert {k: v for k, v in query.items() if k != "state"} == {
        "response_type": ["code"], "client_id": [DEMO_CLIENT_ID],
        "scope": ["offline_access"], "redirect_uri": [REDIRECT_URI]}
    assert len(query["state"][0]) >= 16
    assert f"state={query['state'][0]}" in done.stdout.replace(found.group(0), "")
    # The next step, as printed, reads the same file.
    assert f"bol-proxy authorize partner --config {path} --code=CODE" in done.stdout
    assert DEMO_CLIENT_SECRET not in done.stdout + done.stderr
    assert not (tmp_path / "state" / "partner.refresh").exists()


async def test_authorize_with_a_code_saves_the_refresh_token_with_mode_0600(
    bol: tuple[FakeBol, str], tmp_path: Path
) -> None:
    fake, url = bol
    path = write_config(tmp_path / "proxy.yaml", partner_config(url, tmp_path))
    code = fake.new_code(DEMO_CLIENT_ID)

    # --code=CODE: a code may start with "-", which argparse would take for an option.
    done = await run("authorize", "partner", "--config", str(path), f"--code={code}")

    assert done.status == 0, done.stderr
    saved = tmp_path / "state" / "partner.refresh"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    token = saved.read_text(encoding="utf-8").strip()
    assert fake.refresh_tokens[token] == DEMO_CLIENT_ID
    form = parse_qs(fake.token_requests[-1].body.decode())
    assert form == {"grant_type": ["authorization_code"], "code": [code],
                    "redirect_uri": [REDIRECT_URI]}
    for secret in (token, DEMO_CLIENT_SECRET, *fake.tokens):
        assert secret not in done.stdout + done.stderr


async def test_authorize_with_a_refused_code_exits_1_and_writes_nothing(
    bol: tuple[FakeBol, str], tmp_path: Path
) -> None:
    _, url = bol
    path = write_config(tmp_path / "proxy.yaml", partner_config(url, tmp_path))

    done = await run("authorize", "partner", "--config", str(path), "--code", "not-issued")

    assert done.status == 1
    assert len(done.stderr_lines) == 1, done.stderr
    assert "invalid_grant" in done.stderr
    assert not (tmp_path / "state" / "partner.refresh").exists()


@pytest.mark.parametrize("name", ["nosuch", "seta"], ids=["unknown-set", "client-credentials-set"])
async def test_authorize_of_a_set_that_cannot_be_authorised_exits_2(
    bol: tuple[FakeBol, str], tmp_path: Path, name: str
) -> None:
    _, url = bol
    path = write_config(tmp_path / "proxy.yaml", partner_config(url, tmp_path))

    done = await run("authorize", name, "--config", str(path))

    assert done.status == 2
    assert len(done.stderr_lines) == 1, done.stderr
    assert name in done.stderr
    assert "Traceback" not in done.stderr
