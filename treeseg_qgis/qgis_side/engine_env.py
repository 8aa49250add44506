"""The engine's private Python environment: where it lives, and the commands that make, check and swap it in.

Standard library only. An engine is a virtual environment in the QGIS profile folder
(`treeseg/engine-<build>-<hash>`), keyed by what is installed in it (the pinned packages, the torch build
and the Python version), not by the plugin version: an upgrade with the same pins keeps the engine. It
is made from QGIS's own Python with --system-site-packages, so it sees QGIS's GDAL, numpy, scipy and
matplotlib; pip, as the user configured it, adds torch, transformers and the rest and holds numpy and
scipy at QGIS's versions. It is built in a staging folder, checked (imports and one tiny DINOv3 forward
through the product's loader), and only then moved into place with a ready marker; a folder without the
marker is never used. The set-up dialog (gui/engine_setup.py) runs the commands one by one through QProcess.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess  # nosec B404
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
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
BASE_PYTHON_CHECK = """import sys
print("%d.%d" % sys.version_info[:2], flush=True)
try:
    from osgeo import gdal
except Exception as error:
    sys.exit(f"no osgeo.gdal ({type(error).__name__}: {error})")
print("gdal", gdal.__version__, flush=True)
import ensurepip, venv
ensurepip.version()
"""
ENGINE_CHECK = """import importlib, sys, tempfile
sys.path.insert(0, sys.argv[1])
missing = []
for name in ("torch", "transformers", "sklearn", "skimage", "scipy", "huggingface_hub", "safetensors",
             "matplotlib", "osgeo.gdal", "distributed"):
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
if missing:
    sys.exit("This Python lacks what the TreeSeg engine needs: " + "; ".join(missing))
import torch, transformers
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
SWAP_SCRIPT = """import json, os, shutil, sys
staging, target, marker = sys.argv[1:4]
with open(os.path.join(staging, marker), "w", encoding="utf-8") as file:
    file.write(sys.argv[4])
old = os.path.join(os.path.dirname(target), "old-" + os.path.basename(target))
shutil.rmtree(old, ignore_errors=True)
if os.path.exists(target):
    os.rename(target, old)
os.rename(staging, target)
shutil.rmtree(old, ignore_errors=True)
print("The engine is in place:", target)
"""
# What pip's log says, in words: the first pattern found names the cause.
PIP_FAILURES = (
    (r"No space left on device|Errno 28", "The disk is full: free some space (see the folder above) and Repair."),
    (r"CERTIFICATE_VERIFY_FAILED|SSLError|SSL: ",
     "The package index's certificate was refused: behind an organisation's proxy, set pip's `cert` option "
     "(pip.conf) or PIP_CERT to your organisation's certificate bundle, then Repair."),
    (r"ProxyError|Tunnel connection failed|407 Proxy",
     "The proxy refused the connection: check pip's `proxy` option (pip.conf) or HTTPS_PROXY, then Repair."),
    (r"40[13] Client Error|403 Forbidden|401 Unauthorized",
     "The package index refused access (401/403): check the index address and its credentials in pip.conf "
     "or PIP_INDEX_URL, then Repair."),
    (r"NewConnectionError|Connection refused|Failed to establish a new connection|Name or service not known|"
     r"Temporary failure in name resolution|nodename nor servname|getaddrinfo failed|ConnectTimeout|"
     r"Read timed out|Max retries exceeded|Network is unreachable",
     "The package index could not be reached: no network, a proxy, or a wrong index address "
     "(PIP_INDEX_URL, pip.conf). Check the connection, then Repair."),
    (r"No matching distribution found for torch|Could not find a version that satisfies the requirement torch",
     "There is no torch wheel for this Python and platform on the index: check the torch index below, or "
     "use an existing environment (Advanced)."),
    (r"No matching distribution found|Could not find a version that satisfies",
     "A package was not found on the index at the version required: check the index (PIP_INDEX_URL, "
     "pip.conf) or the network, then Repair."),
    (r"ResolutionImpossible|conflicting dependencies",
     "The pinned packages conflict with what QGIS's Python already has; the log names them."),
)


class EngineEnvError(Exception):
    """The engine's environment cannot be made or changed; the message says what to do."""


@dataclass(frozen=True)
class Step:
    """One command of a plan: what it does, in words, its command line (run without a shell), and whether
    it replaces the engine's files (the running engine must stop first)."""

    title: str
    command: tuple[str, ...]
    swaps_engine: bool = False


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
    """A ready engine: its folder and what its marker records."""

    folder: Path
    key: str
    build: str
    requirements: tuple[str, ...]

    @property
    def python(self) -> Path:
        """The engine's interpreter."""
        return venv_python(self.folder)


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
    """The engines in `root` that carry the ready marker, newest first; a half-made folder is never listed."""
    engines = []
    for marker in root.glob(f"engine-*/{READY_MARKER}"):
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
            engine = Engine(marker.parent, str(record["key"]), str(record["build"]), tuple(record["requirements"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if engine.python.is_file():
            engines.append((marker.stat().st_mtime, engine))
    return [engine for _, engine in sorted(engines, key=lambda item: item[0], reverse=True)]


def engine_in_use(root: Path, requirements: Sequence[str] | None = None) -> Engine | None:
    """The engine to run: the newest ready one made for these requirements (any torch build), else the newest
    ready one (made for other pins, until a new one is made)."""
    engines = ready_engines(root)
    wanted = {_normalise(r) for r in (engine_requirements() if requirements is None else requirements)}
    matching = [engine for engine in engines if {_normalise(r) for r in engine.requirements} == wanted]
    return (matching or engines or [None])[0]


def private_engine_python(profile_dir: str | Path) -> str | None:
    """The Python of the engine in use in a QGIS profile, or None when no ready engine is there."""
    try:
        engine = engine_in_use(engines_dir(profile_dir))
    except EngineEnvError:
        engine = None
    return str(engine.python) if engine else None


def process_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for the set-up commands: QGIS's (so the user's pip settings, proxy and certificates
    apply), without PYTHONHOME (it would hide the venv), unbuffered so the log is live, pip never waiting
    for input, and no hub access from the check."""
    env = {name: value for name, value in environ.items() if name != "PYTHONHOME"}
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    return env


def qgis_python_candidates(system: str, version: str, python_prefixes: Sequence[str], qgis_prefix: str = "",
                           executable: str = "") -> list[Path]:
    """The interpreters QGIS itself may run on, for `system` (platform.system()), QGIS's Python `version`
    ('3.12'), its sys.base_prefix/prefix/exec_prefix, QGIS's install prefix and sys.executable; existing files
    only, never from PATH and never the Microsoft Store stub.

    Linux: <prefix>/bin/python3.x. Windows (OSGeo4W, standalone installer): <root>/apps/Python3xx/python.exe,
    root two levels above QGIS's apps/qgis*. macOS: the interpreter inside QGIS.app."""
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
            framework = bundle / "Contents" / "Frameworks" / "Python.framework" / "Versions" / version
            paths += [macos / "bin" / f"python{version}", macos / "bin" / "python3", macos / f"python{version}",
                      macos / "python3", framework / "bin" / f"python{version}"]
        paths += [prefix / "bin" / f"python{version}" for prefix in prefixes
                  if any(parent.suffix == ".app" for parent in prefix.parents)]
    else:
        for prefix in [*prefixes, *([Path(qgis_prefix)] if qgis_prefix else [])]:
            paths += [prefix / "bin" / f"python{version}", prefix / "bin" / "python3"]
    return [path for path in dict.fromkeys(paths) if path.is_file()]


def base_python_candidates() -> list[Path]:
    """qgis_python_candidates for the running QGIS (its prefix from qgis.core when loaded)."""
    qgis_core = sys.modules.get("qgis.core")
    qgis_prefix = qgis_core.QgsApplication.prefixPath() if qgis_core is not None else ""
    return qgis_python_candidates(platform.system(), PYTHON_VERSION,
                                  list(dict.fromkeys((sys.base_prefix, sys.prefix, sys.exec_prefix))),
                                  qgis_prefix, sys.executable)


def find_base_python(candidates: Sequence[str | Path] | None = None) -> str:
    """The first candidate that is QGIS's Python version, imports osgeo.gdal and can make a virtual
    environment; EngineEnvError saying what was wrong with each otherwise."""
    version = PYTHON_VERSION
    rejected = []
    for candidate in base_python_candidates() if candidates is None else candidates:
        try:
            # A fixed argv: a local interpreter and a constant check, never a shell.
            result = subprocess.run([str(candidate), "-c", BASE_PYTHON_CHECK], capture_output=True,  # nosec B603
                                    text=True, timeout=CHECK_TIMEOUT_SECONDS, env=process_environment(os.environ))
        except (OSError, subprocess.TimeoutExpired) as error:
            rejected.append(f"{candidate}: does not run ({error})")
            continue
        lines = result.stdout.strip().splitlines()
        if lines[:1] != [version]:
            rejected.append(f"{candidate}: Python {lines[0] if lines else '?'}, not QGIS's {version}")
        elif len(lines) < 2:
            rejected.append(f"{candidate}: Python {version} without GDAL (osgeo.gdal), so not QGIS's own")
        elif result.returncode != 0:
            raise EngineEnvError(
                f"{candidate} (QGIS's Python {version}) cannot create virtual environments: its venv or "
                f"ensurepip module is missing. On Debian or Ubuntu install python3-venv "
                f"(sudo apt install python3-venv), then open this dialog again.")
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


def engine_requirements(path: Path | None = None) -> list[str]:
    """The engine packages as requirements.txt pins them (e.g. 'torch==2.13.0'), in ENGINE_PACKAGES order."""
    pins = {}
    for line in (path or requirements_file()).read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        if name:
            pins[_normalise(name.group())] = requirement
    return [pins.get(_normalise(package), package) for package in ENGINE_PACKAGES]


def default_torch_index(build: str) -> str:
    """PyTorch's own wheel index of `build` ('cpu', 'cu130'…)."""
    return TORCH_INDEX.format(build=build)


def check_command(python: str) -> tuple[str, ...]:
    """Runs `python` and fails with the missing modules unless it can run the engine (a tiny DINOv3 forward
    through the product's own loader included)."""
    return (python, "-c", ENGINE_CHECK, str(PLUGIN_DIR.parent))


def free_disk_problem(folder: Path, build: str) -> str | None:
    """Why a set-up of `build` into `folder` would not fit on its disk, or None when it fits."""
    needed = REQUIRED_FREE_BYTES.get(build, REQUIRED_FREE_BYTES_CUDA)
    free = disk_free_bytes(folder)
    if free is None or free >= needed:
        return None
    return (f"Only {free / 1024**3:.1f} GB are free on the disk of {folder}; the "
            f"{'CPU' if build == CPU else 'CUDA'} engine needs about {needed / 1024**3:.0f} GB. Free some space first.")


def install_plan(root: Path, base_python: str, build: str, torch_index: str | None = None,
                 requirements: Sequence[str] | None = None) -> Plan:
    """The steps that build the engine of `build` in a staging folder of `root`, check it and move it into
    place. pip keeps the user's index, proxy and certificates; `torch_index` (PyTorch's index of the build
    by default, '' for none) is added as an extra index."""
    requirements = list(engine_requirements() if requirements is None else requirements)
    key = engine_key(requirements, build)
    target = root / f"engine-{key}"
    staging = root / f"staging-{key}"
    python = str(venv_python(staging))
    constraints = str(staging / CONSTRAINTS_FILE)
    index = default_torch_index(build) if torch_index is None else torch_index.strip()
    pip_install = (python, "-m", "pip", "install", *(("--extra-index-url", index) if index else ()),
                   "--constraint", constraints)
    torch_kind = "CPU" if build == CPU else f"CUDA, {build}"
    marker = json.dumps({"key": key, "build": build, "requirements": requirements, "base_python": base_python,
                         "python": PYTHON_VERSION})
    steps = [
        Step(f"Creating the virtual environment (in {staging.name}, moved into place once checked)",
             (base_python, "-m", "venv", "--clear", "--system-site-packages", str(staging))),
        Step("Holding numpy and scipy at QGIS's versions", (base_python, "-c", QGIS_VERSIONS_SCRIPT, constraints)),
        Step(f"Installing torch ({torch_kind}), transformers, scikit-learn, scikit-image (a large download)",
             (*pip_install, *requirements, *QGIS_PACKAGES)),
        Step("Checking the new engine (imports, one tiny DINOv3 forward)", check_command(python)),
        Step(f"Moving the engine into place ({target.name})",
             (base_python, "-c", SWAP_SCRIPT, str(staging), str(target), READY_MARKER, marker), swaps_engine=True),
    ]
    return Plan(steps, staging, target)


def explain_pip_failure(log: str) -> str:
    """The likely cause of a failed pip install, in words, from its log."""
    for pattern, explanation in PIP_FAILURES:
        if re.search(pattern, log):
            return explanation
    return "pip failed; the log above says why. Repair tries again."


def remove_environment(venv_dir: Path) -> None:
    """Delete an engine, staging or replaced folder; refuses one that is not treeseg/engine-*, staging-* or old-*."""
    if not (venv_dir.name.startswith(("engine-", "staging-", "old-")) and venv_dir.parent.name == ENGINES_FOLDER):
        raise EngineEnvError(f"{venv_dir} is not an engine environment made by TreeSeg; it was not removed.")
    if venv_dir.exists():
        shutil.rmtree(venv_dir)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class PipProgress:
    """What pip's log tells of its progress: packages collected, megabytes announced for download, and
    whether it has reached the installing stage."""

    SIZE = re.compile(r"^\s*Downloading (\S+) \(([\d.]+) (kB|MB|GB)\)", re.MULTILINE)
    UNITS = {"kB": 1 / 1024, "MB": 1.0, "GB": 1024.0}

    def __init__(self) -> None:
        self.packages = 0
        self.megabytes = 0.0
        self.current = ""
        self.installing = False
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
            elif line.startswith("Installing collected packages"):
                self.installing = True

    def fraction(self) -> float:
        """How far the install is, 0 to 1: rises with each package collected, 0.9 once installing."""
        if self.installing:
            return 0.9
        return 0.8 * self.packages / (self.packages + 8)

    def describe(self) -> str:
        """E.g. '23 packages, 812 MB to download; now torch-2.13.0-…whl'."""
        if self.installing:
            return f"{self.packages} packages, {self.megabytes:.0f} MB downloaded; installing them"
        now = f"; now {self.current}" if self.current else ""
        return f"{self.packages} packages, {self.megabytes:.0f} MB to download{now}"
