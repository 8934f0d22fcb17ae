"""Learned ADClick predictor (Predictor protocol) and the choice between it and the zero-training mode.

`AdClickPredictor.set_image` runs the residual engine and the network's per-image encoder once and returns an
immutable `AdClickState`; `predict` runs only the click-conditioned decoder (click maps -> windowed blocks ->
head) and `detect` runs it once per label prompt without clicks. Prompt vectors are cached by text.

`load_interactive_predictor(engine, config=InteractiveConfig(), name="adclick", text_encoder=None)` is cheap
(reads the manifest, hashes the weights file, compares configs; loads no weights) and returns a
`PredictorChoice` (model/interactive/choose.py: kind, version, build(engine, bank) -> predictor, reason) or None
when no compatible learned weights are bundled; `check_weights` gives the reason string either way (the service
shows it in /health).
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.engine.references import ReferenceBank
from model.engine.residuals import ResidualEngine, ResidualState
from model.errors import CheckpointError, ConfigError, InputError
from model.interactive.choose import InteractiveConfig, PredictorChoice, with_refinement, with_seeded
from model.interactive.clicks import click_maps, half
from model.modeling.adclick import ImageEmbedding
from model.types import AnomalyResult, Box, Click, ClickResult, Engine, box_mask

logger = logging.getLogger(__name__)

THRESHOLD = 0.49


@dataclass(frozen=True)
class AdClickState:
    """Per-image cache: the engine's residual state and the network's click-free image embedding."""

    residual: ResidualState  # the engine's state (the click mode and ADClick-Seg work on it)
    emb: ImageEmbedding
    image_shape: tuple[int, int]  # (H, W)

    @property
    def image(self) -> np.ndarray | None:
        """The RGB image (the engine's state keeps it for the boundary refinement)."""
        return self.residual.image

    @property
    def nbytes(self) -> int:
        return int(self.emb.nbytes + self.residual.nbytes)


class AdClickPredictor:
    name = "adclick"

    def __init__(self, engine: ResidualEngine, bank: ReferenceBank, net, text_encoder=None, version: str = "adclick",
                 object_name: str = "", use_prompt: bool = True, threshold: float = THRESHOLD) -> None:
        self.engine, self.bank, self.net = engine, bank, net.eval()
        self.text = text_encoder
        self.version = version
        self.object_name = object_name
        self.use_prompt = use_prompt and text_encoder is not None
        self.threshold = threshold
        self._lock = threading.Lock()  # the text encoder's first load is not thread-safe

    # ---- per image ---------------------------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> AdClickState:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        return self.state_of(image, self.engine.compute(image, self.bank))

    def state_of(self, image: np.ndarray, rs: ResidualState) -> AdClickState:
        """The per-image state from the engine's residual state of `image` (computed by the caller)."""
        with torch.inference_mode():
            res = rs.residual.float()[None]
            grid = torch.from_numpy(np.asarray(rs.grid_map, np.float32))[None, None]
            feats = rs.features.float()[None] if self.net.cfg.feat_channels > 0 else None
            img = torch.from_numpy(half(image)).permute(2, 0, 1)[None].float() / 255.0
            emb = self.net.encode_image(res, grid, feats, img)
        return AdClickState(rs, emb, (int(image.shape[0]), int(image.shape[1])))

    # ---- per click ---------------------------------------------------------------------------------------
    def _prompt(self, prompt: str) -> torch.Tensor | None:
        if not self.use_prompt or not prompt.strip():
            return None
        with self._lock:
            vec = self.text.prompt_vector(prompt, "", self.object_name)
        return None if vec is None else vec[None]

    def _prob(self, state: AdClickState, clicks: list[Click], prompt: str,
              previous_mask: np.ndarray | None) -> np.ndarray:
        h, w = state.emb.tokens.shape[-2:]
        maps = click_maps(clicks, previous_mask, (2 * h, 2 * w), state.image_shape)
        with torch.inference_mode():
            logits = self.net.decode(state.emb, torch.from_numpy(maps)[None], self._prompt(prompt))
            prob = torch.sigmoid(F.interpolate(logits, size=state.image_shape, mode="bilinear",
                                               align_corners=False))
        return prob[0, 0].numpy()

    def predict(self, state: AdClickState, clicks: list[Click], box: Box | None = None, prompt: str = "",
                previous_mask: np.ndarray | None = None) -> ClickResult:
        H, W = state.image_shape
        clicks = list(clicks)
        for c in clicks:
            if not (0 <= c.x < W and 0 <= c.y < H):
                raise InputError(f"click ({c.x}, {c.y}) outside the {W}x{H} image")
        if box is not None and not any(c.positive for c in clicks):
            clicks.append(_box_peak(state, box))
        if previous_mask is not None and previous_mask.shape != (H, W):
            raise InputError(f"previous mask {previous_mask.shape} does not match the image {(H, W)}")
        prob = self._prob(state, clicks, prompt, previous_mask)
        if box is not None:
            prob = np.where(box_mask(box, (H, W)), prob, 0.0).astype(np.float32)
        mask = prob > self.threshold
        score = float(prob[mask].mean()) if mask.any() else float(prob.max())
        return ClickResult(prob=prob.astype(np.float32), mask=mask, score=score)

    def detect(self, state: AdClickState, labels: list[str] | None = None) -> AnomalyResult:
        """No clicks; one pass per label prompt ("" = any defect); anomaly_map = pixel-wise max."""
        names = list(labels) if labels else [""]
        maps = {name: self._prob(state, [], name, None) for name in names}
        amap = np.maximum.reduce(list(maps.values()))
        masks = {n: m > self.threshold for n, m in maps.items()}
        scores = {n: float(m.max()) for n, m in maps.items()}
        return AnomalyResult(anomaly_map=amap.astype(np.float32), score=float(amap.max()), masks=masks,
                             label_scores=scores)


def _box_peak(state: AdClickState, box: Box) -> Click:
    """A positive click where the residual map peaks inside the box."""
    amap = state.residual.anomaly_map
    y, x = np.unravel_index(int(np.argmax(np.where(box_mask(box, amap.shape), amap, -np.inf))), amap.shape)
    return Click(float(x), float(y), True)


def to_threshold(prob: np.ndarray, level: float) -> np.ndarray:
    """`prob` moved monotonically so that `level` lands on THRESHOLD (the level every later stage cuts at):
    piecewise linear on [0, level] and [level, 1]; unchanged when level == THRESHOLD."""
    prob = np.asarray(prob, np.float32)
    level = float(np.clip(level, 0.02, 0.98))
    if abs(level - THRESHOLD) < 1e-9:
        return prob
    low = prob * np.float32(THRESHOLD / level)
    high = np.float32(THRESHOLD) + (prob - np.float32(level)) * np.float32((1 - THRESHOLD) / (1 - level))
    return np.where(prob <= level, low, high).astype(np.float32)


class BlendPredictor:
    """The learned network's map averaged with the zero-training click mode's, on one residual state (the
    AdClickState carries the engine's ResidualState, so the click mode costs no extra backbone pass)."""

    name = "adclick-blend"

    def __init__(self, learned: AdClickPredictor, click_mode, weight: float = 0.5,
                 threshold: float = THRESHOLD, use_calibration: bool = True) -> None:
        self.learned, self.click_mode, self.weight, self.threshold = learned, click_mode, weight, threshold
        self.use_calibration = use_calibration
        self.version = learned.version

    def params(self) -> tuple[float, float]:
        """(weight, threshold): the network's share and the blended level that makes the mask. The project's
        click calibration (bank.meta["click_calibration"], model/interactive/calibration.py) when present and
        used, else this predictor's own."""
        cal = self.click_mode.bank.meta.get("click_calibration") if self.use_calibration else None
        if cal:
            return float(cal["weight"]), float(cal["threshold"])
        return self.weight, self.threshold

    def set_image(self, image: np.ndarray) -> AdClickState:
        return self.learned.set_image(image)

    def predict(self, state: AdClickState, clicks: list[Click], box: Box | None = None, prompt: str = "",
                previous_mask: np.ndarray | None = None) -> ClickResult:
        seeded = clicks
        if box is not None and not any(c.positive for c in clicks):
            # a box alone: the network gets one click on every anomalous part in it (the click mode's box
            # seeds), not one point, so a defect of several pieces is segmented whole; the click mode splits
            # the box itself (its box region)
            amap = state.residual.anomaly_map
            seeds = self.click_mode.box_seeds(amap, box_mask(box, amap.shape), float(np.median(amap)))
            seeded = list(clicks) + [Click(float(x), float(y), True) for y, x in seeds]
        a = self.learned.predict(state, seeded, box, prompt, previous_mask)
        b = self.click_mode.predict(state.residual, clicks, box, prompt, previous_mask)
        weight, level = self.params()
        prob = to_threshold(weight * a.prob + (1 - weight) * b.prob, level)
        mask = prob > THRESHOLD
        return ClickResult(prob=prob, mask=mask, score=float(prob[mask].mean()) if mask.any() else 0.0)

    def detect(self, state: AdClickState, labels: list[str] | None = None) -> AnomalyResult:
        """Without clicks: the click mode's unsupervised residual map (the network is trained for clicks)."""
        return self.click_mode.detect(state.residual, labels)


# ---- choosing the interactive predictor -------------------------------------------------------------
def default_weights_dir() -> Path:
    import weights

    return Path(weights.__file__).resolve().parent


def check_weights(engine, weights_dir: Path | None = None,
                  name: str = "adclick") -> tuple[dict | None, str]:
    """(manifest entry, reason): the entry when `name`'s weights exist, match their sha256 and the engine's
    backbone/residual config; else None and why not."""
    from weights import WeightsError, verify_entry

    wdir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    try:
        entry = verify_entry(wdir, name)
    except WeightsError as exc:
        return None, str(exc)
    backbone = engine.backbone_cfg.to_dict()
    for key, want in entry.get("engine", {}).get("backbone", {}).items():
        have = backbone.get(key)
        if key != "device" and (list(have) if isinstance(have, tuple) else have) != want:
            return None, f"{name} weights need backbone {key}={want!r}, the engine has {have!r}"
    pca = entry.get("engine", {}).get("residual", {}).get("pca_dim", 0)
    if pca != engine.cfg.pca_dim:
        return None, f"{name} weights need residual pca_dim={pca}, the engine has {engine.cfg.pca_dim}"
    return entry, f"learned ADClick weights {entry['file']} (sha256 {entry['sha256'][:8]})"


@functools.lru_cache(maxsize=16)  # the shipped weights and the adapted versions of projects
def _load_net(path: str, sha: str):
    from model.checkpoint import load_checkpoint
    from model.modeling.adclick import ARCH, AdClickConfig, AdClickNet

    ckpt = load_checkpoint(path, expected_arch=ARCH)
    net = AdClickNet(AdClickConfig.from_dict(ckpt["config"]))
    try:
        net.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the AdClick architecture: {exc}") from exc
    return net.eval()


@functools.lru_cache(maxsize=2)
def _text_encoder(kind: str):
    from model.modeling.text import CachedTextEncoder, TextConfig, build_text_encoder

    return CachedTextEncoder(build_text_encoder(TextConfig(kind=kind)))


DEFAULT_CONFIG = InteractiveConfig()


def load_interactive_predictor(engine: Engine, config: InteractiveConfig = DEFAULT_CONFIG,
                               name: str = "adclick", text_encoder=None) -> PredictorChoice | None:
    """The learned predictor's choice when compatible weights are bundled, else None (caller falls back to
    the zero-training ResidualClickPredictor). Cheap: no weights are loaded until `build` is called.
    `config.learned_weight` < 1 averages the network's map with the click mode's (`BlendPredictor`);
    `config.use_prompt` feeds label prompts; `config.refine` is not applied here (choose.with_refinement)."""
    use_prompt, learned_weight = config.use_prompt, float(config.learned_weight)
    wdir = config.weights_dir
    entry, reason = check_weights(engine, wdir, name)
    if entry is None:
        logger.warning("learned ADClick unavailable, zero-training click mode instead: %s", reason)
        return None
    path = str(Path(wdir or default_weights_dir()) / entry["file"])
    # an adapted project's weights (model/interactive/adapt.py) carry their version name in the manifest
    version = (str(entry.get("version") or f"adclick-{entry['sha256'][:8]}") + ("" if use_prompt else "-noprompt")
               + ("" if learned_weight >= 1 else f"-blend{learned_weight:g}"))
    obj = config.object_name

    def build(eng, bank):  # the residual engine and one of its banks -> AdClickPredictor | BlendPredictor
        net = _load_net(path, entry["sha256"])
        text = text_encoder
        if text is None and use_prompt:
            text = _text_encoder(entry.get("text", {}).get("kind", "minilm"))
        if text is not None and text.dim != net.cfg.text_dim:
            raise CheckpointError(f"text encoder {text.name} gives {text.dim}-d prompts, weights expect "
                                  f"{net.cfg.text_dim}")
        learned = AdClickPredictor(eng, bank, net, text, version, obj, use_prompt)
        if learned_weight >= 1:
            return learned
        from model.interactive.clickmode import ResidualClickPredictor

        return BlendPredictor(learned, ResidualClickPredictor(eng, bank), learned_weight)

    blend = "" if learned_weight >= 1 else f", averaged {learned_weight:g}:{1 - learned_weight:g} with the click mode"
    calibrate = None
    if learned_weight < 1 and config.calibrate:
        def calibrate(eng, bank, references, cache_dir=None):  # the blend's weight and threshold per project
            from model.interactive.calibration import CalibrationConfig, calibrate_bank

            cfg = CalibrationConfig(default_weight=learned_weight)
            return calibrate_bank(lambda b: build(eng, b), bank, references, version, cache_dir, cfg)

        blend += "; weight and threshold calibrated per project on its references"
    return PredictorChoice("adclick", version, build, reason + blend, calibrate)


def predictor_for(engine, bank, net, config: InteractiveConfig = DEFAULT_CONFIG, chain: bool = False):
    """The predictor the service builds over `bank` with the network `net` (the blend unless the network
    serves alone); with `chain`, wrapped as the service serves it (config.refine's boundary refinement, then the
    click-seeded stage when config.seeded): what adaptation (model/interactive/adapt.py) validates with.
    `unwrap(predictor)` gives back the AdClickPredictor inside."""
    def build(eng, bnk):
        learned = AdClickPredictor(eng, bnk, net, None, "adapting", config.object_name, use_prompt=False)
        if config.learned_weight >= 1:
            return learned
        from model.interactive.clickmode import ResidualClickPredictor

        return BlendPredictor(learned, ResidualClickPredictor(eng, bnk), float(config.learned_weight),
                              use_calibration=False)

    if not chain:
        return build(engine, bank)
    # the same wrappers, in the same order, as the service's chain (backend/serving.py)
    choice = PredictorChoice("adclick", "adapting", build)
    return with_seeded(with_refinement(choice, config.refine), config.seeded).build(engine, bank)


def unwrap(predictor) -> AdClickPredictor:
    """The AdClickPredictor inside a blend and its wrappers (refinement, seeded stage: their `base`)."""
    p = predictor
    while not isinstance(p, AdClickPredictor):
        p = p.learned if isinstance(p, BlendPredictor) else p.base
    return p


def shipped_network(engine, weights_dir: Path | None = None, name: str = "adclick"):
    """(network, manifest entry) of the weights in `weights_dir` (default: the shipped ones); CheckpointError
    when they are missing or do not fit the engine."""
    entry, reason = check_weights(engine, weights_dir, name)
    if entry is None:
        raise CheckpointError(reason)
    path = Path(weights_dir or default_weights_dir()) / entry["file"]
    return _load_net(str(path), entry["sha256"]), entry


def bench_builders() -> dict[str, Callable[[Any, Any, Any], Any]]:
    """The learned predictors for `python -m model.bench` (name -> builder(engine, bank, args)); the benchmark
    imports this module and asks, so serving never imports the benchmark."""
    def builder(name: str, use_prompt: bool = True, learned_weight: float = 1.0):
        def make(engine, bank, args):
            weights_dir = getattr(args, "weights_dir", None)  # the CLI's --weights-dir (absent in older callers)
            config = InteractiveConfig(use_prompt=use_prompt, learned_weight=learned_weight,
                                       weights_dir=Path(weights_dir) if weights_dir else None, refine="off")
            choice = load_interactive_predictor(engine, config, name=name)
            if choice is None:
                raise CheckpointError(check_weights(engine, config.weights_dir, name)[1])
            predictor = choice.build(engine, bank)
            refs = getattr(args, "ref_paths", None)
            if getattr(args, "calibrate", "off") == "on" and choice.calibrate is not None and refs:
                from model.engine.residuals import content_hash

                choice.calibrate(engine, bank, ((content_hash(p), p) for p in refs), engine.cache_dir)
            blend = getattr(args, "blend_opt", None) or []
            if blend and isinstance(predictor, BlendPredictor):
                from model.evaluation.runs import parse_overrides

                for key, value in parse_overrides(blend).items():
                    if key not in ("weight", "threshold", "use_calibration"):
                        raise ConfigError(f"--blend-opt {key}: known keys are weight, threshold, use_calibration")
                    setattr(predictor, key, value)
            return predictor
        return make

    return {
        "adclick": builder("adclick"),
        "adclick-blend": builder("adclick", use_prompt=False, learned_weight=0.5),
        "adclick-blend-prompt": builder("adclick", learned_weight=0.5),
        "adclick-blend-nores": builder("adclick_nores", use_prompt=False, learned_weight=0.5),
        "adclick-noprompt": builder("adclick", use_prompt=False),
        "adclick-nores": builder("adclick_nores"),
    }
