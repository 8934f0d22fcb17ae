"""The interactive predictor's configuration and the choice the service serves, as typed values.

`InteractiveConfig` holds every knob of the served click predictor with the project's ONE set of defaults
(backend/settings.py builds it from the environment, `python -m model.bench` from its arguments).
`PredictorChoice` is what choosing a predictor yields: kind, a cheap version (no weights loaded), the reason
shown in /health, `build(engine, bank) -> Predictor` (one predictor per reference bank; the network's
weights are shared through the engine's process) and, for the blended learned predictor, `calibrate` (the
per-project click calibration run when a project's bank is complete). `residual_choice` is the zero-training click mode;
`with_refinement` wraps any choice's predictors in the full-resolution boundary refinement
(model/interactive/refine.py), `with_seeded` in the click-seeded stage (model/interactive/seeded.py). The learned choice is `model.interactive.learned.load_interactive_predictor`.

Light on purpose: nothing here imports torch (the settings module imports this one for its defaults)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.types import Engine, Predictor, ReferenceSet

REFINE_METHODS = ("guided", "grabcut", "off")


@dataclass(frozen=True)
class InteractiveConfig:
    """How the interactive predictor is built. These defaults are the served defaults (docs/SETTINGS.md)."""

    use_prompt: bool = False  # ADCLICK_USE_PROMPT: the label name / TextArea text goes to the network as its prompt
    learned_weight: float = 0.5  # ADCLICK_LEARNED_WEIGHT: the network's share of the map (1 = the network alone)
    weights_dir: Path | None = None  # where the learned weights are; None = the bundled `weights` package
    object_name: str = ""  # the inspected object's name, part of the prompt
    refine: str = "guided"  # ADCLICK_REFINE: full-resolution boundary refinement, guided | grabcut | off
    seeded: bool = True  # ADCLICK_SEEDED: the click-seeded stage (model/interactive/seeded.py) with selection
    calibrate: bool = False  # ADCLICK_CALIBRATE: the blend's weight and threshold calibrated per project (calibration.py)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.learned_weight) <= 1.0:
            raise ValueError(f"learned_weight must be between 0 and 1, got {self.learned_weight}")
        if self.refine not in REFINE_METHODS:
            raise ValueError(f"refine must be one of {REFINE_METHODS}, got {self.refine!r}")


@dataclass(frozen=True)
class PredictorChoice:
    """Which interactive predictor a process serves: `kind`, a cheap `version` (no weights loaded), `build(engine,
    bank) -> Predictor` (one predictor per reference bank) and `reason` (why this predictor; /health shows it)."""

    kind: str
    version: str
    build: Callable[[Engine, ReferenceSet], Predictor]
    reason: str = ""
    # calibrate(engine, bank, references, cache_dir) -> dict | None: the per-project click calibration of this
    # predictor (model/interactive/calibration.py; (content hash, RGB image) references; sets
    # bank.meta["click_calibration"]). None: this predictor has nothing to calibrate.
    calibrate: Callable[..., dict | None] | None = None


def residual_choice(engine: Engine, reason: str = "") -> PredictorChoice:
    """The zero-training click mode (model/interactive/clickmode.py) over the engine's residuals."""

    def build(eng, bank):  # the residual engine and one of its banks
        from model.interactive.clickmode import ResidualClickPredictor

        return ResidualClickPredictor(eng, bank)

    return PredictorChoice("residual-click", f"residual-click-{engine.config_hash()}", build, reason)


def with_refinement(choice: PredictorChoice, method: str) -> PredictorChoice:
    """`choice` with each predictor wrapped in RefinedPredictor (method guided | grabcut); unchanged for "off".
    The version says so (`-refine`, `-refine-grabcut`), so cached states and published versions never mix."""
    if method == "off":
        return choice
    from model.interactive.refine import RefineConfig, RefinedPredictor

    cfg, base_build = RefineConfig(method=method), choice.build

    def build(eng: Engine, bank: ReferenceSet) -> Predictor:
        return RefinedPredictor(base_build(eng, bank), cfg)

    suffix = "" if method == "guided" else f"-{method}"
    note = f"{method} boundary refinement on"
    reason = f"{choice.reason}; {note}" if choice.reason else note
    return PredictorChoice(choice.kind, f"{choice.version}-refine{suffix}", build, reason, choice.calibrate)


def with_seeded(choice: PredictorChoice, on: bool) -> PredictorChoice:
    """`choice` with each predictor wrapped in SeededPredictor (the default SeededConfig: the stage's mask is served
    only once the clicks found clearly less error in it than in the map's); unchanged when `on` is False. The
    version says so (`-seeded`)."""
    if not on:
        return choice
    from model.interactive.seeded import SeededConfig, SeededPredictor

    cfg, base_build = SeededConfig(), choice.build

    def build(eng: Engine, bank: ReferenceSet) -> Predictor:
        return SeededPredictor(base_build(eng, bank), cfg)

    note = "click-seeded stage on (served where the clicks prove the map wrong)"
    reason = f"{choice.reason}; {note}" if choice.reason else note
    return PredictorChoice(choice.kind, f"{choice.version}-seeded", build, reason, choice.calibrate)
