"""The models treeseg knows: names, Hugging Face ids, sizes and shapes.

Standard library only, so the QGIS side (panel, model manager) and the engine
(core/models.py) read the same facts. Parameter counts and download sizes are those
of the published float32 safetensors weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HUB_URL = "https://huggingface.co"
LVD_1689M = "LVD-1689M"
SAT_493M = "SAT-493M"
PATCH = 16
"""The patch size in pixels of every supported model (DINOv3 ViT/16): one feature per patch at the default stride."""


@dataclass(frozen=True)
class Architecture:
    """Shape of a DINOv3 ViT/16, enough to build it with random weights or size its memory."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    gated_mlp: bool

    @classmethod
    def from_hub_config(cls, config: dict[str, Any]) -> Architecture:
        """The shape a Hugging Face config.json describes; KeyError, ValueError or TypeError where it does not."""
        return cls(int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["num_attention_heads"]),
                   int(config["intermediate_size"]), bool(config.get("use_gated_mlp", False)))

    def hub_config(self) -> dict[str, Any]:
        """This shape as Hugging Face DINOv3ViTConfig values (a gated MLP runs SiLU, the others GELU)."""
        return {"hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "intermediate_size": self.intermediate_size,
                "use_gated_mlp": self.gated_mlp, "hidden_act": "silu" if self.gated_mlp else "gelu"}


@dataclass(frozen=True)
class CatalogueModel:
    """One model: a user-facing name, the repositories behind it (first = preferred) and its size."""

    name: str
    label: str
    repo_ids: tuple[str, ...]
    params_millions: float
    download_bytes: int
    architecture: Architecture
    pretraining: str

    @property
    def repo_id(self) -> str:
        return self.repo_ids[0]

    @property
    def page(self) -> str:
        return model_page(self.repo_id)


def model_page(repo_id: str) -> str:
    return f"{HUB_URL}/{repo_id}"


def _lvd(variant: str) -> str:
    return f"facebook/dinov3-{variant}-pretrain-lvd1689m"


def _sat(variant: str) -> str:
    return f"facebook/dinov3-{variant}-pretrain-sat493m"


VIT_S = Architecture(384, 12, 6, 1536, False)
VIT_S_PLUS = Architecture(384, 12, 6, 1536, True)
VIT_B = Architecture(768, 12, 12, 3072, False)
VIT_L = Architecture(1024, 24, 16, 4096, False)
VIT_H_PLUS = Architecture(1280, 32, 20, 5120, True)
VIT_7B = Architecture(4096, 40, 32, 8192, True)

BACKBONES: dict[str, CatalogueModel] = {
    model.name: model
    for model in (
        CatalogueModel("small", "ViT-S/16 (S+ first, S as fall-back)", (_lvd("vits16plus"), _lvd("vits16")),
                       29, 115_000_000, VIT_S_PLUS, LVD_1689M),
        CatalogueModel("small+", "ViT-S+/16", (_lvd("vits16plus"),), 29, 115_000_000, VIT_S_PLUS, LVD_1689M),
        CatalogueModel("base", "ViT-B/16", (_lvd("vitb16"),), 86, 343_000_000, VIT_B, LVD_1689M),
        CatalogueModel("large", "ViT-L/16", (_lvd("vitl16"),), 300, 1_213_000_000, VIT_L, LVD_1689M),
        CatalogueModel("giant", "ViT-H+/16", (_lvd("vith16plus"),), 840, 3_363_000_000, VIT_H_PLUS, LVD_1689M),
        CatalogueModel("mega", "ViT-7B/16", (_lvd("vit7b16"),), 6716, 26_866_000_000, VIT_7B, LVD_1689M),
        CatalogueModel("large-sat", "ViT-L/16, satellite (SAT-493M)", (_sat("vitl16"),), 300, 1_213_000_000,
                       VIT_L, SAT_493M),
        CatalogueModel("mega-sat", "ViT-7B/16, satellite (SAT-493M)", (_sat("vit7b16"),), 6716, 26_866_000_000,
                       VIT_7B, SAT_493M),
    )
}
DEFAULT_MODEL = "base"

HEIGHT_HEAD = CatalogueModel("canopy-height", "Canopy height: CHMv2 DPT head on ViT-L/16",
                             ("facebook/dinov3-vitl16-chmv2-dpt-head",), 337, 1_348_000_000, VIT_L, SAT_493M)

MODELS: dict[str, CatalogueModel] = {**BACKBONES, HEIGHT_HEAD.name: HEIGHT_HEAD}
"""Everything the model manager lists: the backbones and the canopy-height head."""


def find_model(name_or_repo_id: str) -> CatalogueModel | None:
    """The catalogue model with this name or Hugging Face id, or None."""
    if name_or_repo_id in MODELS:
        return MODELS[name_or_repo_id]
    for model in MODELS.values():
        if name_or_repo_id in model.repo_ids:
            return model
    return None
