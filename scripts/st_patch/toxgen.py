"""Generate ``tox.ini`` from the releases table (``make tox.ini``).

One environment per release, ``st-<version>``, with the release's pins and torch 2.13.0. Each
environment applies the release's series (if any) to its own installed sentence-transformers with
``scripts/st-patch`` and runs the conformance suite with JUnit and JSON output under ``results/``.
``make check-generated`` (run by the tests) fails when tox.ini is not what the table generates.
"""

from __future__ import annotations

import sys

from . import releases

HEADER = """\
# GENERATED from releases.toml by `make tox.ini` - do not edit by hand.
[tox]
requires = tox>=4.20, tox-uv>=1.11
env_list = {env_list}
skip_missing_interpreters = false

[testenv]
runner = uv-venv-runner
package = skip
base_python = python3.11
# uv finds the local CPU torch through UV_FIND_LINKS (see Makefile); without it uv would fetch a CUDA build.
pass_env = UV_FIND_LINKS, UV_CACHE_DIR, SSL_CERT_FILE, HF_HOME, ST_PATCH_CACHE, CONFORMANCE_*
set_env =
    HF_HUB_OFFLINE = 1
    TRANSFORMERS_OFFLINE = 1
    UV_COMPILE_BYTECODE = 1
    PYTHONDONTWRITEBYTECODE =
commands =
    python scripts/st-patch apply --target {{envsitepackagesdir}}
    python -m pytest conformance -n {{env:CONFORMANCE_WORKERS:2}} -q -p no:cacheprovider \\
        --junitxml results/{{env_name}}.xml --conformance-json results/{{env_name}}.json {{posargs}}
"""

ENV = """
[testenv:st-{version}]
deps =
{deps}
"""

COMMON = ("torch==2.13.0", "pytest", "pytest-xdist", "packaging")


def render() -> str:
    table = releases.load()
    text = HEADER.format(env_list=", ".join(f"st-{r.version}" for r in table))
    for release in table:
        deps = [f"sentence-transformers=={release.version}", *release.pins, *COMMON]
        text += ENV.format(version=release.version, deps="\n".join(f"    {d}" for d in deps))
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = releases.ROOT / "tox.ini"
    text = render()
    if argv == ["--check"]:
        if not path.exists() or path.read_text() != text:
            print("tox.ini is not what releases.toml generates; run `make tox.ini`")
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
