"""The engine's private Python environment: where it lives, and the commands that make, check and swap it in.

Standard library only. An engine is a virtual environment in the QGIS profile folder
(`treeseg/engine-<build>-<hash>`), keyed by what is installed in it (the pinned packages, the torch build
and the Python version), not by the plugin version: an upgrade with the same pins keeps the engine. It
is made from QGIS's own Python with --system-site-packages, so it sees QGIS's GDAL, numpy, scipy and
matplotlib; pip, as the user configured it, adds torch, transformers and the rest and holds numpy and
scipy at QGIS's versions. Every index pip will use is probed first (seconds, not pip's minutes of retries).
It is built in a staging folder, checked (imports and one tiny DINOv3 forward through the product's loader),
and only then moved into place with a ready marker (the previous engine comes back if that move fails); a
folder without the marker, or made for another Python version, is never used. The set-up dialog
(gui/engine_setup.py) runs the commands one by one through QProcess.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess  # nosec B404
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..memory import disk_free_bytes

PLUGIN_DIR = Path(__file__).resolve().parents[1]
ENGINE_PACKAGES = ("torch", "transformers", "scikit-learn", "scikit-image", "huggingface_hub", "safetensors",
                   "onnxruntime", "onnx", "dask")
QGIS_PACKAGES = ("numpy", "scipy", "matplotlib")
CONSTRAINTS_FILE = "qgis-constraints.txt"
READY_MARKER = "treeseg-engine-ready.json"
ENGINES_FOLDER = "treeseg"
TORCH_INDEX = "https://download.pytorch.org/whl/{build}"
CPU = "cpu"
# PyTorch 2.13's stable CUDA builds, newest first, and the oldest NVIDIA driver each runs on.
CUDA_BUILDS = (("cu130", (580,)), ("cu126", (525, 60)))
GPU_QUERY = ("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader")
# Free disk space asked for before a set-up: the environment, pip's cache of the wheels, and a margin.
REQUIRED_FREE_BYTES = {CPU: 3 * 1024**3}
REQUIRED_FREE_BYTES_CUDA = 10 * 1024**3
CHECK_TIMEOUT_SECONDS = 30
# Each index is probed once before pip runs; pip itself gives up on a connection after 2 retries of 10 s at most
# (its defaults, 5 retries of 15 s, cost minutes per package on a dead index).
PROBE_TIMEOUT_SECONDS = 5
PIP_NETWORK_OPTIONS = ("--retries", "2", "--timeout", "10")
PYPI = "https://pypi.org/simple"
PROBE_RESULT = "treeseg-index-probe: "
PROBE_INDEX_UNREACHABLE = 2
PROBE_EXTRA_UNREACHABLE = 3
# What each step of a set-up plan does (Step.kind).
VENV, PROBE, PINS, PIP, CHECK, SWAP = "venv", "probe", "pins", "pip", "check", "swap"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
# The environment markers requirements.txt may put on a line (engine_requirements).
MARKER_VARIABLES = ("python_version", "sys_platform", "platform_machine")
TROUBLESHOOTING_URL = "https://github.com/treeseg-qgis/treeseg-qgis#engine-troubleshooting"
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
# QGIS's Python must have its version and GDAL, be able to make virtual environments, and make ones that start on
# their own (without PYTHONHOME, as the engine worker runs): some app-bundle wrappers make venvs that cannot find
# the standard library.
BASE_PYTHON_CHECK = """import os, subprocess, sys, tempfile
print("%d.%d" % sys.version_info[:2], flush=True)
try:
    from osgeo import gdal
except Exception as error:
    sys.exit(f"no osgeo.gdal ({type(error).__name__}: {error})")
print("gdal", gdal.__version__, flush=True)
import ensurepip, venv
ensurepip.version()
with tempfile.TemporaryDirectory() as folder:
    venv.create(folder, system_site_packages=True, with_pip=False, symlinks=os.name != "nt")
    python = os.path.join(folder, "Scripts", "python.exe") if os.name == "nt" else os.path.join(folder, "bin", "python")
    alone = {name: value for name, value in os.environ.items() if name != "PYTHONHOME"}
    trial = subprocess.run([python, "-c", "import encodings, osgeo.gdal"], env=alone, capture_output=True, text=True)
if trial.returncode:
    print("broken venv:", (trial.stderr.strip().splitlines() or ["it does not start"])[-1], flush=True)
    sys.exit(1)
"""
ENGINE_CHECK = """import importlib, sys, tempfile
sys.path.insert(0, sys.argv[1])
missing = []
for name in ("torch", "transformers", "sklearn", "skimage", "scipy", "huggingface_hub", "safetensors",
             "matplotlib", "PIL", "osgeo.gdal", "distributed"):
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
if missing:
    sys.exit("This Python lacks what the TreeSeg engine needs: " + "; ".join(missing))
import torch, transformers
if sys.argv[2:] == ["cpu"] and torch.version.cuda:
    sys.exit(f"torch {torch.__version__} is a CUDA build (CUDA {torch.version.cuda}) in a CPU engine.")
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from treeseg_qgis.engine.core.models import load_backbone
with tempfile.TemporaryDirectory() as folder:
    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=16, num_register_tokens=4)
    DINOv3ViTModel(config).save_pretrained(folder)
    backbone = load_backbone(folder, device="cpu")
    with torch.no_grad():
        tokens = backbone.model(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state.shape[1]
if tokens != 1 + 4 + 4:
    sys.exit(f"A tiny DINOv3 forward gave {tokens} tokens instead of 9.")
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"CUDA available: {torch.cuda.is_available()}; a tiny DINOv3 forward ran.")
"""
# The probe and the swap run this module's functions in another Python (the new environment's, QGIS's).
PROBE_RUNNER = """import sys
sys.path.insert(0, sys.argv[1])
from treeseg_qgis.qgis_side.engine_env import probe_main
sys.exit(probe_main(sys.argv[2]))
"""
SWAP_RUNNER = """import sys
sys.path.insert(0, sys.argv[1])
from treeseg_qgis.qgis_side.engine_env import EngineEnvError, swap_in
try:
    swap_in(*sys.argv[2:5])
except EngineEnvError as error:
    sys.exit(str(error))
print("The engine is in place:", sys.argv[3])
"""
# What pip's log says, in words, most specific cause first: a conflict or a missing version is named even when
# the log also holds retry warnings. {button} is the button that tries again.
PIP_FAILURES = (
    (r"No space left on device|Errno 28", "The disk is full: free some space (see the folder above), then {button}."),
    (r"ResolutionImpossible|conflicting dependencies",
     "The pinned packages conflict with each other or with what QGIS's Python already has; the log names them."),
    (r"No matching distribution found for torch==\S+\+cpu",
     "torch's CPU build (a version ending in +cpu) is on none of your package indexes; PyPI has only the CUDA "
     "build for Linux (several GB). Set the torch index to PyTorch's CPU index "
     "(https://download.pytorch.org/whl/cpu) or your organisation's mirror of it, then {button}."),
    (r"satisfies the requirement torch\S*\s*\(from versions: (?!none\))",
     "There is no torch wheel for this Python and platform at the version required on the index: check the "
     "torch index below, or use an existing environment (Advanced)."),
    (r"satisfies the requirement \S+\s*\(from versions: (?!none\))",
     "A package was not found on the index at the version required: check the index (PIP_INDEX_URL, pip.conf), "
     "then {button}."),
    (r"CERTIFICATE_VERIFY_FAILED|SSLError|SSL: ",
     "The package index's certificate was refused: behind an organisation's proxy, set pip's `cert` option "
     "(pip.conf) or PIP_CERT to your organisation's certificate bundle, then {button}."),
    (r"ProxyError|Tunnel connection failed|407 Proxy",
     "The proxy refused the connection: check pip's `proxy` option (pip.conf) or HTTPS_PROXY, then {button}."),
    (r"40[13] Client Error|403 Forbidden|401 Unauthorized",
     "The package index refused access (401/403): check the index address and its credentials in pip.conf "
     "or PIP_INDEX_URL, then {button}."),
    (r"NewConnectionError|Connection refused|Failed to establish a new connection|Name or service not known|"
     r"Temporary failure in name resolution|nodename nor servname|getaddrinfo failed|ConnectTimeout|"
     r"Read timed out|Max retries exceeded|Network is unreachable",
     "The package index could not be reached: no network, a proxy, or a wrong index address "
     "(PIP_INDEX_URL, pip.conf). Check the connection, then {button}."),
    (r"No matching distribution found for torch|Could not find a version that satisfies the requirement torch",
     "There is no torch wheel for this Python and platform on the index: check the torch index below, or "
     "use an existing environment (Advanced)."),
    (r"No matching distribution found|Could not find a version that satisfies",
     "A package was not found on the index: check the index (PIP_INDEX_URL, pip.conf), then {button}."),
)


class EngineEnvError(Exception):
    """The engine's environment cannot be made or changed; the message says what to do."""


@dataclass(frozen=True)
class Step:
    """One command of a plan: what it does, in words, its command line (run without a shell), its kind
    (VENV, PROBE, PINS, PIP, CHECK, SWAP; '' for a lone check) and environment variables it sets."""

    title: str
    command: tuple[str, ...]
    kind: str = ""
    environment: tuple[tuple[str, str], ...] = ()

    @property
    def swaps_engine(self) -> bool:
        """The step replaces the engine's files (the running engine must stop first; it is not cancelled)."""
        return self.kind == SWAP


@dataclass(frozen=True)
class Plan:
    """The steps that build an engine in `staging` and move it to `target`."""

    steps: list[Step]
    staging: Path
    target: Path


@dataclass(frozen=True)
class Gpu:
    """An NVIDIA GPU as nvidia-smi reports it."""

    name: str
    memory_mib: int
    driver: str


@dataclass(frozen=True)
class Engine:
    """A ready engine: its folder and what its marker records (the Python version it was made from included)."""

    folder: Path
    key: str
    build: str
    requirements: tuple[str, ...]
    python_version: str

    @property
    def python(self) -> Path:
        """The engine's interpreter."""
        return venv_python(self.folder)


@dataclass(frozen=True)
class IndexCheck:
    """One package index pip will use, where pip takes it from (in words), whether it is the torch index or one
    of the user's extra indexes, and why it could not be reached (None when it answered or was not probed)."""

    url: str
    source: str
    torch: bool = False
    problem: str | None = None
    extra: bool = False


def engines_dir(profile_dir: str | Path) -> Path:
    """The folder of a QGIS profile that holds the engines."""
    return Path(profile_dir) / ENGINES_FOLDER


def engine_key(requirements: Sequence[str], build: str, python_version: str | None = None) -> str:
    """`<build>-<hash>` of the pinned packages, the torch build and the Python version (e.g. cpu-3f2a9c1d0b)."""
    python_version = python_version or PYTHON_VERSION
    text = "\n".join([f"python {python_version}", f"torch {build}", *sorted(_normalise(r) for r in requirements)])
    return f"{build}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def venv_python(venv_dir: Path, windows: bool = os.name == "nt") -> Path:
    """The Python inside a virtual environment."""
    return venv_dir / "Scripts" / "python.exe" if windows else venv_dir / "bin" / "python"


def ready_engines(root: Path) -> list[Engine]:
    """The engines in `root` that carry the ready marker, for any Python version, newest first; a half-made folder
    is never listed."""
    engines = []
    for marker in root.glob(f"engine-*/{READY_MARKER}"):
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
            engine = Engine(marker.parent, str(record["key"]), str(record["build"]), tuple(record["requirements"]),
                            str(record["python"]))
            made = marker.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if engine.python.is_file():
            engines.append((made, engine))
    return [engine for _, engine in sorted(engines, key=lambda item: item[0], reverse=True)]


def engine_in_use(root: Path, requirements: Sequence[str] | None = None) -> Engine | None:
    """The engine to run: among the ready ones made from this Python version, the newest made for these
    requirements (any torch build), else the newest (made for other pins, until a new one is made). An engine
    made from another Python version (QGIS moved to a new Python) is never used."""
    engines = [engine for engine in ready_engines(root) if engine.python_version == PYTHON_VERSION]
    wanted = {_normalise(r) for r in (engine_requirements() if requirements is None else requirements)}
    matching = [engine for engine in engines if {_normalise(r) for r in engine.requirements} == wanted]
    return (matching or engines or [None])[0]


def other_python_engines(root: Path) -> list[Engine]:
    """The ready engines made from another Python version than QGIS's: stale, never used."""
    return [engine for engine in ready_engines(root) if engine.python_version != PYTHON_VERSION]


def leftover_folders(root: Path) -> list[Path]:
    """Folders a set-up left behind (staging-*: a build that was killed; old-*: an engine set aside and not yet
    deleted). Never used; safe to delete while no set-up runs."""
    if not root.is_dir():
        return []
    return sorted(folder for folder in root.iterdir() if folder.is_dir() and not folder.is_symlink()
                  and folder.name.startswith(("staging-", "old-")))


def set_aside(folder: Path) -> Path:
    """Rename a staging or engine folder to a free old-* name at once, so that deleting it can run in the
    background while a new set-up uses the old name; the new path."""
    for number in range(1000):
        aside = folder.with_name(f"old-{folder.name}" + (f"-{number}" if number else ""))
        if not aside.exists():
            os.rename(folder, aside)
            return aside
    raise EngineEnvError(f"{folder} could not be set aside: too many old-* folders beside it; delete them.")


def private_engine_python(profile_dir: str | Path) -> str | None:
    """The Python of the engine in use in a QGIS profile, or None when no ready engine is there."""
    try:
        engine = engine_in_use(engines_dir(profile_dir))
    except EngineEnvError:
        engine = None
    return str(engine.python) if engine else None


def bundled_python_home(python: str | Path, version: str = PYTHON_VERSION) -> Path | None:
    """For an interpreter inside a macOS app bundle (QGIS.app), the bundle's folder that holds Python's standard
    library (lib/python3.x/os.py): such interpreters may not start outside QGIS without it as PYTHONHOME. None
    for any other interpreter."""
    for bundle in (parent for parent in Path(python).parents if parent.suffix == ".app"):
        contents = bundle / "Contents"
        for home in (contents / "Frameworks" / "Python.framework" / "Versions" / version, contents / "Frameworks",
                     contents / "Resources", contents / "MacOS"):
            if (home / "lib" / f"python{version}" / "os.py").is_file():
                return home
    return None


def process_environment(environ: Mapping[str, str], python_home: Path | None = None) -> dict[str, str]:
    """The environment for the set-up commands: QGIS's (so the user's pip settings, proxy and certificates
    apply), PYTHONHOME only as `python_home` (a bundled macOS interpreter's own; QGIS's would hide a venv),
    unbuffered so the log is live, pip never waiting for input, and no hub access from the check."""
    env = {name: value for name, value in environ.items() if name != "PYTHONHOME"}
    if python_home is not None:
        env["PYTHONHOME"] = str(python_home)
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    return env


def command_environment(command: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """process_environment for running `command`: PYTHONHOME set when its program is a bundled macOS Python."""
    return process_environment(environ, bundled_python_home(command[0]))


def step_environment(step: Step, environ: Mapping[str, str]) -> dict[str, str]:
    """command_environment for a step, with the variables the step sets."""
    return {**command_environment(step.command, environ), **dict(step.environment)}


def qgis_python_candidates(system: str, version: str, python_prefixes: Sequence[str], qgis_prefix: str = "",
                           executable: str = "") -> list[Path]:
    """The interpreters QGIS itself may run on, for `system` (platform.system()), QGIS's Python `version`
    ('3.12'), its sys.base_prefix/prefix/exec_prefix, QGIS's install prefix and sys.executable; existing files
    only, never from PATH and never the Microsoft Store stub.

    Linux: <prefix>/bin/python3.x. Windows (OSGeo4W, standalone installer): <root>/apps/Python3xx/python.exe,
    root two levels above QGIS's apps/qgis*. macOS: the interpreter inside QGIS.app (its framework's first),
    the framework Python a QGIS.app runs on outside its bundle (MacPorts: /opt/local/Library/Frameworks/…), and
    <prefix>/bin/python3.x of a conda environment (conda-forge's QGIS, no .app)."""
    paths: list[Path] = []
    prefixes = [Path(prefix) for prefix in python_prefixes if prefix]
    if system == "Windows":
        nodot = version.replace(".", "")
        roots = [Path(qgis_prefix).parent.parent] if qgis_prefix else []
        roots += [prefix.parent.parent for prefix in prefixes if prefix.parent.name.lower() == "apps"]
        for root in dict.fromkeys(roots):
            paths.append(root / "apps" / f"Python{nodot}" / "python.exe")
            paths += sorted((root / "apps").glob("Python3*/python.exe"), reverse=True)
        paths += [prefix / "python.exe" for prefix in prefixes]
        paths = [path for path in paths if "windowsapps" not in (part.lower() for part in path.parts)]
    elif system == "Darwin":
        anchors = [Path(qgis_prefix)] if qgis_prefix else []
        anchors += [Path(executable)] if executable else []
        anchors += prefixes
        bundles = [parent for anchor in anchors for parent in (anchor, *anchor.parents) if parent.suffix == ".app"]
        for bundle in dict.fromkeys(bundles):
            macos = bundle / "Contents" / "MacOS"
            frameworks = bundle / "Contents" / "Frameworks"
            framework = frameworks / "Python.framework" / "Versions" / version
            paths += [framework / "bin" / f"python{version}", frameworks / "bin" / f"python{version}",
                      macos / "bin" / f"python{version}", macos / "bin" / "python3", macos / f"python{version}",
                      macos / "python3"]
        homes = [*prefixes, *([Path(qgis_prefix)] if qgis_prefix else [])]
        paths += [home / "bin" / f"python{version}" for home in homes
                  if any(parent.suffix == ".app" for parent in home.parents) or _is_framework_version(home)
                  or (home / "conda-meta").is_dir()]
    else:
        for prefix in [*prefixes, *([Path(qgis_prefix)] if qgis_prefix else [])]:
            paths += [prefix / "bin" / f"python{version}", prefix / "bin" / "python3"]
    return [path for path in dict.fromkeys(paths) if path.is_file()]


def _is_framework_version(folder: Path) -> bool:
    """`folder` is a Python.framework/Versions/3.x folder (a framework build's prefix, e.g. MacPorts')."""
    return folder.parent.name == "Versions" and folder.parent.parent.suffix == ".framework"


def base_python_candidates() -> list[Path]:
    """qgis_python_candidates for the running QGIS (its prefix from qgis.core when loaded)."""
    qgis_core = sys.modules.get("qgis.core")
    qgis_prefix = qgis_core.QgsApplication.prefixPath() if qgis_core is not None else ""
    return qgis_python_candidates(platform.system(), PYTHON_VERSION,
                                  list(dict.fromkeys((sys.base_prefix, sys.prefix, sys.exec_prefix))),
                                  qgis_prefix, sys.executable)


def in_flatpak(environ: Mapping[str, str] = os.environ, root: Path = Path("/")) -> bool:
    """QGIS runs inside a Flatpak sandbox."""
    return "FLATPAK_ID" in environ or (root / ".flatpak-info").is_file()


def find_base_python(candidates: Sequence[str | Path] | None = None) -> str:
    """The first candidate that is QGIS's Python version, imports osgeo.gdal and can make a virtual
    environment that starts on its own; EngineEnvError saying what was wrong with each otherwise."""
    version = PYTHON_VERSION
    rejected = []
    for candidate in base_python_candidates() if candidates is None else candidates:
        try:
            # A fixed argv: a local interpreter and a constant check, never a shell.
            result = subprocess.run([str(candidate), "-c", BASE_PYTHON_CHECK], capture_output=True,  # nosec B603
                                    text=True, timeout=CHECK_TIMEOUT_SECONDS,
                                    env=command_environment([str(candidate)], os.environ))
        except (OSError, subprocess.TimeoutExpired) as error:
            rejected.append(f"{candidate}: does not run ({error})")
            continue
        lines = result.stdout.strip().splitlines()
        broken = [line for line in lines if line.startswith("broken venv:")]
        if lines[:1] != [version]:
            rejected.append(f"{candidate}: Python {lines[0] if lines else '?'}, not QGIS's {version}")
        elif len(lines) < 2:
            rejected.append(f"{candidate}: Python {version} without GDAL (osgeo.gdal), so not QGIS's own")
        elif broken:
            rejected.append(f"{candidate}: makes virtual environments that do not start on their own "
                            f"({broken[0].split(':', 1)[1].strip()})")
        elif result.returncode != 0:
            advice = ("QGIS runs as a Flatpak whose runtime lacks them: make an environment with torch and "
                      "transformers yourself and choose it under Advanced." if in_flatpak() else
                      "On Debian or Ubuntu install python3-venv (sudo apt install python3-venv), then open this "
                      "dialog again.")
            raise EngineEnvError(
                f"{candidate} (QGIS's Python {version}) cannot create virtual environments: its venv or "
                f"ensurepip module is missing. {advice}")
        else:
            return str(candidate)
    tried = "; ".join(rejected) if rejected else "none found"
    raise EngineEnvError(
        f"QGIS's own Python {version} (with GDAL) was not found to create the engine's environment "
        f"(tried: {tried}). Choose an existing environment with torch and transformers under Advanced instead.")


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


def engine_requirements(path: Path | None = None, python_version: str | None = None) -> list[str]:
    """The engine packages as requirements.txt pins them for the engine's Python `python_version` ('3.13';
    QGIS's by default), in ENGINE_PACKAGES order: a line whose environment marker does not hold for it is skipped
    and the marker of one that does is dropped (e.g. 'scikit-image==0.25.2; python_version >= "3.13"' →
    'scikit-image==0.25.2'). EngineEnvError names a malformed marker, or a package pinned twice for it."""
    source = path or requirements_file()
    environment = marker_environment(python_version or PYTHON_VERSION)
    pins: dict[str, str] = {}
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        requirement, _, marker = line.split("#", 1)[0].partition(";")
        name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
        if not name:
            continue
        try:
            applies = not marker.strip() or marker_applies(marker, environment)
        except EngineEnvError as error:
            raise EngineEnvError(f"{source.name} line {number} ({line.strip()}): {error}") from None
        if not applies:
            continue
        package = _normalise(name.group())
        if package in pins:
            raise EngineEnvError(f"{source.name} line {number} ({line.strip()}): {name.group()} is pinned twice "
                                 f"for Python {environment['python_version']}.")
        pins[package] = requirement.strip()
    return [pins.get(_normalise(package), package) for package in ENGINE_PACKAGES]


def marker_environment(python_version: str, system: str = sys.platform,
                       machine: str | None = None) -> dict[str, str]:
    """The values of the marker variables requirements.txt may use, for an engine of `python_version` ('3.13')
    on this machine (the engine's Python may be another version than QGIS's; its platform is QGIS's)."""
    return {"python_version": python_version, "sys_platform": system,
            "platform_machine": platform.machine() if machine is None else machine}


def marker_applies(marker: str, environment: Mapping[str, str]) -> bool:
    """Whether a PEP 508 environment marker holds in `environment` (marker_environment): evaluated by
    `packaging` where QGIS's Python has it, else by simple_marker_applies; only MARKER_VARIABLES may be named.
    EngineEnvError, in one line, for a malformed marker."""
    unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", marker)
    unknown = sorted(set(re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", unquoted)) - set(MARKER_VARIABLES) -
                     {"and", "or", "not", "in"})
    if unknown:
        raise EngineEnvError(f"the marker names {', '.join(unknown)}; only {', '.join(MARKER_VARIABLES)} can be "
                             "used there.")
    if re.search(r"~=|===", unquoted):
        raise EngineEnvError("the marker compares with ~= or ===; use ==, !=, <, <=, >, >=, in or not in.")
    try:
        from packaging.markers import InvalidMarker, Marker
    except ImportError:
        return simple_marker_applies(marker, environment)
    try:
        return Marker(marker.strip()).evaluate(dict(environment))
    except InvalidMarker as error:
        raise EngineEnvError(f"the marker is malformed ({str(error).splitlines()[0]}).") from None


def simple_marker_applies(marker: str, environment: Mapping[str, str]) -> bool:
    """marker_applies without `packaging`: `and`, `or`, brackets and comparisons (==, !=, <, <=, >, >=, in,
    not in) of MARKER_VARIABLES and quoted strings; dotted numbers compare as versions, other text as text."""
    tokens = re.findall(r"\s*(not\s+in\b|[<>=!]=|[<>()]|'[^']*'|\"[^\"]*\"|[A-Za-z_][A-Za-z0-9_.]*|\S)", marker)
    position = 0

    def take(*wanted: str) -> str | None:
        nonlocal position
        if position < len(tokens) and (not wanted or re.sub(r"\s+", " ", tokens[position]) in wanted):
            position += 1
            return tokens[position - 1]
        return None

    def value() -> str:
        token = take() or ""
        if token in MARKER_VARIABLES:
            return environment[token]
        if len(token) < 2 or token[0] not in "'\"" or token[-1] != token[0]:
            raise EngineEnvError("the marker is malformed.")
        return token[1:-1]

    def comparison() -> bool:
        if take("("):
            result = either()
            if not take(")"):
                raise EngineEnvError("the marker is malformed (a bracket is not closed).")
            return result
        left = value()
        operator = take("==", "!=", "<", "<=", ">", ">=", "in", "not in")
        if operator is None:
            raise EngineEnvError("the marker is malformed (no comparison).")
        return _compare(left, re.sub(r"\s+", " ", operator), value())

    def joined(word: str, part: Callable[[], bool]) -> bool:
        """One or more `part`s joined by `word`: with 'and' whether all hold, with 'or' whether any does."""
        results = [part()]
        while take(word):
            results.append(part())
        return all(results) if word == "and" else any(results)

    def either() -> bool:
        return joined("or", lambda: joined("and", comparison))

    result = either()
    if position != len(tokens):
        raise EngineEnvError("the marker is malformed.")
    return result


def _compare(left: str, operator: str, right: str) -> bool:
    if operator in ("in", "not in"):
        return (left in right) == (operator == "in")
    versions = [tuple(int(part) for part in side.split(".")) if re.fullmatch(r"\d+(\.\d+)*", side) else None
                for side in (left, right)]
    if None not in versions:
        width = max(len(version) for version in versions)
        left_key, right_key = (version + (0,) * (width - len(version)) for version in versions)
    else:
        left_key, right_key = left, right
    return {"==": left_key == right_key, "!=": left_key != right_key, "<": left_key < right_key,
            "<=": left_key <= right_key, ">": left_key > right_key, ">=": left_key >= right_key}[operator]


def pip_requirements(requirements: Sequence[str], build: str, system: str | None = None,
                     machine: str | None = None) -> list[str]:
    """The requirements as pip is given them. On Linux x86_64 PyPI's torch is a CUDA build of several GB, so the
    CPU engine's exact torch pin names the CPU build by its local version (torch==2.13.0 → torch==2.13.0+cpu):
    pip finds it on PyTorch's CPU index or a mirror of it, and stops with a message where there is none."""
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if build != CPU or system != "Linux" or machine.lower() not in ("x86_64", "amd64"):
        return list(requirements)
    return [f"{requirement.strip()}+cpu" if re.fullmatch(r"torch\s*==\s*[0-9][0-9A-Za-z.]*", requirement.strip(),
                                                         re.IGNORECASE) else requirement
            for requirement in requirements]


def default_torch_index(build: str) -> str:
    """PyTorch's own wheel index of `build` ('cpu', 'cu130'…)."""
    return TORCH_INDEX.format(build=build)


def check_command(python: str, build: str | None = None) -> tuple[str, ...]:
    """Runs `python` and fails with the missing modules unless it can run the engine (a tiny DINOv3 forward
    through the product's own loader included); for the CPU `build`, also when its torch is a CUDA build."""
    return (python, "-c", ENGINE_CHECK, str(PLUGIN_DIR.parent), *((build,) if build else ()))


def free_disk_problem(folder: Path, build: str) -> str | None:
    """Why a set-up of `build` into `folder` would not fit on its disk, or None when it fits."""
    needed = REQUIRED_FREE_BYTES.get(build, REQUIRED_FREE_BYTES_CUDA)
    free = disk_free_bytes(folder)
    if free is None or free >= needed:
        return None
    return (f"Only {free / 1024**3:.1f} GB are free on the disk of {folder}; the "
            f"{'CPU' if build == CPU else 'CUDA'} engine needs about {needed / 1024**3:.0f} GB. Free some space first.")


def install_plan(root: Path, base_python: str, build: str, torch_index: str | None = None,
                 requirements: Sequence[str] | None = None, extra_indexes: Sequence[str] | None = None,
                 python_version: str = PYTHON_VERSION) -> Plan:
    """The steps that build the engine of `build` in a staging folder of `root`, probe the package indexes,
    check the engine and move it into place. pip keeps the user's index, proxy and certificates; `torch_index`
    (PyTorch's index of the build by default, '' for none) is added as an extra index. `extra_indexes`, when
    given, replaces the user's own extra indexes (those that answered, after some did not). `python_version` is
    `base_python`'s: the requirements that apply to it (engine_requirements), the key and the ready marker."""
    requirements = list(engine_requirements(python_version=python_version) if requirements is None else requirements)
    key = engine_key(requirements, build, python_version)
    target = root / f"engine-{key}"
    staging = root / f"staging-{key}"
    python = str(venv_python(staging))
    constraints = str(staging / CONSTRAINTS_FILE)
    index = default_torch_index(build) if torch_index is None else torch_index.strip()
    pip_install = (python, "-m", "pip", "install", *PIP_NETWORK_OPTIONS,
                   *(("--extra-index-url", index) if index else ()), "--constraint", constraints)
    torch_kind = "CPU" if build == CPU else f"CUDA, {build}"
    marker = json.dumps({"key": key, "build": build, "requirements": requirements, "base_python": base_python,
                         "python": python_version})
    # pip splits the variable on spaces: a lone space stands for no extra index at all (an empty value is ignored).
    kept = () if extra_indexes is None else (("PIP_EXTRA_INDEX_URL", " ".join(extra_indexes) or " "),)
    steps = [
        Step(f"Creating the virtual environment (in {staging.name}, moved into place once checked)",
             (base_python, "-m", "venv", "--clear", "--system-site-packages", str(staging)), VENV),
        Step("Checking that the package indexes answer", (python, "-c", PROBE_RUNNER, str(PLUGIN_DIR.parent), index),
             PROBE),
        Step("Holding numpy and scipy at QGIS's versions", (base_python, "-c", QGIS_VERSIONS_SCRIPT, constraints),
             PINS),
        Step(f"Installing torch ({torch_kind}), transformers, scikit-learn, scikit-image (a large download)",
             (*pip_install, *pip_requirements(requirements, build), *QGIS_PACKAGES), PIP, kept),
        Step("Checking the new engine (imports, one tiny DINOv3 forward)", check_command(python, build), CHECK),
        Step(f"Moving the engine into place ({target.name})",
             (base_python, "-c", SWAP_RUNNER, str(PLUGIN_DIR.parent), str(staging), str(target), marker), SWAP),
    ]
    return Plan(steps, staging, target)


def swap_in(staging: str | Path, target: str | Path, marker: str) -> None:
    """Move a checked engine from `staging` to `target` with its ready marker: the engine there is set aside
    (old-…), the new one renamed into place, the old one deleted. When the new one cannot be moved (a virus
    scanner holding a file on Windows), the old one is put back and EngineEnvError says so."""
    staging, target = Path(staging), Path(target)
    try:
        (staging / READY_MARKER).write_text(marker, encoding="utf-8")
    except OSError as error:
        raise EngineEnvError(f"The new engine in {staging} could not be marked ready ({error}).") from error
    old = target.with_name(f"old-{target.name}")
    shutil.rmtree(old, ignore_errors=True)
    try:
        _rename_into_place(staging, target, old)
    except EngineEnvError:
        (staging / READY_MARKER).unlink()  # a staging folder left behind is never taken for a ready engine
        raise
    shutil.rmtree(old, ignore_errors=True)


def _rename_into_place(staging: Path, target: Path, old: Path) -> None:
    """`target` (if any) renamed to `old`, then `staging` to `target`; when that fails, `old` put back."""
    if target.exists():
        try:
            os.rename(target, old)
        except OSError as error:
            raise EngineEnvError(f"The engine in use ({target}) could not be set aside ({error}); it is "
                                 "unchanged. Close what may hold its files (another QGIS, a virus scanner), "
                                 "then try again.") from error
    try:
        os.rename(staging, target)
    except OSError as error:
        if not old.exists():
            raise EngineEnvError(f"The new engine could not be moved into place ({error}).") from error
        try:
            os.rename(old, target)
        except OSError as back:
            raise EngineEnvError(f"The new engine could not be moved into place ({error}), nor the previous one "
                                 f"back ({back}): it is in {old}; rename it to {target.name}.") from back
        raise EngineEnvError(f"The new engine could not be moved into place ({error}); the previous engine was "
                             f"put back as it was.") from error


def pip_settings(config_list: str) -> dict[str, tuple[str, str]]:
    """pip's settings from the output of `pip config list`: name → (value, where from: 'env' or the config
    section), environment variables first, then the install section, then global (pip's own precedence)."""
    found: dict[tuple[str, str], str] = {}
    for line in config_list.splitlines():
        setting = re.fullmatch(r"\s*([^=\s]+)\.([a-z0-9-]+)='(.*)'\s*", line)
        if setting:
            found[(setting.group(1), setting.group(2))] = setting.group(3)
    settings: dict[str, tuple[str, str]] = {}
    for section in ("global", "install", ":env:"):
        for (where, name), value in found.items():
            if where == section:
                settings[name] = (value, "env" if where == ":env:" else where)
    return settings


def pip_indexes(settings: Mapping[str, tuple[str, str]], torch_index: str) -> list[IndexCheck]:
    """The indexes pip will read, each with where it comes from in words; none when pip is told no-index."""
    if settings.get("no-index", ("", ""))[0].strip().lower() in ("1", "true", "yes", "on"):
        return []

    def source(name: str, where: str) -> str:
        return f"PIP_{name.upper().replace('-', '_')}" if where == "env" else f"pip's configuration ({where}.{name})"

    checks = []
    if "index-url" in settings:
        value, where = settings["index-url"]
        checks += [IndexCheck(url, source("index-url", where)) for url in value.split()]
    else:
        checks.append(IndexCheck(PYPI, "PyPI, pip's default index"))
    if "extra-index-url" in settings:
        value, where = settings["extra-index-url"]
        checks += [IndexCheck(url, source("extra-index-url", where), extra=True) for url in value.split()]
    if torch_index:
        checks.append(IndexCheck(torch_index, "the torch index", torch=True))
    return checks


def probe_index(url: str, proxy: str = "", cafile: str = "", timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """Whether `url` answers, asked once with a HEAD request: None when it does (any HTTP status but a proxy's
    407; a certificate is left for pip to judge), else why not, in words. Only http(s) is asked: file:// and
    other local locations pip reads itself."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    address = urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    via = proxy or (urllib.request.getproxies().get(parts.scheme, "")
                    if not urllib.request.proxy_bypass(parts.hostname) else "")
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({"http": proxy, "https": proxy})
                                                  if proxy else urllib.request.ProxyHandler()]
    try:
        context = ssl.create_default_context(cafile=cafile or None)
    except (OSError, ssl.SSLError):
        context = ssl.create_default_context()
    handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        # Only http(s) addresses reach here (checked above); a HEAD request, nothing downloaded.
        opener.open(urllib.request.Request(address, method="HEAD"), timeout=timeout).close()  # nosec B310
    except urllib.error.HTTPError as error:
        if error.code == 407:
            return f"the proxy {_public(via)} asks for credentials (407)"
        return None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLError):
            return None
        if isinstance(reason, socket.gaierror):
            problem = f"the name {urlsplit(via).hostname if via else parts.hostname} is not known (no network?)"
        elif isinstance(reason, ConnectionRefusedError):
            problem = "the connection was refused"
        elif isinstance(reason, (TimeoutError, socket.timeout)):
            problem = f"no answer within {timeout:g} s"
        else:
            problem = str(reason)
        return f"the proxy {_public(via)}: {problem}" if via else problem
    return None


def probe_indexes(checks: Sequence[IndexCheck], proxy: str = "", cafile: str = "") -> list[IndexCheck]:
    """probe_index for every index at once (the slowest takes PROBE_TIMEOUT_SECONDS at most)."""
    if not checks:
        return []
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        problems = list(pool.map(lambda check: probe_index(check.url, proxy, cafile), checks))
    return [replace(check, problem=problem) for check, problem in zip(checks, problems)]


def probe_status(checks: Sequence[IndexCheck]) -> int:
    """0 when every index answered, PROBE_EXTRA_UNREACHABLE when only extra indexes (the torch index, the user's
    extra ones) did not, else PROBE_INDEX_UNREACHABLE (pip's main index is needed)."""
    failed = [check for check in checks if check.problem]
    if not failed:
        return 0
    return PROBE_EXTRA_UNREACHABLE if all(check.torch or check.extra for check in failed) else PROBE_INDEX_UNREACHABLE


def probe_main(torch_index: str) -> int:
    """The probe step, run by the new environment's Python: pip's settings as `pip config list` gives them, each
    index asked once, a line per index and one PROBE_RESULT line for the dialog; the exit status of probe_status."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,  # nosec B603
                            text=True, timeout=CHECK_TIMEOUT_SECONDS)
    settings = pip_settings(listed.stdout)
    checks = probe_indexes(pip_indexes(settings, torch_index), settings.get("proxy", ("", ""))[0],
                           settings.get("cert", ("", ""))[0])
    for check in checks:
        asked = urlsplit(check.url).scheme in ("http", "https")
        state = "NOT reached" if check.problem else "answers" if asked else "a local folder, read by pip itself"
        print(f"{state}: {_public(check.url)} ({check.source})" + (f": {check.problem}" if check.problem else ""))
    if not checks:
        print("pip is told to use no index (no-index): nothing to probe.")
    print(PROBE_RESULT + json.dumps([asdict(check) for check in checks]), flush=True)
    return probe_status(checks)


def read_probe(log: str) -> list[IndexCheck]:
    """The indexes and their problems from the probe step's output (empty when it printed none)."""
    for line in reversed(log.splitlines()):
        if line.startswith(PROBE_RESULT):
            try:
                return [IndexCheck(**fields) for fields in json.loads(line[len(PROBE_RESULT):])]
            except (ValueError, TypeError):
                return []
    return []


def unreachable_message(checks: Sequence[IndexCheck], button: str) -> str:
    """What the dialog says when indexes pip needs did not answer: each named with its source and problem."""
    failed = "; ".join(f"{_public(check.url)} ({check.source}): {check.problem}"
                       for check in checks if check.problem)
    return (f"A package index could not be reached, so nothing was downloaded: {failed}. Check the network "
            f"connection, the proxy (HTTPS_PROXY, pip's proxy option) and the index address, then {button}.")


def extra_index_choice(checks: Sequence[IndexCheck], torch_requirement: str) -> str:
    """The question asked when only extra indexes did not answer: go on without them, or stop to fix them."""
    dead = [check for check in checks if check.problem]
    others = ", ".join(_public(check.url) for check in checks if not check.problem) or "none"
    named = "\n".join(f"The torch index {_public(check.url)} could not be reached: {check.problem}." if check.torch
                      else f"The extra index {_public(check.url)} ({check.source}) could not be reached: "
                           f"{check.problem}." for check in dead)
    torch = (f" and looks for {torch_requirement} there, stopping with a message if they do not have it"
             if any(check.torch for check in dead) else "")
    fix = " or ".join(["correct the torch index (for example your organisation's mirror of it) or empty it"] *
                      any(check.torch for check in dead) + ["correct pip's settings"] *
                      any(check.extra for check in dead))
    return (f"{named}\n\nGo on without {'it' if len(dead) == 1 else 'them'}: pip then uses your other package "
            f"indexes ({others}){torch}.\n\nOr stop, and {fix}.")


def stopped_message(checks: Sequence[IndexCheck], button: str) -> str:
    """What the dialog says when the user stopped at the extra-index question."""
    if all(check.torch for check in checks if check.problem):
        return f"Stopped: the torch index could not be reached. Correct the torch index or empty it, then {button}."
    dead = ", ".join(f"{_public(check.url)} ({check.source})" for check in checks if check.problem)
    return f"Stopped: {dead} could not be reached. Correct the address, or pip's settings, then {button}."


def without_dead_extras(checks: Sequence[IndexCheck], torch_index: str) -> tuple[str, list[str] | None]:
    """The torch index and the user's extra indexes to go on with after the question: a dead torch index
    becomes '', dead extra indexes are left out (None: the user's own extra indexes are kept as they are)."""
    torch_dead = any(check.torch and check.problem for check in checks)
    extras_dead = any(check.extra and check.problem for check in checks)
    kept = [check.url for check in checks if check.extra and not check.problem] if extras_dead else None
    return ("" if torch_dead else torch_index), kept


def explain_pip_failure(log: str, button: str = "Repair") -> str:
    """The likely cause of a failed pip install, in words, from its log; `button` names the button that tries
    again (Install when there is no engine yet)."""
    for pattern, explanation in PIP_FAILURES:
        if re.search(pattern, log):
            return explanation.format(button=button)
    return f"pip failed; the log above says why. {button} tries again."


def remove_environment(venv_dir: Path) -> None:
    """Delete an engine, staging or replaced folder; refuses one that is not treeseg/engine-*, staging-* or old-*."""
    if not (venv_dir.name.startswith(("engine-", "staging-", "old-")) and venv_dir.parent.name == ENGINES_FOLDER):
        raise EngineEnvError(f"{venv_dir} is not an engine environment made by TreeSeg; it was not removed.")
    if venv_dir.exists():
        shutil.rmtree(venv_dir)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(url: str) -> str:
    """`url` without user name and password, for the log and messages."""
    parts = urlsplit(url)
    if not parts.hostname or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class PipProgress:
    """What pip's log tells of its progress: packages collected, megabytes announced for download, the packages
    it is installing (from its "Installing collected packages" line) and how many of them are in place."""

    SIZE = re.compile(r"^\s*Downloading (\S+) \(([\d.]+) (kB|MB|GB)\)", re.MULTILINE)
    UNITS = {"kB": 1 / 1024, "MB": 1.0, "GB": 1024.0}
    INSTALLING = "Installing collected packages:"
    # The share of the pip step that collecting and downloading take; installing takes the rest.
    COLLECTING_SHARE = 0.6

    def __init__(self) -> None:
        self.packages = 0
        self.megabytes = 0.0
        self.current = ""
        self.installing = False
        self.to_install: list[str] = []
        self.installed = 0
        self._pending = ""

    def feed(self, text: str) -> None:
        """Read more of pip's output (any chunking; only whole lines count)."""
        lines = (self._pending + text.replace("\r", "\n")).split("\n")
        self._pending = lines.pop()
        for line in lines:
            size = self.SIZE.match(line)
            if line.startswith("Collecting "):
                self.packages += 1
                self.current = line.split()[1]
            elif size:
                self.megabytes += float(size.group(2)) * self.UNITS[size.group(3)]
                self.current = size.group(1).rsplit("/", 1)[-1]
            elif line.startswith(self.INSTALLING):
                self.installing = True
                self.to_install = [name.strip() for name in line[len(self.INSTALLING):].split(",") if name.strip()]

    def count_installed(self, venv_dir: Path) -> None:
        """Count the packages being installed whose metadata is complete in `venv_dir` (pip writes a package's
        .dist-info/RECORD once its files are in place)."""
        done = set()
        for site_packages in [*venv_dir.glob("lib/python*/site-packages"), venv_dir / "Lib" / "site-packages"]:
            for record in site_packages.glob("*.dist-info/RECORD"):
                done.add(_normalise(record.parent.name.split("-", 1)[0]))
        self.installed = sum(_normalise(name) in done for name in self.to_install)

    def fraction(self) -> float:
        """How far the install is, 0 to 1: rises with each package collected, then with each one installed."""
        if self.installing:
            share = self.installed / len(self.to_install) if self.to_install else 0.0
            return self.COLLECTING_SHARE + (1 - self.COLLECTING_SHARE) * share
        return self.COLLECTING_SHARE * self.packages / (self.packages + 8)

    def describe(self) -> str:
        """E.g. '23 packages, 812 MB to download; now torch-2.13.0-…whl', or '…; installing them: 12 of 60'."""
        if self.installing:
            waiting = self.to_install[self.installed:self.installed + 1]
            now = f", now {waiting[0]}" if waiting else ""
            return (f"{self.packages} packages, {self.megabytes:.0f} MB downloaded; installing them: "
                    f"{self.installed} of {len(self.to_install)}{now}")
        now = f"; now {self.current}" if self.current else ""
        return f"{self.packages} packages, {self.megabytes:.0f} MB to download{now}"
