"""What a config sent from the browser may name: the one rule, applied to every config the panel starts,
resumes, plans or evaluates (jobs.py calls `check_browser_config` before anything is spawned or written).

A path-valued field (`model`, `gguf_file`, `dataset`, each `eval_benchmarks` entry, `output_dir`) must be

1. a bundled name (`popo_lite.data.problems.BUNDLED`; `popo_lite.config.EMBEDDED_MODEL` for the model),
2. or a Hub id, `name` or `org/name` (letters, digits, '.', '_', '-'; no leading '/', '.', '~' or '-',
   no '..') that is not also an existing local path (the loaders would read the local one),
3. or a path that resolves (relative to the panel's working directory, as the job resolves it, `~`
   expanded, symlinks followed) inside the runs folder, the configs folder or a folder given at panel
   start with `--allow-path DIR`.

`gguf_file` is a file name inside the model folder (no separator), itself under rule 3 when it exists;
`output_dir` must be the runs folder itself (the panel decides where its runs live);
`trust_remote_code: true` is refused unless the panel was started with `--allow-remote-code`.
The command line (`python -m popo_lite.train`) is not the browser: none of this applies there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popo_lite.config import EMBEDDED_MODEL
from popo_lite.data.problems import BUNDLED
from popo_lite.training.runs import RunsError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
# field -> the bundled names it accepts
NAMED_FIELDS = {"model": (EMBEDDED_MODEL,), "dataset": tuple(BUNDLED), "eval_benchmarks": tuple(BUNDLED)}
FOLDERS = "the runs folder, the configs folder or a folder given with --allow-path"


@dataclass(frozen=True)
class BrowserAccess:
    """What the panel was started with beyond its runs folder: the configs folder, `--allow-path`
    folders and `--allow-remote-code`. The default allows the runs folder alone."""

    configs: Path | None = None
    allowed: tuple[Path, ...] = field(default_factory=tuple)
    remote_code: bool = False

    def check(self, values: Mapping[str, Any], root: str | Path) -> None:
        check_browser_config(values, root, self.configs, self.allowed, remote_code=self.remote_code)


def check_browser_config(
    values: Mapping[str, Any],
    root: str | Path,
    configs: str | Path | None = None,
    allowed: Iterable[str | Path] = (),
    *,
    remote_code: bool = False,
) -> None:
    """Raise a RunsError naming the first field of `values` (config keys, as sent from the browser) that
    breaks the rule of this module; return None when every field keeps to it."""
    root = Path(root).resolve()
    folders = [root, *(Path(f).expanduser().resolve() for f in (configs, *allowed) if f is not None)]
    for name, bundled in NAMED_FIELDS.items():
        value = values.get(name)
        if value is None:
            continue
        entries = value if isinstance(value, list) and name == "eval_benchmarks" else [value]
        label = f"{name} entry" if name == "eval_benchmarks" else name
        for entry in entries:
            _check_source(label, entry, bundled, folders)
    gguf = values.get("gguf_file")
    if gguf is not None:
        if not isinstance(gguf, str) or not gguf or Path(gguf).name != gguf or gguf in (".", ".."):
            raise RunsError(
                f"gguf_file {gguf!r} is not allowed from the browser: give a file name inside the model "
                "folder, without a folder part"
            )
        model = values.get("model")
        if isinstance(model, str) and model != EMBEDDED_MODEL:
            inside_model = Path(model).expanduser() / gguf
            if os.path.lexists(inside_model) and not _inside(inside_model, folders):
                raise RunsError(
                    f"gguf_file {gguf!r} is not allowed from the browser: it resolves outside {FOLDERS}"
                )
    output = values.get("output_dir")
    if output is not None and not (isinstance(output, str) and _resolved(output) == root):
        raise RunsError(
            f"output_dir {output!r} is not allowed from the browser: a panel run lives in the runs folder "
            f"({root}); leave output_dir out"
        )
    if values.get("trust_remote_code") not in (None, False) and not remote_code:
        raise RunsError(
            "trust_remote_code: true is not allowed from the browser: it runs a model's own code; start the "
            "panel with --allow-remote-code to allow it"
        )


def _check_source(label: str, value: Any, bundled: tuple[str, ...], folders: list[Path]) -> None:
    if not isinstance(value, str):
        raise RunsError(f"{label} {value!r} is not allowed from the browser: expected a name or a path")
    if value in bundled:
        return
    if HUB_ID.fullmatch(value) and ".." not in value and not _exists(value):
        return  # a Hub id: nothing local is read
    if _inside(value, folders):
        return
    raise RunsError(
        f"{label} {value!r} is not allowed from the browser: use a bundled name, a Hub id (org/name) or a "
        f"path inside {FOLDERS} (symlinks followed)"
    )


def _resolved(value: str | Path) -> Path | None:
    """`value` as the job resolves it: `~` expanded, relative to this working directory, links followed."""
    try:
        return Path(value).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte, an unknown ~user
        return None


def _exists(value: str) -> bool:
    try:
        return os.path.lexists(Path(value).expanduser())
    except (OSError, RuntimeError, ValueError):
        return True  # not a clean Hub id either: let the path check refuse it


def _inside(value: str | Path, folders: list[Path]) -> bool:
    path = _resolved(value)
    return path is not None and any(path.is_relative_to(folder) for folder in folders)
