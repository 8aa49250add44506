"""What the run panel tells before a run: the memory it needs and, for a whole layer, its tiles and time, on the
device the engine's probe found; learnt from this machine's last runs (their measured time over their estimate,
the int8 exports already made), kept in QgsSettings."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from qgis.core import QgsSettings

from ...memory import (
    RUN_BATCH_SIZE,
    RUN_TILE_SIZE,
    available_memory_bytes,
    estimate_peak_bytes,
    estimate_run_time,
    format_gigabytes,
    memory_warning,
    model_entry,
    size_warning,
    speed_factor,
    tiles_and_time,
)
from ...params import AUTO
from ...run_record import RunRecord
from .engine_probe import EngineProbe
from .run_settings import SETTINGS_PREFIX

SPEED_SETTING = SETTINGS_PREFIX + "measured_over_estimated"
"""The last runs' measured seconds over their estimates (JSON list): this machine's speed for the next estimate."""
EXPORTED_SETTING = SETTINGS_PREFIX + "int8_exported_models"
"""The models whose int8 export the engine has made and cached (JSON list)."""
SPEED_RUNS_KEPT = 3
UNESTIMATED_STEPS = ("canopy_height", "crowns")
"""Run-record timings of the optional steps the time estimate does not count."""


def parameters_label(millions: float) -> str:
    """E.g. '86 M parameters', '6.7 B parameters'."""
    if millions >= 1000:
        return f"{millions / 1000:.1f} B parameters"
    return f"{millions:.0f} M parameters" if millions >= 10 else f"{millions:.1f} M parameters"


def _kept_list(key: str) -> list[Any]:
    """The JSON list kept in the setting `key`; empty before any."""
    return json.loads(QgsSettings().value(key, "[]", type=str) or "[]")


@dataclass(frozen=True)
class RunChoice:
    """The panel's choices an estimate depends on; `device` and `precision` as chosen (possibly auto), `size` the
    whole layer's (width, height) in pixels, None when the run covers part of it or there is no raster."""

    model: str
    stride: int
    device: str
    precision: str
    automatic_k: bool
    size: tuple[int, int] | None

    @property
    def model_key(self) -> tuple[str, str, str]:
        """What the engine keeps a loaded model for: the model, the device and the precision, as chosen."""
        return self.model, self.device, self.precision


class RunEstimates:
    """The estimates for the panel's choices on the engine `probe` found; `run_started` and `learn_from` around
    each run teach it this machine's speed and what the engine has loaded and exported."""

    def __init__(self, probe: EngineProbe) -> None:
        self._probe = probe
        self._loaded_model: tuple[str, str, str] | None = None
        self._run_timing: tuple[float, dict[str, Any]] | None = None

    def _device(self, choice: RunChoice) -> str:
        """cpu, cuda or mps: the device chosen, or for auto the one the engine's probe found (cpu before)."""
        if choice.device != AUTO:
            return choice.device
        return str(self._probe.found("device", "cpu")).split(":")[0]

    def _precision(self, choice: RunChoice) -> str:
        """The precision the run computes in: the one chosen, or for auto what the engine's probe said (int8 on
        a CPU with fast int8, before the probe too)."""
        return choice.precision if choice.precision != AUTO else str(self._probe.found("precision", "int8"))

    def _options(self, choice: RunChoice) -> dict[str, Any]:
        """What the time estimate needs besides the raster: the precision, automatic K, and what is still to come
        before the first tile (the engine start, the model load, the first int8 export)."""
        engine = self._probe.engine
        started = engine is not None and engine.running
        return {"precision": self._precision(choice), "automatic_k": choice.automatic_k,
                "engine_started": started, "model_loaded": started and self._loaded_model == choice.model_key,
                "exported": choice.model in _kept_list(EXPORTED_SETTING)}

    def _memory_needed_and_free(self, choice: RunChoice) -> tuple[int | None, int | None, str]:
        """(bytes the run needs, bytes free where it runs, the device)."""
        device = self._device(choice)
        needed = estimate_peak_bytes(choice.model, choice.stride, RUN_TILE_SIZE, RUN_BATCH_SIZE, device)
        free = available_memory_bytes() if device == "cpu" else self._probe.found("memory_available_bytes", None)
        return needed, free, device

    def memory_problem(self, choice: RunChoice) -> str | None:
        """The warning when the run will not fit the memory of its device; None when it fits or cannot be told."""
        _, free, device = self._memory_needed_and_free(choice)
        return memory_warning(choice.model, choice.stride, RUN_TILE_SIZE, RUN_BATCH_SIZE, free, device)

    def size_problem(self, choice: RunChoice) -> str | None:
        """The warning when the run over the whole layer is expected to take very long; None otherwise."""
        if choice.size is None:
            return None
        return size_warning(choice.model, *choice.size, choice.stride, RUN_TILE_SIZE, self._device(choice),
                            **self._options(choice), speed=self._speed())

    def describe(self, choice: RunChoice, override: bool) -> tuple[str, bool]:
        """(the model that runs, named as the override when `override`, its size, the memory the run needs and,
        for a whole layer, its tiles and time; True when the run will not fit the memory where it runs)."""
        entry = model_entry(choice.model)
        needed, free, device = self._memory_needed_and_free(choice)
        name = entry.name if entry is not None else choice.model
        model = f"Runs <b>{name}</b> (model override)" if override else f"<b>{name}</b>"
        if entry is not None:
            model += f", {parameters_label(entry.params_millions)}"
        if needed is None:
            memory = "memory needed unknown until it loads"
        else:
            where = "this computer" if device == "cpu" else f"the {device.upper()} device"
            memory = f"needs about {format_gigabytes(needed)} of memory"
            memory += f"; {format_gigabytes(free)} free on {where}" if free is not None else ""
        if choice.size is not None:
            memory += ". The layer: " + tiles_and_time(choice.model, *choice.size, choice.stride, RUN_TILE_SIZE,
                                                       device, **self._options(choice), speed=self._speed())
        return f"{model}: {memory}.", needed is not None and free is not None and needed > free

    def run_started(self, choice: RunChoice) -> None:
        """A run with `choice` starts now: its time is measured against the estimate made now."""
        self._run_timing = (time.monotonic(), self._options(choice))

    def learn_from(self, record: RunRecord, choice: RunChoice) -> None:
        """After a run (`choice`: the panel's choices now): keep its measured time over its estimate for the next
        estimates, and what it loaded and exported."""
        started, options = self._run_timing or (None, {})
        self._loaded_model = choice.model_key
        if (record.model.precision or "").startswith("int8"):
            exported = _kept_list(EXPORTED_SETTING)
            QgsSettings().setValue(EXPORTED_SETTING, json.dumps(sorted({*exported, choice.model})))
        ran = record.parameters
        expected = estimate_run_time(ran.model, record.input.width, record.input.height, record.stride,
                                     ran.tile_size, self._device(choice), ran.overlap, **options)
        if started is None or expected is None or record.feature_cache.state == "hit":
            return
        # Steps the estimate leaves out (the canopy-height head, crowns) must not be learnt as slowness.
        unestimated = sum(record.timings.get(step, 0.0) for step in UNESTIMATED_STEPS)
        measured = [*_kept_list(SPEED_SETTING),
                    max(time.monotonic() - started - unestimated, 0.0) / expected.total][-SPEED_RUNS_KEPT:]
        QgsSettings().setValue(SPEED_SETTING, json.dumps(measured))

    @staticmethod
    def _speed() -> float:
        """This machine's measured speed against the estimates of its last runs (1 before any)."""
        return speed_factor(_kept_list(SPEED_SETTING))
