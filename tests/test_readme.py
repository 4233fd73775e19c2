"""The README's examples, run as written against the demo's pieces in-process.

A code block right after ``<!-- recipe: NAME -->`` is a recipe. Each Python recipe runs in
a worker thread with ``exec`` (the client libraries are synchronous), its documented
``http://127.0.0.1:8080`` replaced by the test proxy's URL, and must print the order ids
the imitation listed for its call, without its login reaching the imitation; the curl
recipe runs as a shell command where curl is installed. The walkthrough's configuration
must pass ``--check`` with the very summary the README shows, and the demo's printed
lines must begin as the README says they do.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bol.config
import pytest

from proxy.config import load_file, summary
from proxy.demo import V10, FakeBol
from proxy.demo.command import instructions

README = Path(__file__).resolve().parent.parent / "README.md"
DOCUMENTED_PROXY = "http://127.0.0.1:8080"
PYTHON_RECIPES = ("python-bol-api-latest", "python-bol-retailer-api", "requests")
# A marker comment, then the fenced block right after it (its language, its text).
_MARKED = re.compile(r"<!-- (?P<kind>[a-z ]+?)(?:: (?P<name>[\w.-]+))? -->\n"
                     r"```(?P<lang>\w*)\n(?P<code>.*?)\n```", re.DOTALL)


def marked_blocks() -> dict[tuple[str, str], tuple[str, str]]:
    """(kind, name) -> (language, code) of every marked block in the README."""
    return {(m["kind"], m["name"] or ""): (m["lang"], m["code"])
            for m in _MARKED.finditer(README.read_text(encoding="utf-8"))}


def block(kind: str, name: str = "") -> str:
    code = marked_blocks().get((kind, name))
    assert code is not None, f"README.md has no block marked <!-- {kind}: {name} -->"
    return code[1]


async def order_ids(base: str, target: str = "/retailer/orders") -> list[str]:
    """The order ids the demo lists for ``target``, read through the proxy."""
    async with aiohttp.ClientSession() as http, http.get(
            base + target, headers={"Accept": V10}) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json(content_type=None)
    return [order["orderId"] for order in answer["orders"]]


@contextlib.contextmanager
def retailer_api_config_restored() -> Iterator[None]:
    """python-bol-retailer-api keeps its URLs in ``bol.config`` and caches tokens in its
    package folder by client id: a recipe that sets them must not leak into other tests."""
    names = ("AUTH_URL", "BASE_URL", "DEMO_URL", "SHARED_URL", "SHARED_DEMO_URL")
    saved = {name: getattr(bol.config, name) for name in names}
    bol.config.CACHE.clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(bol.config, name, value)
        bol.config.CACHE.clear()
        (Path(bol.config.__file__).parent / "cache" / "demo.txt").unlink(missing_ok=True)


def test_the_readme_has_a_recipe_for_each_client_it_names() -> None:
    recipes = {name: lang for (kind, name), (lang, _) in marked_blocks().items()
               if kind == "recipe"}
    assert recipes == {**dict.fromkeys(PYTHON_RECIPES, "python"), "curl": "sh"}
    for name in PYTHON_RECIPES:
        assert DOCUMENTED_PROXY in block("recipe", name)  # what the test points elsewhere


@pytest.mark.parametrize("name", PYTHON_RECIPES)
async def test_each_python_recipe_prints_the_demos_orders_through_the_proxy(
    demo: tuple[FakeBol, str], name: str,
) -> None:
    fake, base = demo
    logins, calls = len(fake.token_requests), len(fake.api_requests)
    printed: list[tuple[Any, ...]] = []
    namespace: dict[str, Any] = {"__name__": "readme_recipe",
                                 "print": lambda *args, **_: printed.append(args)}
    code = block("recipe", name).replace(DOCUMENTED_PROXY, base)

    with retailer_api_config_restored():
        await asyncio.to_thread(exec, compile(code, f"README.md:{name}", "exec"), namespace)

    assert len(fake.api_requests) > calls  # through the proxy to the imitation
    assert len(fake.token_requests) == logins  # a tool's login reached no bol
    listed = fake.api_requests[-1].target  # with the library's own filters
    assert listed.startswith("/retailer/orders")
    assert printed == [(await order_ids(base, listed),)]


async def test_the_curl_recipe_prints_the_demos_orders_through_the_proxy(
    demo: tuple[FakeBol, str],
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed here")
    _, base = demo
    expected = await order_ids(base)
    command = block("recipe", "curl").replace(DOCUMENTED_PROXY, base)
    process = await asyncio.create_subprocess_exec(
        "sh", "-c", command, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert re.findall(r'"orderId": "(\d+)"', out.decode()) == expected


def test_the_walkthrough_configuration_checks_with_the_summary_the_readme_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    client_id = re.search(r"export BOL_CLIENT_ID=(\S+)", block("walkthrough", "check"))
    assert client_id is not None
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text(block("walkthrough", "config"), encoding="utf-8")
    Path("bol-client-secret").write_text("a-client-secret\n", encoding="utf-8")

    config = load_file("config.yaml", env={"BOL_CLIENT_ID": client_id[1]})

    assert list(summary(config)) == block("output", "check").splitlines()


def test_the_demo_prints_what_the_readme_says_it_prints() -> None:
    shown = block("output", "demo")
    bol_url = re.search(r"imitation of bol.com at (\S+),", shown)
    assert bol_url is not None
    assert instructions(DOCUMENTED_PROXY, bol_url[1]).startswith(shown + "\n")
