"""`.ci/install` asks an unreachable PyTorch CPU index once, not pip's default six times (one try and five retries).

The CPU-torch command is read from `.ci/install` itself and run with pip's `--dry-run` against local servers:
the CPU index replaced by one that answers 503 Service Unavailable (what pip retries) and counts the requests,
the default index by one that has no torch (404), so nothing leaves the machine.
"""

from __future__ import annotations

import http.server
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / ".ci" / "install"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_command() -> list[str]:
    """The arguments of the `python -m pip install ... --extra-index-url <CPU index>` command in .ci/install."""
    text = INSTALL.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if CPU_INDEX in line and "pip install" in line)
    words = shlex.split(line.strip())
    words = [re.sub(r"\$\{TORCH_VERSION:-([^}]+)\}", r"\1", w) for w in words]
    return words[words.index("install") + 1 :]


def serve(status: int) -> tuple[http.server.HTTPServer, list[str]]:
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_the_cpu_index_is_asked_once_when_it_cannot_answer(tmp_path):
    args = torch_command()
    assert "--retries" in args and "--extra-index-url" in args, args
    down, asked = serve(503)
    empty, _ = serve(404)
    try:
        args[args.index(CPU_INDEX)] = f"http://127.0.0.1:{down.server_port}/whl/cpu"
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--index-url",
            f"http://127.0.0.1:{empty.server_port}/simple",
            *args,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        down.shutdown()
        empty.shutdown()
    if "no such option: --dry-run" in result.stderr:
        pytest.skip("this pip has no --dry-run")
    assert asked, result.stderr
    assert len(asked) == len(set(asked)) == 1, f"the CPU index was asked {len(asked)} times: {asked}"
