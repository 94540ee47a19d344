"""The environment variables every tox run of this project needs, whoever starts it.

uv (through tox-uv) must see pip's ``find-links`` - the local CPU build of torch 2.13.0 - or it
resolves a multi-GB CUDA build; it reads neither pip's configuration nor its CA settings. The
Makefile exports the same; ``make matrix``, the tests and ``python -m tools.matrix``
all go through :func:`tox_environ`, so a run started without make behaves the same.
"""

from __future__ import annotations

import os
import subprocess
import sys

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def pip_find_links() -> str:
    """pip's configured ``find-links`` (empty when none)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.find-links"], text=True, capture_output=True
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def tox_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not env.get("UV_FIND_LINKS"):
        found = pip_find_links()
        if found:
            env["UV_FIND_LINKS"] = found
    if os.path.exists(CA_BUNDLE):
        env.setdefault("SSL_CERT_FILE", CA_BUNDLE)
    return env
