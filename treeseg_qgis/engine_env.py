"""The engine's private Python environment: where it lives, and the commands that make, repair and check it.

Standard library only. One virtual environment per plugin version in the QGIS profile folder
(`treeseg/engine-<version>`), made from the Python QGIS runs on with --system-site-packages, so the
engine sees QGIS's GDAL, numpy, scipy and matplotlib; pip adds torch, transformers and the rest at the
versions of requirements.txt and holds numpy and scipy at QGIS's versions. QGIS's own Python is never
modified. The set-up dialog (gui/engine_setup.py) runs the commands one by one through QProcess.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess  # nosec B404
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import __version__

PLUGIN_DIR = Path(__file__).resolve().parent
ENGINE_PACKAGES = ("torch", "transformers", "scikit-learn", "scikit-image", "huggingface_hub", "safetensors")
QGIS_PACKAGES = ("numpy", "scipy", "matplotlib")
CONSTRAINTS_FILE = "qgis-constraints.txt"
PYPI_INDEX = "https://pypi.org/simple"
TORCH_INDEX = "https://download.pytorch.org/whl/{build}"
CPU = "cpu"
# PyTorch 2.13's stable CUDA builds, newest first, and the oldest NVIDIA driver each runs on.
CUDA_BUILDS = (("cu130", (580,)), ("cu126", (525, 60)))
GPU_QUERY = ("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
CHECK_TIMEOUT_SECONDS = 30
QGIS_VERSIONS_SCRIPT = """import importlib, sys
pins = []
for name in ("numpy", "scipy"):
    try:
        pins.append(f"{name}=={importlib.import_module(name).__version__}\\n")
    except ImportError:
        pass
with open(sys.argv[1], "w", encoding="utf-8") as constraints:
    constraints.writelines(pins)
"""
BASE_PYTHON_CHECK = ("import sys; print('%d.%d' % sys.version_info[:2], flush=True); "
                     "import ensurepip, venv; ensurepip.version()")
ENGINE_CHECK = """import importlib, sys
missing = []
for name in ("torch", "transformers", "sklearn", "skimage", "scipy", "huggingface_hub", "safetensors",
             "matplotlib", "osgeo.gdal"):
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
if missing:
    sys.exit("This Python lacks what the TreeSeg engine needs: " + "; ".join(missing))
import torch, transformers
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}")
"""


class EngineEnvError(Exception):
    """The engine's environment cannot be made or changed; the message says what to do."""


@dataclass(frozen=True)
class Step:
    """One command of a plan: what it does, in words, and its command line (run without a shell)."""

    title: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class Gpu:
    """An NVIDIA GPU as nvidia-smi reports it."""

    name: str
    memory_mib: int
    driver: str


def engine_venv_dir(profile_dir: str | Path, version: str = __version__) -> Path:
    """The private environment of this plugin version in a QGIS profile folder."""
    return Path(profile_dir) / "treeseg" / f"engine-{version}"


def venv_python(venv_dir: Path, windows: bool = os.name == "nt") -> Path:
    """The Python inside a virtual environment."""
    return venv_dir / "Scripts" / "python.exe" if windows else venv_dir / "bin" / "python"


def process_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for the set-up commands: QGIS's, without PYTHONHOME (it would hide the venv),
    unbuffered so the log is live, and pip never waiting for input."""
    env = {name: value for name, value in environ.items() if name != "PYTHONHOME"}
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def base_python_candidates() -> list[str]:
    """Pythons that may be the one QGIS runs on (inside QGIS sys.executable is QGIS itself, so the
    interpreters under its prefix and on PATH are tried too); only files named python*."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    names = (f"python{version}", "python3", "python")
    paths = [getattr(sys, "_base_executable", ""), sys.executable]
    for prefix in dict.fromkeys((sys.base_prefix, sys.prefix, sys.exec_prefix)):
        paths += [os.path.join(prefix, "bin", name) for name in names]
        paths += [os.path.join(prefix, f"{name}.exe") for name in names[1:]]
    paths += [shutil.which(name) or "" for name in names]
    return [path for path in dict.fromkeys(paths)
            if path and Path(path).name.lower().startswith("python") and Path(path).is_file()]


def find_base_python(candidates: list[str] | None = None) -> str:
    """The first candidate of QGIS's Python version that can make a virtual environment (has venv and
    ensurepip); EngineEnvError with what to install otherwise."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    without_venv = []
    for candidate in base_python_candidates() if candidates is None else candidates:
        try:
            # A fixed argv: a local interpreter and a constant check, never a shell.
            result = subprocess.run([candidate, "-c", BASE_PYTHON_CHECK], capture_output=True, text=True,  # nosec B603
                                    timeout=CHECK_TIMEOUT_SECONDS, env=process_environment(os.environ))
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.stdout.strip().splitlines()[:1] != [version]:
            continue
        if result.returncode == 0:
            return candidate
        without_venv.append(candidate)
    if without_venv:
        raise EngineEnvError(
            f"{without_venv[0]} (Python {version}, the one QGIS runs on) cannot create virtual environments: "
            f"its venv or ensurepip module is missing. On Debian or Ubuntu install python3-venv "
            f"(sudo apt install python3-venv), then open this dialog again.")
    raise EngineEnvError(
        f"No Python {version} (the one QGIS runs on) was found to create the engine's environment. "
        f"Choose an existing environment with torch and transformers under Advanced instead.")


def gpu_query_command() -> list[str] | None:
    """The nvidia-smi command that lists the GPUs, or None without nvidia-smi."""
    program = shutil.which(GPU_QUERY[0])
    return [program, *GPU_QUERY[1:]] if program else None


def parse_gpus(output: str) -> list[Gpu]:
    """The GPUs in the output of GPU_QUERY ("NVIDIA H100 80GB HBM3, 81559 MiB, 580.65.06" per line)."""
    gpus = []
    for line in output.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3:
            continue
        name, memory, driver = fields
        digits = re.match(r"\d+", memory)
        gpus.append(Gpu(name, int(digits.group()) if digits else 0, driver))
    return gpus


def cuda_build(driver: str) -> str | None:
    """The PyTorch CUDA build (e.g. 'cu130') that runs on this NVIDIA driver version, or None when it
    is too old for all of them."""
    try:
        version = tuple(int(part) for part in driver.split(".")[:2])
    except ValueError:
        return None
    return next((build for build, oldest_driver in CUDA_BUILDS if version >= oldest_driver), None)


def requirements_file() -> Path:
    """requirements.txt: in the plugin folder when installed from the zip, beside it in a checkout."""
    for candidate in (PLUGIN_DIR / "requirements.txt", PLUGIN_DIR.parent / "requirements.txt"):
        if candidate.is_file():
            return candidate
    raise EngineEnvError(f"requirements.txt is missing from {PLUGIN_DIR}; reinstall the plugin.")


def engine_requirements(path: Path | None = None) -> list[str]:
    """The engine packages as requirements.txt pins them (e.g. 'torch==2.13.0'), in ENGINE_PACKAGES order."""
    pins = {}
    for line in (path or requirements_file()).read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        if name:
            pins[_normalise(name.group())] = requirement
    return [pins.get(_normalise(package), package) for package in ENGINE_PACKAGES]


def index_options(build: str) -> list[str]:
    """pip's index options: torch from PyTorch's index of `build` ('cpu', 'cu130'…), the rest from PyPI."""
    return ["--index-url", TORCH_INDEX.format(build=build), "--extra-index-url", PYPI_INDEX]


def check_command(python: str) -> tuple[str, ...]:
    """Runs `python` and fails with the missing modules unless it can run the engine."""
    return (python, "-c", ENGINE_CHECK)


def install_plan(venv_dir: Path, base_python: str, build: str, repair: bool = False) -> list[Step]:
    """The steps that make (or, with `repair`, remake) the environment with torch of `build`.

    Creating the venv again over an existing one keeps its packages and restores its interpreter and
    pip. Repair also reinstalls the engine packages themselves, which switches between CPU and CUDA."""
    python = str(venv_python(venv_dir))
    constraints = str(venv_dir / CONSTRAINTS_FILE)
    pip_install = (python, "-m", "pip", "install", *index_options(build), "--constraint", constraints)
    requirements = engine_requirements()
    torch_kind = "CPU" if build == CPU else f"CUDA, {build}"
    steps = [
        Step(f"Creating the virtual environment {venv_dir}",
             (base_python, "-m", "venv", "--system-site-packages", str(venv_dir))),
        Step("Holding numpy and scipy at QGIS's versions", (base_python, "-c", QGIS_VERSIONS_SCRIPT, constraints)),
    ]
    if repair:
        steps.append(Step("Reinstalling the engine packages",
                          (*pip_install, "--force-reinstall", "--no-deps", *requirements)))
    steps += [
        Step(f"Installing torch ({torch_kind}), transformers, scikit-learn, scikit-image (a large download)",
             (*pip_install, *requirements, *QGIS_PACKAGES)),
        Step("Checking the engine", check_command(python)),
    ]
    return steps


def remove_environment(venv_dir: Path) -> None:
    """Delete the private environment; refuses a folder that is not treeseg/engine-*."""
    if not (venv_dir.name.startswith("engine-") and venv_dir.parent.name == "treeseg"):
        raise EngineEnvError(f"{venv_dir} is not an engine environment made by TreeSeg; it was not removed.")
    if venv_dir.exists():
        shutil.rmtree(venv_dir)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
