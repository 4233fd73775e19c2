"""Optional profile of the proxy under load with py-spy (``--profile PATH``).

py-spy samples the running proxy from outside (pausing it for each sample: without that,
stacks come out cut short) and writes collapsed stacks; :func:`summarise` reads them back into the
functions that take the most time, on their own and with what they call.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .procs import BenchError, Processes

INSTALL = ".venv/bin/pip install py-spy"


def available() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(procs: Processes, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (raw collapsed stacks)."""
    path = available()
    if path is None:
        raise BenchError(f"py-spy is not installed: {INSTALL}")
    argv = [path, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", "250", "--format", "raw", "--output", str(out)]
    return procs.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(procs: Processes, spy: subprocess.Popen[bytes], seconds: float) -> None:
    try:
        out, _ = spy.communicate(timeout=seconds + 30)
    finally:
        procs.stop(spy)
    if spy.returncode != 0:
        raise BenchError(f"py-spy failed: {out.decode(errors='replace').strip()[-300:]}")


@dataclass
class Profile:
    path: str
    samples: int = 0
    own: list[tuple[str, float]] = field(default_factory=list)  # share of samples
    inclusive: list[tuple[str, float]] = field(default_factory=list)  # proxy/ code only


def _function(frame: str) -> str:
    """``name (path/file.py:12)`` -> ``name (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1]})" if where else name


def summarise(path: Path, top: int = 12) -> Profile:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    proxy_code: set[str] = set()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[_function(frames[-1])] += n
        for name in {_function(f) for f in frames}:
            inclusive[name] += n
        proxy_code.update(_function(f) for f in frames if " (proxy/" in f)
    if total == 0:
        return Profile(str(path))
    return Profile(
        str(path), total,
        [(name, n / total) for name, n in own.most_common(top)],
        [(name, inclusive[name] / total)
         for name in sorted(proxy_code, key=lambda x: -inclusive[x])[:top]],
    )
