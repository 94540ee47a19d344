"""Which series a target gets: the step both backends share.

The release is read from the target's ``__version__`` and looked up in the manifest; ``--series``
overrides it; a release the manifest does not know is matched by file content, and ``check``
explains the closest series and which hunks fail (the drift report). A native release without a
fix series needs nothing. The result is a ``Context`` a backend works on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from . import manifest as mf
from . import targets as tg
from .outcome import NATIVE, InputError, Outcome, Refusal, ReleaseInfo


@dataclass
class Context:
    """Everything a backend needs for one command."""

    command: str
    manifest: mf.Manifest
    target: tg.Target
    series: mf.Series
    version: str
    outcome: Outcome

    @property
    def detected(self) -> str | None:
        return self.outcome.release.detected if self.outcome.release else None


def _release_info(version: str, release: mf.Entry | None, series: mf.Series | None, how) -> ReleaseInfo:
    return ReleaseInfo(
        version=version,
        support=release.support if release else ("patched" if series else "unknown"),
        series=series.name if series else None,
        patches=list(series.patches) if series else [],
        detected=how,
    )


def resolve(command: str, manifest: mf.Manifest, target: tg.Target, series_name: str | None, out: Outcome):
    """The Context for ``target``, or None when the release is native and has no fix series (``out``
    then says so). Raises InputError / Refusal."""
    version = target.version
    if not version:
        raise InputError("cannot find __version__ in %s" % (target.package_dir / "__init__.py"))
    release = manifest.lookup(version)
    if series_name:
        if series_name not in manifest.series:
            raise InputError(
                "unknown series {!r}; the manifest has: {}".format(series_name, ", ".join(sorted(manifest.series)))
            )
        series, how = manifest.series[series_name], "option"
    elif release is not None and release.support == NATIVE and not release.series:
        out.release = _release_info(version, release, None, "manifest")
        out.state = NATIVE
        out.action = "none"
        out.note(
            "sentence-transformers {} supports MatryoshkaLoss with cached losses natively: nothing to {}".format(
                version, "do" if command in ("status", "check") else command
            )
        )
        return None
    elif release is not None:  # a backport series, or the fix series of a native release
        series, how = manifest.series[release.series], "manifest"
    else:
        series, how = _unknown_release(command, manifest, target, version, out)
    out.release = _release_info(version, release, series, how)
    mf.check_patch_files(series)
    return Context(command, manifest, target, series, version, out)


def _unknown_release(
    command: str, manifest: mf.Manifest, target: tg.Target, version: str, out: Outcome
) -> Tuple[mf.Series, str]:
    matches = tg.detect_by_content(target, manifest)
    if len(matches) == 1:
        out.note(
            f"sentence-transformers {version} is not in the manifest, but its files match series {matches[0]} "
            "exactly: using it (detected by content)"
        )
        return manifest.series[matches[0]], "content"
    ranking = tg.rank_series(target, manifest)
    candidates = [{"series": name, "releases": manifest.series[name].releases, **counts} for name, counts in ranking]
    text = "sentence-transformers {} (__version__ in {}) is not in the manifest {}. Supported releases: {}.".format(
        version, target.package_dir / "__init__.py", manifest.path, manifest.supported_text()
    )
    if len(matches) > 1:
        text += " Its files match several series exactly ({}): pass --series NAME.".format(", ".join(matches))
    elif command == "check":
        text += _closest_text(manifest, target, candidates, out)
        text += " If this is a fork of a supported release, pass --series NAME."
    else:
        text += " Run `st-patch check` to see which series comes closest by file content."
    out.release = ReleaseInfo(version=version, support="unknown", series=None, patches=[], detected=None)
    drift = None
    if command == "check":  # which hunks fail, and whether the release is native already
        from . import drift as dr

        drift = dr.drift_report(target.root, manifest)
        out.note(dr.format_text(drift))
    raise Refusal(text, candidates=candidates if command == "check" else None, drift=drift)


def _closest_text(manifest: mf.Manifest, target: tg.Target, candidates: List[dict], out: Outcome) -> str:
    close = [c for c in candidates if c["evidence"]]
    if not close:
        return " No series matches its files."
    out.files = [s.report() for s in tg.classify(target, manifest.series[close[0]["series"]])]
    return (
        " Closest series by file content: "
        + "; ".join(
            "{} (releases {}): {} of {} files pristine, {} patched".format(
                c["series"], ", ".join(c["releases"]) or "-", c["pristine"], c["files"], c["patched"]
            )
            for c in close[:3]
        )
        + "."
    )
