"""The benchmark's predictor registry: `PREDICTORS` / `@register_predictor(name)` of
`builder(engine, bank, args) -> Predictor`.

"residual", "grabcut" and "service" (the served backend over HTTP) are registered here; the
modules of PLUGIN_MODULES (model/interactive/learned.py) are imported on demand and offer theirs through
`bench_builders()`; NAME+refine wraps any of them in model.interactive.refine.RefinedPredictor.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from model.errors import ConfigError
from model.evaluation.baselines import GrabCutConfig, GrabCutPredictor
from model.evaluation.runs import parse_overrides
from model.types import Predictor

PredictorBuilder = Callable[[Any, Any, argparse.Namespace], Predictor]


PREDICTORS: dict[str, PredictorBuilder] = {}  # name -> builder(engine, bank, args)


PLUGIN_MODULES = ("model.interactive.learned",)  # imported on demand; each offers bench_builders() -> {name: builder}


def register_predictor(name: str) -> Callable[[PredictorBuilder], PredictorBuilder]:
    def deco(builder: PredictorBuilder) -> PredictorBuilder:
        PREDICTORS[name] = builder
        return builder
    return deco


@register_predictor("residual")
def _build_residual(engine, bank, args) -> Predictor:
    from model.interactive.clickmode import ResidualClickPredictor
    return ResidualClickPredictor(engine, bank)


@register_predictor("grabcut")
def _build_grabcut(engine, bank, args) -> Predictor:
    return GrabCutPredictor(GrabCutConfig(iterations=args.grabcut_iters))


@register_predictor("service")
def _build_service(engine, bank, args) -> Predictor:
    """The served backend over HTTP, as Label Studio calls it (model/evaluation/service.py): --service-url, else
    the real app started in this process with the benchmark's references and bank cache."""
    from model.evaluation.service import build_service_predictor
    return build_service_predictor(engine, args)


def get_builder(name: str) -> PredictorBuilder:
    """The builder of a registered predictor; NAME+refine wraps NAME in model.interactive.refine.RefinedPredictor (the
    full-resolution refinement of every click's map, as the service serves by default); NAME+seeded wraps NAME in
    model.interactive.seeded.SeededPredictor (clicks seed a geodesic segmentation; --seeded-opt to change it).
    Suffixes chain: adclick-blend+refine+seeded."""
    base, plus, suffix = name.rpartition("+")
    if plus:
        if suffix not in ("refine", "seeded", "focus"):
            raise ConfigError(f"unknown predictor suffix +{suffix} in {name!r}; known: +refine, +seeded, +focus")
        inner = get_builder(base)
        if suffix == "focus":
            def focused(engine, bank, args) -> Predictor:
                from model.interactive.focus import FocusConfig, FocusPredictor
                cfg = dataclasses.replace(FocusConfig(), **parse_overrides(getattr(args, "focus_opt", [])))
                return FocusPredictor(inner(engine, bank, args), cfg)
            return focused
        if suffix == "seeded":
            def seeded(engine, bank, args) -> Predictor:
                from model.interactive.seeded import SeededConfig, SeededPredictor
                cfg = dataclasses.replace(SeededConfig(), **parse_overrides(getattr(args, "seeded_opt", [])))
                return SeededPredictor(inner(engine, bank, args), cfg)
            return seeded

        def refined(engine, bank, args) -> Predictor:
            from model.interactive.refine import RefineConfig, RefinedPredictor
            cfg = dataclasses.replace(RefineConfig(), **parse_overrides(getattr(args, "refine_opt", [])))
            return RefinedPredictor(inner(engine, bank, args), cfg)
        return refined
    for module in PLUGIN_MODULES:
        if name in PREDICTORS:
            break
        try:
            plugin = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for key, builder in plugin.bench_builders().items():
            PREDICTORS.setdefault(key, builder)
    if name not in PREDICTORS:
        raise ConfigError(f"unknown predictor {name!r}; known: {sorted(PREDICTORS)}")
    return PREDICTORS[name]

