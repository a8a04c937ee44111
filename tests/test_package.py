"""popo_lite as an installed package: a wheel holding every subpackage and the bundled data, and its
console commands working from a fresh virtualenv, run from outside the repository.

The fresh venv gets torch and the rest through a .pth file naming this venv's site-packages (no 2 GB
reinstall, no network): only popo_lite itself comes from the wheel, and the test checks it is that copy
that gets imported, not the repository's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("core", "engine", "training", "evaluation", "planning", "panel", "data")
COMMANDS = ("popo-train", "popo-evaluate", "popo-plan", "popo-panel")


def test_the_panel_takes_recipes_from_the_working_directory_then_the_clone(tmp_path, monkeypatch):
    from popo_lite.panel import launch

    monkeypatch.chdir(tmp_path)
    assert launch.build_parser().parse_args([]).configs_dir == str(ROOT / "configs")  # from a clone
    (tmp_path / "configs").mkdir()
    assert launch.build_parser().parse_args([]).configs_dir == "configs"
    (tmp_path / "configs").rmdir()
    monkeypatch.setattr(launch, "REPOSITORY_CONFIGS", tmp_path / "site-packages" / "configs")
    assert launch.build_parser().parse_args([]).configs_dir == "configs"  # installed: none, still opens


def _run(command: list, cwd: Path, env: dict, codes: tuple[int, ...] = (0,)) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode in codes, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_venv_and_its_commands_run_outside_the_repository(tmp_path):
    if importlib.util.find_spec("setuptools") is None:  # Python >= 3.12 venvs come without it
        pytest.skip("building the wheel offline needs setuptools in this venv (pip install setuptools)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", GRADIO_ANALYTICS_ENABLED="False")
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
    source, wheels, elsewhere = tmp_path / "source", tmp_path / "wheels", tmp_path / "elsewhere"
    shutil.copytree(ROOT / "popo_lite", source / "popo_lite", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", source)
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--quiet"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, source],
        tmp_path,
        env,
    )
    (wheel,) = wheels.glob("popo_lite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in SUBPACKAGES:
        assert f"popo_lite/{package}/__init__.py" in names, package
    bundled = ROOT / "popo_lite" / "data" / "bundled"
    for path in (p for p in bundled.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        assert path.relative_to(ROOT).as_posix() in names, path
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{command} = " in scripts for command in COMMANDS), scripts

    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], elsewhere, env).strip()
    )
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "project-venv.pth").write_text("".join(f"{path}\n" for path in ours))
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], elsewhere, env)

    bin_dir = fresh / "bin"
    assert "--config" in _run([bin_dir / "popo-train", "--help"], elsewhere, env)
    _run(
        [bin_dir / "popo-plan", "--config", ROOT / "configs" / "qwen2.5-math-7b-qlora.yaml"],
        elsewhere,
        env,
        (0, 1),
    )
    _run([bin_dir / "popo-evaluate", "--help"], elsewhere, env)
    assert "--configs-dir" in _run([bin_dir / "popo-panel", "--help"], elsewhere, env)
    _run([python, "-m", "popo_lite.train", "--help"], elsewhere, env)
    probe = (
        "import json, popo_lite\n"
        "from popo_lite.data.problems import load_problems\n"
        "from popo_lite.panel.launch import build_parser\n"
        "from popo_lite.panel.ui import build_panel\n"
        "configs = build_parser().parse_args([]).configs_dir\n"
        "build_panel('runs', configs)\n"  # no configs folder anywhere: no recipe, the panel still builds
        "print(json.dumps({'file': popo_lite.__file__, 'problems': len(load_problems('gsm8k_test')),"
        " 'configs': configs}))\n"
    )
    found = json.loads(_run([python, "-c", probe], elsewhere, env).splitlines()[-1])
    assert Path(found["file"]).is_relative_to(site), found  # the installed copy, not the repository
    assert found["problems"] > 0 and found["configs"] == "configs", found
