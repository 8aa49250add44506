"""The DINOv3 backbones as the engine uses them: normalisation, loading and the gated-access messages.

Every model, whether a catalogue name, any Hugging Face id or a local folder in
Hugging Face format, is loaded by `load_backbone` through transformers' AutoModel
(safetensors only, no remote code). Random weights are used only when the caller
passes `allow_untrained=True`, and the returned Backbone then says so.

On the CPU in int8, weights whose export for the run's tile shape is cached (core/onnx_int8.py, keyed by the
weights' content identity) start from that export alone: no torch, no transformers, no weights read. Only
complete weights are ever cached, so such a backbone is never untrained.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ...catalogue import BACKBONES, DEFAULT_MODEL, HUB_URL, LVD_1689M, SAT_493M, CatalogueModel, model_page
from .devices import describe_precision, device_type, resolve_device, resolve_precision
from .errors import ModelUnavailableError
from .files import refuse_special_files_in
from .onnx_int8 import ANY_SHAPE, OnnxInt8Network, export_is_cached

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

UNUSED_TENSORS = {"embeddings.mask_token"}  # only used for masked pre-training, never at inference
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std the weights were trained with."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


LVD_NORMALISATION = Normalisation("ImageNet (LVD-1689M weights)", IMAGENET_MEAN, IMAGENET_STD)
SAT_NORMALISATION = Normalisation("SAT-493M", SAT493M_MEAN, SAT493M_STD)


@dataclass(frozen=True)
class ModelSpec(CatalogueModel):
    """A catalogue model (treeseg_qgis/catalogue.py) as the engine uses it, with its normalisation."""

    normalisation: Normalisation = LVD_NORMALISATION


NORMALISATIONS = {LVD_1689M: LVD_NORMALISATION, SAT_493M: SAT_NORMALISATION}
CATALOGUE: dict[str, ModelSpec] = {
    model.name: ModelSpec(**{field.name: getattr(model, field.name) for field in fields(model)},
                          normalisation=NORMALISATIONS[model.pretraining])
    for model in BACKBONES.values()
}


@dataclass
class Backbone:
    """A loaded DINOv3 ready for inference, and what it really is."""

    model: torch.nn.Module | OnnxInt8Network  # the ONNX Runtime session for int8 on the CPU
    model_id: str
    normalisation: Normalisation
    untrained: bool
    device: torch.device | str  # 'cpu' where the backbone started from a cached int8 export, without torch
    dtype: torch.dtype | str
    patch_size: int
    num_register_tokens: int
    feature_dim: int
    precision: str = "float32"

    @property
    def device_type(self) -> str:
        """'cpu', 'cuda' or 'mps'."""
        return self.device if isinstance(self.device, str) else self.device.type

    def describe(self) -> dict:
        """Plain facts for logs and run metadata."""
        return {
            "model_id": self.model_id,
            "weights": "untrained (random initialisation)" if self.untrained else "pretrained",
            "untrained": self.untrained,
            "normalisation": self.normalisation.name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "precision": describe_precision(self.precision),
            "feature_dim": self.feature_dim,
        }


def normalisation_for(repo_id_or_path: str) -> Normalisation:
    """The normalisation a model was trained with, from the catalogue, its files or its name."""
    for spec in CATALOGUE.values():
        if repo_id_or_path in spec.repo_ids:
            return spec.normalisation
    config_file = Path(repo_id_or_path) / "preprocessor_config.json"
    if config_file.is_file():
        config = _read_json(config_file)
        mean, std = (config.get("image_mean"), config.get("image_std")) if isinstance(config, dict) else (0, 0)
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3:
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
                raise ModelUnavailableError(f"{config_file}: image_mean and image_std must be finite numbers "
                                            f"and image_std above 0, not {mean} and {std}.")
            return Normalisation(f"from {config_file.name}", tuple(mean), tuple(std))
    if "sat493m" in repo_id_or_path.lower():
        return SAT_NORMALISATION
    return LVD_NORMALISATION


def load_backbone(
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    allow_untrained: bool = False,
    token: str | None = None,
    revision: str | None = None,
    precision: str = "auto",
    tile_shape: tuple[int, int] | None = None,
) -> Backbone:
    """Load a catalogue name, a Hugging Face id or a local folder as a Backbone.

    `revision` pins a hub model to a branch, tag or commit (default: main).
    `precision` (core/devices.py resolve_precision) is what the forward runs in.
    `tile_shape`: the tiles' shape, when known; where an int8 export for it, or the any-shape export crops run,
    is cached, the backbone starts from the export without loading the model (`from_cached_export`).

    Raises ModelUnavailableError with the model page and the log-in steps when
    the weights cannot be had, unless `allow_untrained` is set.
    """
    if tile_shape is not None:
        cached = from_cached_export(model, device, token, revision, precision, tile_shape)
        if cached is not None:
            return cached
    import torch

    torch_device, dtype = resolve_device(device)
    chosen = resolve_precision(torch_device, precision)
    if torch_device.type != "cpu":
        dtype = getattr(torch, chosen)
    spec = CATALOGUE.get(model)
    if spec is None and "/" not in model and not Path(model).is_dir():
        raise ModelUnavailableError(
            f"Unknown model '{model}': use one of {', '.join(CATALOGUE)}, a Hugging Face id (owner/name) "
            "or a model folder."
        )
    candidates = spec.repo_ids if spec else (model,)
    failures: list[tuple[str, Exception]] = []
    cache_only = hub_offline()
    for candidate in candidates:
        try:
            network, missing = _from_pretrained(candidate, token, cache_only, revision or "main")
        except OSError as error:
            failures.append((candidate, error))
            log.info("Could not load %s: %s", candidate, error)
            continue
        if missing and not allow_untrained:
            raise ModelUnavailableError(
                f"The weights of {candidate} do not cover the model: {len(missing)} tensors are missing (for "
                f"example {missing[0]}), so it would run partly with random weights. Use the complete model "
                "folder, or allow untrained weights to check the pipeline only."
            )
        if missing:
            log.warning("UNTRAINED WEIGHTS: %d tensors of %s are missing (for example %s) and were initialised "
                        "at random. The result only checks the pipeline.", len(missing), candidate, missing[0])
        ready = _ready(network, candidate, normalisation_for(candidate), bool(missing), torch_device, dtype)
        return in_precision(ready, chosen, weights_identity(candidate, revision))
    if allow_untrained:
        return in_precision(_untrained(model, spec, failures, torch_device, dtype), chosen, None)
    raise ModelUnavailableError(explain_load_failure(*failures[0]))


def from_cached_export(model: str, device: str, token: str | None, revision: str | None, precision: str,
                       tile_shape: tuple[int, int]) -> Backbone | None:
    """The backbone straight from its cached int8 export, or None where the full load must run: another device
    or precision, weights not on this machine (or a hub model while the hub is reachable: the load may find
    a newer revision there), or neither `tile_shape`'s export nor the any-shape one cached for these weights.
    Either will do: a raster smaller than a tile runs only the any-shape export (measured: a 400² raster's second
    run loaded torch and transformers, 6.5 s, while its one export was cached). The float network loads only if an
    export must be built (the other one, or a damaged one, rebuilt with a warning); each session opens when its
    first tile comes."""
    if device_type(device) != "cpu" or resolve_precision("cpu", precision) != "int8":
        return None
    spec = CATALOGUE.get(model)
    offline: bool | None = None  # asked once, only for a hub model
    for candidate in spec.repo_ids if spec else (model,):
        local = Path(candidate).is_dir()
        folder = Path(candidate) if local else None
        if folder is None:
            offline = hub_offline() if offline is None else offline
            if not offline:
                return None  # the full load may download it, or a newer revision
            folder = _weights_folder(candidate, revision)
            if folder is None:
                continue  # not cached: offline, the full load too goes on to the next candidate
        weights = weights_identity(candidate, revision)
        if not any(export_is_cached(weights, shape) for shape in (tile_shape, ANY_SHAPE)):
            return None
        if local:
            refuse_special_files_in(folder, "model folder")
        shape = _cached_shape(folder / "config.json")
        if shape is None:
            return None
        network = OnnxInt8Network.from_export(weights, _float_loader(candidate, token, revision))
        backbone = Backbone(model=network, model_id=candidate, normalisation=normalisation_for(candidate),
                            untrained=False, device="cpu", dtype="float32", precision="int8", **shape)
        log.info("Started %s from its cached int8 export, without loading the model", candidate)
        return backbone
    return None


def _cached_shape(config_file: Path) -> dict | None:
    """patch_size, num_register_tokens and feature_dim from a DINOv3 config.json (None if it is not one)."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model_type") != "dinov3_vit":
        return None
    values = _backbone_shape(config)
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in values.values()):
        return None
    return values


def _backbone_shape(config: dict) -> dict:
    """The Backbone's patch_size, num_register_tokens and feature_dim as a DINOv3 configuration states them."""
    return {"patch_size": config.get("patch_size"), "num_register_tokens": config.get("num_register_tokens"),
            "feature_dim": config.get("hidden_size")}


def _float_loader(candidate: str, token: str | None, revision: str | None):
    """Loads the float network of weights whose export was cached, for an export that must be built now; weights
    that no longer cover the model are refused (an export is only ever cached for complete weights)."""

    def load() -> torch.nn.Module:
        import torch

        try:
            network, missing = _from_pretrained(candidate, token, hub_offline(), revision or "main")
        except OSError as error:
            raise ModelUnavailableError(explain_load_failure(candidate, error)) from None
        if missing:
            raise ModelUnavailableError(
                f"The weights of {candidate} changed during the run and no longer cover the model ({len(missing)} "
                "tensors are missing): run again.")
        return network.to(dtype=torch.float32).eval()

    return load


def in_precision(backbone: Backbone, precision: str, weights: dict | None) -> Backbone:
    """The backbone set to run in `precision`: on the CPU, int8 runs in ONNX Runtime (core/onnx_int8.py; its
    export cached per `weights`, never for untrained ones) and bfloat16 under autocast (FeatureExtractor)."""
    if backbone.device.type == "cpu" and precision == "int8":
        backbone.model = OnnxInt8Network(backbone.model, None if backbone.untrained else weights)
    backbone.precision = precision
    return backbone


def weights_identity(model: str, revision: str | None = None) -> dict:
    """What identifies the weights `model` loads now: each file of its folder (a local folder or the
    cached hub snapshot) by size, times and a sampled hash; the name and revision when none is cached."""
    from .cache import file_identity

    folder = _weights_folder(model, revision)
    files = sorted(path for path in folder.iterdir() if path.is_file()) if folder else []
    return {"model": model, "revision": revision, "files": {path.name: file_identity(path) for path in files}}


def _weights_folder(model: str, revision: str | None) -> Path | None:
    """The local folder `model` loads from, if it is a folder or a hub id already in the local cache."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import try_to_load_from_cache

    spec = CATALOGUE.get(model)
    for repo_id in spec.repo_ids if spec else (model,):
        try:
            found = try_to_load_from_cache(repo_id, "config.json", revision=revision or "main")
        except ValueError:  # not a valid repo id
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def hub_offline(timeout: float = 3.0) -> bool:
    """True when HF_HUB_OFFLINE is set or the hub cannot be reached within `timeout` seconds.

    Then models load from the local cache only, at once, instead of retrying the
    network for a minute.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or HUB_URL)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return False
    except OSError:
        log.info("The Hugging Face hub cannot be reached: loading models from the local cache only.")
        return True


def _from_pretrained(repo_id_or_path: str, token: str | None, cache_only: bool,
                     revision: str) -> tuple[torch.nn.Module, list[str]]:
    """The network and the names of its tensors the weights did not provide (initialised at random)."""
    from transformers import AutoModel

    local = Path(repo_id_or_path)
    if local.is_dir():
        _check_dinov3_folder(local)
    elif local.is_absolute() or repo_id_or_path.startswith("."):
        raise ModelUnavailableError(f"Model folder {repo_id_or_path} does not exist.")
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        network, loading = AutoModel.from_pretrained(
            repo_id_or_path,
            use_safetensors=True,
            trust_remote_code=False,
            token=token,
            local_files_only=cache_only,
            revision=revision,
            output_loading_info=True,
        )
    except (SafetensorError, StrictDataclassError, RuntimeError, ValueError, TypeError, KeyError,
            AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "mismatched_sizes" in reason:
            reason = "the shapes of the weights differ from those in config.json"
        raise ModelUnavailableError(
            f"{repo_id_or_path} cannot be loaded ({reason}): its weights are damaged or do not fit its "
            "config.json. Copy or download the model again."
        ) from error
    if getattr(network.config, "model_type", "") != "dinov3_vit":
        raise ModelUnavailableError(
            f"{repo_id_or_path} is a '{network.config.model_type}' model, not a DINOv3 ViT "
            "backbone: pick one of the catalogue names or a facebook/dinov3-* model."
        )
    missing = sorted(set(loading.get("missing_keys", ())) | set(loading.get("mismatched_keys", ())) - UNUSED_TENSORS)
    return network, [str(key) for key in missing]


def _check_dinov3_folder(folder: Path) -> None:
    refuse_special_files_in(folder, "model folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelUnavailableError(
            f"{folder} is not a model folder in Hugging Face format (no config.json). "
            "Copy the whole folder of a facebook/dinov3-* model, with config.json and "
            "model.safetensors."
        )
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{config_file} is not a model configuration (a JSON object is expected).")
    model_type = config.get("model_type", "")
    if model_type != "dinov3_vit":
        raise ModelUnavailableError(
            f"{folder} holds a '{model_type or 'unknown'}' model, not a DINOv3 ViT backbone "
            "(config.json model_type must be 'dinov3_vit')."
        )
    problem = _shape_problem(config)
    if model_type == "dinov3_vit" and problem:
        raise ModelUnavailableError(f"{config_file} does not describe a usable DINOv3 ViT: {problem}.")
    if not any(folder.glob("*.safetensors")):
        raise ModelUnavailableError(
            f"{folder} has no .safetensors weights; only safetensors files are loaded "
            "(pickled .bin/.pth weights are refused for safety)."
        )


def _read_json(config_file: Path) -> Any:
    """The JSON in a model folder's configuration file; ModelUnavailableError (one line) when it cannot be read."""
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ModelUnavailableError(f"{config_file} cannot be read: {error}") from error


def _shape_problem(config: dict) -> str | None:
    """What in a DINOv3 config.json no model can be built from (None when the shape is sound)."""
    def whole(name: str, minimum: int) -> int | None:
        value = config.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= minimum else None

    for name, minimum in (("hidden_size", 1), ("num_attention_heads", 1), ("num_hidden_layers", 1),
                          ("patch_size", 1), ("num_register_tokens", 0)):
        if name in config and whole(name, minimum) is None:
            return f"{name} must be a whole number of at least {minimum}, not {config[name]!r}"
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if hidden and heads and hidden % heads:
        return f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
    if config.get("patch_size", 16) != 16:
        return f"patch_size is {config['patch_size']}; treeseg tiles on the 16-pixel patch grid of DINOv3"
    layers, wanted = config.get("num_hidden_layers"), config.get("out_indices") or []
    if layers and any(not isinstance(index, int) or index > layers for index in wanted):
        return f"out_indices {wanted} ask for more than its {layers} layers"
    return _value_type_problem(config)


def _value_type_problem(config: dict) -> str | None:
    """A config.json value of another kind than the DINOv3 configuration's default for it (a number given as
    text, a flag as a number), which transformers would refuse with a traceback."""
    from transformers import DINOv3ViTConfig

    defaults = DINOv3ViTConfig().to_dict()
    for name, value in config.items():
        default = defaults.get(name)
        if isinstance(default, bool):
            fits = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            fits = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and (isinstance(value, int) or isinstance(default, float)))
        elif isinstance(default, str):
            fits = isinstance(value, str)
        else:
            continue
        if not fits:
            kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[type(default)]
            return f"{name} must be {kind}, not {value!r}"
    return None


def _ready(
    network: torch.nn.Module,
    model_id: str,
    normalisation: Normalisation,
    untrained: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> Backbone:
    shape = {name: int(value) for name, value in _backbone_shape(network.config.to_dict()).items()}
    network = network.to(device=device, dtype=dtype).eval()
    return Backbone(model=network, model_id=model_id, normalisation=normalisation, untrained=untrained,
                    device=device, dtype=dtype, **shape)


def _untrained(
    model: str,
    spec: ModelSpec | None,
    failures: list[tuple[str, Exception]],
    device: torch.device,
    dtype: torch.dtype,
) -> Backbone:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    if spec is None:
        raise ModelUnavailableError(
            explain_load_failure(*failures[0])
            + f" Untrained weights need a known architecture: use a catalogue name "
            f"({', '.join(CATALOGUE)}) instead of {model}."
        )
    config = DINOv3ViTConfig(**spec.architecture.hub_config(), num_register_tokens=4, patch_size=16,
                             layerscale_value=1e-5)
    log.warning(
        "UNTRAINED WEIGHTS: %s could not be loaded; using a randomly initialised %s. "
        "The result only checks the pipeline.", spec.repo_ids[0], spec.label,
    )
    import torch

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    network = DINOv3ViTModel(config)
    torch.random.set_rng_state(generator_state)
    return _ready(network, spec.repo_ids[0], spec.normalisation, True, device, dtype)


def explain_load_failure(repo_id: str, error: Exception) -> str:
    """A message for a model that could not be loaded: what happened and what to do."""
    if isinstance(error, ModelUnavailableError):
        return str(error)
    kind = classify_hub_error(error)
    page = model_page(repo_id)
    login = ("then log in: in QGIS save a read token under Raster ▸ TreeSeg (DINOv3) ▸ Models… (Hugging Face "
             "token, Save token); else set the HF_TOKEN environment variable or run `hf auth login`")
    if kind == "gated":
        return (
            f"Access to {repo_id} was refused (HTTP 401/403): the DINOv3 weights are gated. "
            f"Accept the licence on {page} with your Hugging Face account, {login}."
        )
    if kind == "not_found":
        return (
            f"{repo_id} was not found on the Hugging Face hub, or your account has no access "
            f"to it. Check the name; for a gated model accept the licence on {page}, {login}."
        )
    if kind == "busy":
        return (
            f"The Hugging Face hub could not serve {repo_id} just now (too many requests, or a problem on "
            "its side): try again in a few minutes."
        )
    if kind == "offline":
        return (
            f"The weights of {repo_id} are not in the local Hugging Face cache and the hub "
            f"cannot be reached (offline). On a connected machine accept the licence on "
            f"{page}, {login} and run once to download them; or copy the model folder here "
            "and pass the folder as the model; or allow untrained weights to check the "
            "pipeline only."
        )
    return f"Could not load {repo_id}: {error}"


def classify_hub_error(error: BaseException) -> str:
    """'gated', 'not_found', 'busy' (HTTP 429 or 5xx), 'offline' or 'other' for an error raised while loading."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        if isinstance(item, GatedRepoError):
            return "gated"
        if isinstance(item, HfHubHTTPError):
            status = getattr(getattr(item, "response", None), "status_code", None)
            if status in (401, 403):
                return "gated"
            if status == 429 or (isinstance(status, int) and status >= 500):
                return "busy"
        if isinstance(item, RepositoryNotFoundError):
            return "not_found"
        if isinstance(item, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
            return "offline"
    text = " ".join(str(item) for item in chain).lower()
    if "gated repo" in text or "401" in text or "403" in text:
        return "gated"
    if "couldn't connect" in text or os.environ.get("HF_HUB_OFFLINE") == "1":
        return "offline"
    return "other"
