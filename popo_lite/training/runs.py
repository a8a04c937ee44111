"""Run directories on disk, read for the web panel: UI-free helpers (processes are in jobs.py).

The panel reads everything from `<root>/<run>/` (config.yaml, metrics.jsonl, rollouts.jsonl,
checkpoints/), so runs started from the CLI show up too. Why it is shaped as it is:

1. Every path built from browser input goes through `resolve_inside(root, ...)`: a run name is one plain
   folder name, and the resolved path (symlinks followed) must stay under the runs root.
2. Files inside a run folder are opened through `run_paths.py` only: a `train.log`, `rollouts.jsonl`,
   `config.yaml` or `checkpoints` that is a symlink (or not a regular file) is treated as absent by the
   views, and refused, by name, by anything that starts a job.
3. The trainer appends whole lines; a reader may see a half-written last line, which waits for its
   newline. Files are indexed by byte span per step and grown incrementally: a long run's
   rollouts.jsonl (B x G lines a step) is too big to parse on every refresh.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popo_lite.config import MAX_YAML_BYTES, parse_yaml_text
from popo_lite.config import RUN_NAME as NAME  # the config refuses the run names the panel won't list
from popo_lite.training.run_paths import RunsError, file_path, open_file, scan_checkpoints

__all__ = ["RunsError"]  # defined in run_paths.py, imported from here by the panel
FILTERS = ("all", "only positives", "only zero-positive groups")


# --- paths -----------------------------------------------------------------------------------------


def check_name(name: str, what: str = "run name") -> str:
    """A plain folder name: letters, digits, '.', '_', '-'; no separators, no leading dot."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise RunsError(f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-' only")
    return name


def resolve_inside(root: str | Path, *parts: str) -> Path:
    """`root/parts...` resolved (symlinks followed); refuses anything that lands outside `root`."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path == base or not path.is_relative_to(base):
        raise RunsError(f"{'/'.join(parts)!r} is outside the runs folder")
    return path


def run_path(root: str | Path, name: str) -> Path:
    return resolve_inside(root, check_name(name))


def list_runs(root: str | Path) -> list[str]:
    """Run directories under `root` (those holding a config.yaml, a regular file), most recently active
    first. A run whose other files are links is listed: what would start a job then says what is wrong."""
    base = Path(root)
    if not base.is_dir():
        return []
    runs = []
    for child in base.iterdir():
        if not NAME.fullmatch(child.name):
            continue
        try:
            resolve_inside(base, child.name)  # a symlink out of the root is not a run of ours
            config = file_path(child, "config.yaml")
        except RunsError:
            continue
        if config is not None:
            times = [path.stat().st_mtime for path in (config, _regular(child, "metrics.jsonl")) if path]
            runs.append((max(times), child.name))
    return [name for _, name in sorted(runs, reverse=True)]


def _regular(run_dir: Path, name: str) -> Path | None:
    try:
        return file_path(run_dir, name)
    except RunsError:
        return None


def read_config(run_dir: Path, strict: bool = False) -> dict[str, Any]:
    """A run's config.yaml as a mapping; {} when it is missing, not readable or not a config (parsed
    as the CLI parses configs: bounded in size, no aliases). `strict`: a RunsError saying why instead,
    for what starts a job (a linked config.yaml read as {} would hide what the job then reads)."""
    try:
        text = read_run_text(run_dir, "config.yaml", limit=MAX_YAML_BYTES + 1, strict=strict)
        if text is None:
            if strict:
                raise RunsError(f"run {Path(run_dir).name!r} has no config.yaml")
            return {}
        return parse_yaml_text(text, str(Path(run_dir) / "config.yaml"))
    except ValueError as error:  # ConfigError and RunsError are ValueErrors
        if strict:
            raise RunsError(f"config.yaml of run {Path(run_dir).name!r}: {error}") from None
        return {}


def read_run_text(run_dir: Path, *parts: str, limit: int | None = None, strict: bool = False) -> str | None:
    """A run file's text (the first `limit` characters), None when it is missing, or a link, a folder or
    outside the run (`strict`: a RunsError naming it then)."""
    try:
        if file_path(run_dir, *parts) is None:
            return None
        with open_file(run_dir, *parts) as handle:
            return handle.read() if limit is None else handle.read(limit)
    except (RunsError, OSError) as error:
        if strict:
            raise RunsError(str(error) if isinstance(error, RunsError) else f"{parts[-1]}: {error}") from None
        return None


def list_checkpoints(run_dir: Path) -> list[str]:
    """Complete checkpoints (the trainer writes COMPLETE last), newest first; never a `.partial` folder,
    a link, nor a step beyond the run's `steps` (run_paths.scan_checkpoints)."""
    steps = read_config(run_dir).get("steps")
    found, _ = scan_checkpoints(run_dir, steps if isinstance(steps, int) else None)
    return [path.name for _, path in found]


# --- jsonl logs --------------------------------------------------------------------------------------


class _Index:
    """Byte spans of the complete lines of one jsonl file, grown as the file grows."""

    def __init__(self) -> None:
        self.identity: tuple[int, int] | None = None
        self.offset = 0
        self.spans: list[tuple[int, int, int]] = []  # (step, start, end) per complete line


_INDEXES: dict[Path, _Index] = {}
_INDEX_LOCK = threading.Lock()  # Gradio calls back from several threads
# A line longer than this is not a record (a rollout with a 32k-token completion is about 200 kB): a 300 MB
# metrics.jsonl without a newline was re-read on every Watch tick, 10 s each.
MAX_LINE_BYTES = 16_000_000
_STEP = re.compile(rb'\{"step": (\d+)')


def _indexed(path: Path) -> _Index:
    """Index new complete lines of `path`; restart when the file shrank or was replaced (resume truncates)."""
    index = _INDEXES.setdefault(path, _Index())
    try:
        if file_path(path.parent, path.name) is None:  # missing, or a link or not a file: not read
            raise FileNotFoundError(path)
        stat = path.stat()
    except (FileNotFoundError, RunsError):
        index.__init__()
        return index
    identity = (stat.st_dev, stat.st_ino)
    if identity != index.identity or stat.st_size < index.offset:
        index.__init__()
        index.identity = identity
    if stat.st_size == index.offset:
        return index
    with open_file(path.parent, path.name, mode="rb") as handle:
        handle.seek(index.offset)
        chunk = handle.read(stat.st_size - index.offset)
    end = chunk.rfind(b"\n") + 1  # a half-written last line waits for its newline
    if len(chunk) - end > MAX_LINE_BYTES:  # no record is this long: junk, passed over once, not every read
        end = len(chunk)
    start = 0
    for line in chunk[:end].split(b"\n")[:-1]:
        match = _STEP.match(line)
        step = int(match.group(1)) if match else _step_of(line)
        if step is not None:
            index.spans.append((step, index.offset + start, index.offset + start + len(line)))
        start += len(line) + 1
    index.offset += end
    return index


def _step_of(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _read_spans(path: Path, spans: list[tuple[int, int, int]]) -> list[dict]:
    if not spans:
        return []
    first, last = spans[0][1], spans[-1][2]
    try:
        with open_file(path.parent, path.name, mode="rb") as handle:
            handle.seek(first)
            data = handle.read(last - first)
    except (RunsError, OSError):  # replaced by a link since it was indexed
        return []
    records = []
    for _, start, end in spans:
        try:
            records.append(json.loads(data[start - first : end - first]))
        except ValueError:
            continue  # a corrupt line is skipped, not fatal
    return records


def read_jsonl(path: Path) -> list[dict]:
    """Every complete record of a jsonl file (a missing file is empty)."""
    with _INDEX_LOCK:
        spans = list(_indexed(path).spans)
    return _read_spans(path, spans)


def rollout_steps(run_dir: Path) -> list[int]:
    with _INDEX_LOCK:
        return sorted({step for step, _, _ in _indexed(run_dir / "rollouts.jsonl").spans})


def read_rollouts(run_dir: Path, step: int) -> list[dict]:
    """The rollouts of one step, read by byte span: rollouts.jsonl of a long run is too big to parse whole."""
    path = run_dir / "rollouts.jsonl"
    with _INDEX_LOCK:
        spans = [span for span in _indexed(path).spans if span[0] == step]
    return _read_spans(path, spans)


@dataclass
class Group:
    step: int
    group: int
    problem_id: str
    prompt: str
    gold: str
    rollouts: list[dict]  # positives first, then by weight; each gains "positive": bool
    positives: int = 0  # in the whole group, whatever the filter shows


def group_rollouts(records: list[dict], view: str = "all", threshold: float = 0.0) -> list[Group]:
    """Rollouts of one step as groups; `view` is one of FILTERS, `threshold` the run's reward_threshold."""
    if view not in FILTERS:
        raise RunsError(f"unknown filter {view!r}")
    groups: dict[int, Group] = {}
    for record in records:
        key = int(record.get("group", 0))
        if key not in groups:
            groups[key] = Group(
                int(record.get("step", 0)),
                key,
                str(record.get("problem_id", "")),
                str(record.get("prompt", "")),
                str(record.get("gold", "")),
                [],
            )
        record["positive"] = float(record.get("reward") or 0.0) > threshold
        groups[key].rollouts.append(record)
    result = []
    for key in sorted(groups):
        group = groups[key]
        group.rollouts.sort(key=lambda r: (not r["positive"], -float(r.get("weight") or 0.0)))
        positive = [r for r in group.rollouts if r["positive"]]
        group.positives = len(positive)
        if view == "only positives":
            if not positive:
                continue
            group.rollouts = positive
        elif view == "only zero-positive groups" and positive:
            continue
        result.append(group)
    return result
