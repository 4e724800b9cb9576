"""Result summaries that say where they came from, so that a stale one cannot pass for current.

A long computation (the full ablation grid: about an hour on two cores) cannot run inside
``make book``. Its small summary is kept in the repository instead, with the command, git
commit, machine, time, profile and a hash of the package's code that made it.
:func:`read_summary` hands it back with the list of reasons it is stale (other code, another
profile), which the book prints above the numbers.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from referseg.config import Profile, profile_changes
from referseg.io import PRESENTATION, atomic_write_text, code_hash


def git_commit(root: Path) -> str:
    """The checkout's commit, with ``+changes`` when the work tree differs from it; ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "referseg"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def changed_modules(commit: str) -> list[str]:
    """The package's hashed modules (all but ``PRESENTATION``) that differ between ``commit`` and
    the work tree, from git; empty when git cannot tell (no repository, unknown commit, or a commit
    that was itself made with uncommitted changes)."""
    root = Path(__file__).resolve().parents[1]
    if not commit or commit == "unknown" or commit.endswith("+changes"):
        return []
    try:
        names = subprocess.run(["git", "diff", "--name-only", commit, "--", "referseg"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.split()
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "referseg"], cwd=root,
                                   capture_output=True, text=True, timeout=10, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return []
    hashed = []
    for name in sorted(set(names) | set(untracked)):
        inside = name.removeprefix("referseg/")
        if name.endswith(".py") and not any(inside == part or (part.endswith("/") and inside.startswith(part))
                                            for part in PRESENTATION):
            hashed.append(name)
    return hashed


def machine() -> str:
    """The CPU model and core count (the timings in a summary depend on them)."""
    import os

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def write_summary(path: str | Path, payload: dict[str, Any], profile: Profile, started: float,
                  command: list[str] | None = None) -> Path:
    """``payload`` plus its provenance, written atomically as JSON."""
    path = Path(path)
    record = {
        "provenance": {
            "command": " ".join(command if command is not None else ["referseg", *sys.argv[1:]]),
            "commit": git_commit(Path(__file__).resolve().parents[1]),
            "code_hash": code_hash(),  # the package less its presentation modules (referseg.io.PRESENTATION)
            "machine": machine(),
            "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "seconds": round(time.time() - started, 1),
            "profile": json.loads(json.dumps(profile.to_dict())),
        },
        **payload,
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def read_summary(path: str | Path, profile: Profile, chosen: tuple[str, ...] = ()) -> tuple[dict[str, Any] | None,
                                                                                         list[str]]:
    """``(summary, reasons it is stale)``; ``(None, [])`` when there is no file. ``chosen``: profile
    fields (``stage1.lr``) that the summary itself chose, so the profile may since have taken them."""
    path = Path(path)
    if not path.is_file():
        return None, []
    summary = json.loads(path.read_text())
    origin = summary.get("provenance", {})
    stale = []
    if origin.get("code_hash") != code_hash():
        changed = changed_modules(origin.get("commit", "unknown"))
        stale.append(f"it was made by other code (commit {origin.get('commit', 'unknown')}): "
                     + (f"since then {', '.join(changed)} changed" if changed else
                        f"the package's training and evaluation code (all but {', '.join(PRESENTATION)}) has "
                        "changed since"))
    saved = origin.get("profile")
    changes = profile_changes(Profile.from_dict(saved), profile) if saved else {"profile": "missing"}
    changes = {key: value for key, value in changes.items() if key not in chosen}
    if changes:
        stale.append("it was made with another profile (" + ", ".join(f"{k}: now {v!r}" for k, v in changes.items())
                     + ")")
    return summary, stale
