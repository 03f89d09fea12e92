"""settings.ini is nbdev's source of the package's metadata; pyproject.toml copies what uv and pip read
without running setup.py (name, version, Python, requirements, extras). These tests parse both files and
check they agree, then build the package's metadata with setuptools (as `pip install -e .` does) and check
what it declares, and that README's commands leave nothing for git to track.
"""

import configparser
import email
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.fixture(scope="module")
def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_agrees_with_settings(settings, pyproject):
    project = pyproject["project"]
    assert project["name"] == settings["lib_name"]
    assert project["version"] == settings["version"]
    assert project["requires-python"] == ">=" + settings["min_python"]
    assert project["dependencies"] == settings["requirements"].split()
    extras = project["optional-dependencies"]
    assert extras.keys() == {"hf", "dev"}
    assert extras["hf"] == settings["hf_requirements"].split()
    # the dev extra is every tool and the Hugging Face bridge: the tests exercise both
    assert extras["dev"] == settings["dev_requirements"].split() + settings["hf_requirements"].split()


def test_uv_installs_the_dev_extra_by_default(pyproject):
    # `uv run` syncs the default groups (["dev"] unless tool.uv.default-groups says otherwise)
    assert pyproject.get("tool", {}).get("uv", {}).get("default-groups", ["dev"]) == ["dev"]
    assert pyproject["dependency-groups"]["dev"] == [f"{pyproject['project']['name']}[dev]"]


def test_version_in_package_agrees(settings):
    init = (ROOT / settings["lib_path"] / "__init__.py").read_text(encoding="utf-8")
    assert f'__version__ = "{settings["version"]}"' in init


def test_setuptools_builds_the_metadata_pip_installs(settings, tmp_path):
    """The metadata `pip install -e .` installs, built by setuptools from a copy of the project (the build
    writes an egg-info folder beside setup.py): requirements from pyproject.toml, the rest from setup.py."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "settings.ini", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / settings["lib_path"], src / settings["lib_path"], ignore=shutil.ignore_patterns("__pycache__")
    )
    build = "import sys, setuptools.build_meta as b; sys.stdout.write(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", build, str(tmp_path)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # no setuptools warning either (errors under -W)
    dist_info = tmp_path / proc.stdout.strip().splitlines()[-1]
    meta = email.message_from_string((dist_info / "METADATA").read_text(encoding="utf-8"))
    assert meta["Name"] == settings["lib_name"] and meta["Version"] == settings["version"]
    assert meta["Requires-Python"] == ">=" + settings["min_python"]
    assert meta["Summary"] == settings["description"]
    required = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    assert [str(r) for r in required if r.marker is None] == [
        str(Requirement(r)) for r in settings["requirements"].split()
    ]
    for extra in ("hf", "dev"):
        assert any(r.marker and r.marker.evaluate({"extra": extra}) for r in required), extra
    # nbdev finds the package's symbol index through this entry point
    assert "[nbdev]" in (dist_info / "entry_points.txt").read_text()


def _ignored(paths: list[str]) -> set[str]:
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    return set(proc.stdout.split())


def test_what_readme_commands_write_is_ignored():
    outputs = [
        ".venv/bin/python",  # python -m venv .venv, uv run
        "uv.lock",  # uv run
        "data/tokenized/pystdlib_train.uint16.npy",  # quickstart, prepare
        "data/gpt2_tokenizer/vocab.json",
        "checkpoints/quickstart/checkpoint_100.pt",  # train
        "checkpoints/quickstart/curves.png",  # plot
        "checkpoints/quickstart/wandb/offline-run-1/run.wandb",  # --wandb
        "hf/quickstart/model.safetensors",  # export
        "slurm-4242.out",  # sbatch scripts/multinode.slurm
        "cs336_nb.egg-info/PKG-INFO",  # pip install -e .
    ]
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert _ignored(outputs) == set(outputs)
    kept = ["nbs/data/gpt2_vocab.json", "configs/quickstart.json", "pyproject.toml", "scripts/multinode.slurm"]
    assert _ignored(kept) == set()
