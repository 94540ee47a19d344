"""``make bench`` on a machine that receives only this working tree (a GPU machine without network or tox).

Here: ``python -m tools.bench --prepare-remote bench-remote`` writes into ``bench-remote/`` (untracked and
not ignored, so it travels with the working tree; do not commit it) what the benchmark needs there
besides Python, torch and numpy:

- ``trees/``: the unpacked wheels of sentence-transformers 3.3.1 (its backport series applied), 3.4.0
  and 6.2.0 (as released);
- ``wheels/``: the pinned wheels of their other dependencies, one set for transformers 4 (3.3.1, 3.4.0)
  and one for transformers 5 (6.2.0), compiled ones for CPython 3.10-3.13 on x86_64 Linux;
- ``minilm/``: all-MiniLM-L6-v2's configuration and tokenizer, without its weights (87 MiB would not
  fit the transfer): the benchmark builds the architecture with random weights, labelled so. The
  time of a step does not depend on the values of the weights.

There: ``python -m tools.bench --device cuda --remote bench-remote --out DIR`` unpacks the wheel sets
into a scratch directory (standard library only, no pip) and runs every environment with the one
interpreter. scikit-learn, SciPy and Pillow are too big to carry; sentence-transformers imports them
only for evaluators and image models, which the benchmark does not run, so where they are missing the
worker imports placeholders for them (:func:`stub_missing`) and records that it did.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

#: Distributions every set needs (pure Python, or compiled per CPython version: see COMPILED).
COMMON = (
    "certifi==2026.10.19.post1",
    "charset_normalizer>=3.4",
    "filelock==4.3.1",
    "fsspec==2026.6.0",
    "idna==3.20",
    "packaging==26.4",
    "pyyaml>=6.0.2",
    "regex>=2025.10.22",  # transformers 5.24 needs it
    "requests==2.34.2",
    "tqdm==4.70.1",
    "typing_extensions==4.16.0",
    "urllib3==2.8.0",
)
#: The versions of this project's tox environments (st-3.3.1, st-3.4.0-upstream: transformers 4;
#: st-6.2.0-upstream: transformers 5).
SETS = {
    "tf4": ("transformers==4.57.6", "huggingface_hub==0.36.2", "tokenizers==0.22.2", "safetensors==0.8.0"),
    "tf5": (
        "transformers==5.24.0",
        "huggingface_hub==1.33.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "httpx==0.28.1",
        "httpcore==1.0.9",
        "h11==0.16.0",
        "anyio==4.16.0",
        "typer==0.29.2",
        "click==8.5.1",
        "shellingham==1.5.4",
        "annotated_doc==0.0.7",
    ),
}
SET_OF = {"3.3.1": "tf4", "3.4.0": "tf4", "6.2.0": "tf5", "6.2.0-series": "tf5", "6.2.0-fixes": "tf5"}
#: Distributions without an abi3 or pure-Python wheel: per CPython version the newest wheel that fits the
#: minimum (releases drop old Pythons, so one exact version has no wheel for every one).
COMPILED = {"charset_normalizer", "pyyaml", "regex"}
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PLATFORM = "manylinux2014_x86_64"
MINILM_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: What the transfer takes (64 MiB for the whole working tree), less room for the project itself.
LIMIT_BYTES = 58 * 2**20
#: Imported by sentence-transformers for evaluators and image models only; placeholders where missing.
STUBBABLE = ("sklearn", "scipy", "PIL")


def _download(requirements: list[str], dest: Path, python: str | None = None) -> None:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *requirements]
    if python:
        command += ["--only-binary=:all:", "--python-version", python, "--platform", PLATFORM]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(requirements)} failed:\n{result.stderr[-2000:]}")


def _name(requirement: str) -> str:
    return requirement.split("=")[0].split(">")[0].split("<")[0]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(dest: Path, trees_of, minilm_dir: str | None) -> dict:
    """Write trees, wheels and the MiniLM files into ``dest``; a manifest with their sizes."""
    if dest.exists():
        shutil.rmtree(dest)
    trees_of(dest / "trees")
    missing: list[str] = []
    for name, pins in {"common": COMMON, **SETS}.items():
        plain = [p for p in pins if _name(p) not in COMPILED]
        _download(plain, dest / "wheels" / name)
        compiled = [p for p in pins if _name(p) in COMPILED]
        for python in PYTHONS if compiled else ():
            try:
                _download(compiled, dest / "wheels" / name, python)
            except RuntimeError as exc:
                missing.append(f"CPython {python}: {str(exc).splitlines()[-1]}")
    if minilm_dir:
        (dest / "minilm").mkdir()
        for name in MINILM_FILES:
            if (Path(minilm_dir) / name).exists():
                shutil.copy(Path(minilm_dir) / name, dest / "minilm" / name)
    sizes = {p.name: _size(p) for p in sorted(dest.iterdir())}
    manifest = {"sizes": sizes, "total": sum(sizes.values()), "limit": LIMIT_BYTES, "sets": SET_OF}
    manifest["pythons"] = [p for p in PYTHONS if not any(m.startswith(f"CPython {p}:") for m in missing)]
    manifest["missing"] = missing
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if manifest["total"] > LIMIT_BYTES:
        raise RuntimeError(
            f"{dest}: {manifest['total'] / 2**20:.1f} MiB, more than the {LIMIT_BYTES >> 20} MiB allowed"
        )
    return manifest


def _tags(wheel: str) -> tuple[str, str, str]:
    python, abi, plat = wheel[: -len(".whl")].split("-")[-3:]
    return python, abi, plat


def compatible(wheel: str, version: tuple[int, int] | None = None, machine: str | None = None) -> bool:
    """Whether this interpreter can import the wheel (the tags this benchmark's wheels use)."""
    major, minor = version or sys.version_info[:2]
    python, abi, plat = _tags(wheel)
    if plat != "any" and (machine or platform.machine()) not in plat:
        return False
    if abi == "none":
        return any(t in ("py3", "py2") or t == f"cp{major}{minor}" for t in python.split("."))
    if abi == "abi3":
        return int(python[len("cp3") :]) <= minor and major == 3
    return abi == f"cp{major}{minor}"


def install(remote: Path, scratch: Path) -> dict[str, Path]:
    """Unpack the common wheels and each set into ``scratch/<set>`` (a site directory per set)."""
    sites = {}
    for name in SETS:
        site = scratch / name
        for group in ("common", name):
            for wheel in sorted((remote / "wheels" / group).glob("*.whl")):
                if compatible(wheel.name):
                    with zipfile.ZipFile(wheel) as archive:
                        archive.extractall(site)
        sites[name] = site
    return sites


class _Placeholder:
    """Stands for any name of a missing optional module: importing works, using it raises."""

    def __init__(self, *args, **kwargs) -> None:
        raise ImportError("a placeholder of the benchmark (tools/bench_remote.py): this module is not installed")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: _Placeholder if not attr.startswith("__") else _missing(attr)
        return module

    def exec_module(self, module) -> None:
        pass


def _missing(attr: str):
    raise AttributeError(attr)


def stub_missing() -> list[str]:
    """Placeholders for the modules of :data:`STUBBABLE` that are not installed; the ones stubbed."""
    missing = {name for name in STUBBABLE if importlib.util.find_spec(name) is None}
    if missing:
        sys.meta_path.append(_StubFinder(missing))
    return sorted(missing)
