"""Service settings. `Settings.from_env()` is the only place in the project that reads `os.environ`;
every variable is listed in docs/SETTINGS.md."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from backend.errors import BadRequest, ConfigError
from backend.outbound import check_url, redact
from model.interactive.choose import REFINE_METHODS, InteractiveConfig

_INTERACTIVE = InteractiveConfig()  # the interactive predictor's defaults live in the model layer, once

_MB = 1024 * 1024


def _text(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, default).strip()


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """The default unless the variable spells the opposite (on: 1/true/yes/on, off: 0/false/no/off)."""
    return (not default) if _text(env, name).lower() in (_OFF if default else _ON) else default


def _number(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    model_dir: Path = Path("data/models")
    device: str = "auto"
    normal_dir: str = ""
    log_level: str = "INFO"
    local_files_root: str = ""  # LOCAL_FILES_DOCUMENT_ROOT: read /data/local-files/ from disk when set
    image_timeout_s: float = 30.0  # wall-clock deadline of one download (all redirects, headers and body)
    download_concurrency: int = 4  # image downloads running at once per process; a request finding none free: 503
    max_image_bytes: int = 50 * _MB
    max_image_pixels: int = 50_000_000
    download_cache_bytes: int = 2048 * _MB
    state_cache_bytes: int = 1024 * _MB
    train_after_annotations: int = 5
    train_debounce_s: float = 60.0
    predictor: str = "auto"  # auto | learned | residual
    learned_weight: float = _INTERACTIVE.learned_weight  # learned map's share when averaged with the click mode
    use_prompt: bool = _INTERACTIVE.use_prompt  # send the label name / TextArea text to the network as its prompt
    refine: str = _INTERACTIVE.refine  # full-resolution boundary refinement of each click's map: guided | grabcut | off
    seeded: bool = _INTERACTIVE.seeded  # ADCLICK_SEEDED: the click-seeded stage (model/interactive/seeded.py)
    calibrate: bool = _INTERACTIVE.calibrate  # ADCLICK_CALIBRATE: per-project calibration of the blend (calibration.py)
    max_reference_images: int = 200
    warm_on_setup: bool = True  # /setup starts loading the model and the project's bank in the background
    sync_card_title: bool = True  # LS_SYNC_CARD_TITLE: rename the Label Studio model card to the served version
    bank_wait_s: float = 60.0  # a request waits this long for a project's first reference bank, then 503
    first_references: int = 4  # references of a project's first bank (ready in seconds; it then grows)
    bank_cache_bytes: int = 1024 * _MB  # memory budget of the reference banks held (LRU, shared by projects)
    compute_concurrency: int = 2  # per-image computations (backbone passes) running at once per process
    redis_url: str = ""  # when set, fits run on RQ workers (backend/queue.py, backend/worker.py)
    seg_keep_versions: int = 3  # ADClick-Seg versions kept per project
    seg_fit_steps: int = 60  # most optimisation steps of one ADClick-Seg fit
    seg_holdout: float = 0.2  # share of labelled images held out to evaluate each fit
    seg_max_ok_images: int = 20  # most OK-verdict images used as all-normal training examples
    max_clicks: int = 50  # most keypoints in one interactive request (ADCLICK_MAX_CLICKS); more: 400
    max_tasks: int = 1000  # most tasks in one /predict request (MAX_TASKS_PER_REQUEST); more: 400
    max_body_bytes: int = 64 * _MB  # largest request body (MAX_BODY_MB); more: 413
    train_nice: int = 10  # TRAIN_NICE: CPU priority of training (a nice increment); clicks keep the cores first
    train_max_requeues: int = 2  # a job whose process died is queued again at most this often, then failed
    adapt: bool = True  # ADCLICK_ADAPT: per-project adaptation of the interactive network (backend/adaptation.py)
    adapt_minutes: float = 8.0  # ADCLICK_ADAPT_MINUTES: time budget of one adaptation (extra_params adapt_minutes)
    adapt_keep: int = 3  # ADCLICK_ADAPT_KEEP: adapted interactive versions kept per project

    def __post_init__(self) -> None:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            missing = "BASIC_AUTH_PASS" if self.basic_auth_user else "BASIC_AUTH_USER"
            raise ConfigError(
                f"only one of BASIC_AUTH_USER / BASIC_AUTH_PASS is set ({missing} is empty): set both to require "
                "HTTP basic auth, or neither to turn it off"
            )

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        url = _text(env, "LABEL_STUDIO_URL") or _text(env, "LABEL_STUDIO_HOST")
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"LABEL_STUDIO_URL must start with http:// or https://, got {redact(url)!r}")
        if url:
            try:
                target = check_url(url.rstrip("/") + "/")
            except BadRequest as exc:
                raise ConfigError(f"LABEL_STUDIO_URL: {exc.message}") from None
            if target.has_userinfo:
                raise ConfigError(
                    "LABEL_STUDIO_URL must not carry user:pass@ (the token is never sent with URL credentials)"
                )
        device = _text(env, "DEVICE", "auto").lower() or "auto"
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"DEVICE must be auto, cpu or cuda, got {device!r}")
        predictor = _text(env, "ADCLICK_PREDICTOR", "auto").lower() or "auto"
        if predictor not in ("auto", "learned", "residual"):
            raise ConfigError(f"ADCLICK_PREDICTOR must be auto, learned or residual, got {predictor!r}")
        learned_weight = _number(env, "ADCLICK_LEARNED_WEIGHT", _INTERACTIVE.learned_weight)
        if learned_weight > 1:
            raise ConfigError(f"ADCLICK_LEARNED_WEIGHT must be between 0 and 1, got {learned_weight}")
        refine = _text(env, "ADCLICK_REFINE", _INTERACTIVE.refine).lower() or _INTERACTIVE.refine
        refine = "guided" if refine in _ON else "off" if refine in _OFF + ("none",) else refine
        if refine not in REFINE_METHODS:
            raise ConfigError(f"ADCLICK_REFINE must be guided, grabcut or off, got {refine!r}")
        return cls(
            label_studio_url=url.rstrip("/"),
            label_studio_api_key=_text(env, "LABEL_STUDIO_API_KEY")
            or _text(env, "LABEL_STUDIO_ACCESS_TOKEN"),
            basic_auth_user=_text(env, "BASIC_AUTH_USER"),
            basic_auth_pass=env.get("BASIC_AUTH_PASS", ""),
            model_dir=Path(_text(env, "MODEL_DIR", "data/models") or "data/models"),
            device=device,
            normal_dir=_text(env, "ADCLICK_NORMAL_DIR"),
            log_level=(_text(env, "LOG_LEVEL", "INFO") or "INFO").upper(),
            local_files_root=_text(env, "LOCAL_FILES_DOCUMENT_ROOT"),
            image_timeout_s=_number(env, "IMAGE_TIMEOUT_S", 30.0, minimum=0.1),
            download_concurrency=int(_number(env, "DOWNLOAD_CONCURRENCY", 4, minimum=1)),
            max_image_bytes=int(_number(env, "MAX_IMAGE_MB", 50, minimum=0.001) * _MB),
            max_image_pixels=int(_number(env, "MAX_IMAGE_MPIX", 50, minimum=0.000001) * 1_000_000),
            download_cache_bytes=int(_number(env, "DOWNLOAD_CACHE_MB", 2048) * _MB),
            state_cache_bytes=int(_number(env, "STATE_CACHE_MB", 1024) * _MB),
            train_after_annotations=int(_number(env, "TRAIN_AFTER_ANNOTATIONS", 5, minimum=1)),
            train_debounce_s=_number(env, "TRAIN_DEBOUNCE_S", 60.0),
            predictor=predictor,
            learned_weight=learned_weight,
            use_prompt=_flag(env, "ADCLICK_USE_PROMPT", _INTERACTIVE.use_prompt),
            refine=refine,
            seeded=_flag(env, "ADCLICK_SEEDED", _INTERACTIVE.seeded),
            calibrate=_flag(env, "ADCLICK_CALIBRATE", _INTERACTIVE.calibrate),
            max_reference_images=int(_number(env, "ADCLICK_MAX_REFERENCES", 200, minimum=1)),
            redis_url=_text(env, "REDIS_URL"),
            bank_wait_s=_number(env, "BANK_WAIT_S", 60.0),
            first_references=int(_number(env, "ADCLICK_FIRST_REFERENCES", 4, minimum=1)),
            bank_cache_bytes=int(_number(env, "BANK_CACHE_MB", 1024) * _MB),
            compute_concurrency=int(_number(env, "COMPUTE_CONCURRENCY", 2, minimum=1)),
            warm_on_setup=_flag(env, "WARM_ON_SETUP", True),
            sync_card_title=_flag(env, "LS_SYNC_CARD_TITLE", True),
            seg_keep_versions=int(_number(env, "SEG_KEEP_VERSIONS", 3, minimum=1)),
            seg_fit_steps=int(_number(env, "SEG_FIT_STEPS", 60, minimum=1)),
            seg_holdout=_number(env, "SEG_HOLDOUT", 0.2),
            seg_max_ok_images=int(_number(env, "SEG_MAX_OK_IMAGES", 20)),
            max_clicks=int(_number(env, "ADCLICK_MAX_CLICKS", 50, minimum=1)),
            max_tasks=int(_number(env, "MAX_TASKS_PER_REQUEST", 1000, minimum=1)),
            max_body_bytes=int(_number(env, "MAX_BODY_MB", 64, minimum=0.001) * _MB),
            train_max_requeues=int(_number(env, "TRAIN_MAX_REQUEUES", 2)),
            train_nice=int(_number(env, "TRAIN_NICE", 10)),
            adapt=_flag(env, "ADCLICK_ADAPT", True),
            adapt_minutes=_number(env, "ADCLICK_ADAPT_MINUTES", 8.0),
            adapt_keep=int(_number(env, "ADCLICK_ADAPT_KEEP", 3, minimum=1)),
        )


def interactive_config(settings: Settings) -> InteractiveConfig:
    """The interactive predictor's configuration, built once from the settings (the bundled weights; the
    object name is not a setting of the interactive predictor)."""
    return InteractiveConfig(use_prompt=settings.use_prompt, learned_weight=settings.learned_weight,
                             refine=settings.refine, seeded=settings.seeded, calibrate=settings.calibrate)
