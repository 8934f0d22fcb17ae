import pytest

from backend.errors import ConfigError as BackendConfigError
from backend.settings import Settings


def test_defaults_without_environment():
    s = Settings.from_env({})
    assert s.device == "auto" and str(s.model_dir) == "data/models"
    assert (s.seg_keep_versions, s.seg_fit_steps, s.seg_holdout, s.seg_max_ok_images) == (3, 60, 0.2, 20)
    assert (s.predictor, s.learned_weight, s.use_prompt, s.refine) == ("auto", 0.5, False, "guided")


@pytest.mark.parametrize("value, method", [("0", "off"), ("off", "off"), ("1", "guided"), ("GrabCut", "grabcut")])
def test_refinement_setting(value, method):
    assert Settings.from_env({"ADCLICK_REFINE": value}).refine == method


def test_training_knobs_come_from_the_environment():
    s = Settings.from_env({"SEG_KEEP_VERSIONS": "5", "SEG_FIT_STEPS": "25", "SEG_HOLDOUT": "0.3",
                           "SEG_MAX_OK_IMAGES": "4", "TRAIN_AFTER_ANNOTATIONS": "2"})
    assert (s.seg_keep_versions, s.seg_fit_steps, s.seg_holdout, s.seg_max_ok_images) == (5, 25, 0.3, 4)
    assert s.train_after_annotations == 2


@pytest.mark.parametrize("env, name", [
    ({"SEG_FIT_STEPS": "many"}, "SEG_FIT_STEPS"),
    ({"SEG_KEEP_VERSIONS": "0"}, "SEG_KEEP_VERSIONS"),
    ({"DEVICE": "tpu"}, "DEVICE"),
    ({"ADCLICK_REFINE": "crf"}, "ADCLICK_REFINE"),
    ({"LABEL_STUDIO_URL": "ls:8080"}, "LABEL_STUDIO_URL"),
])
def test_bad_values_are_refused_naming_the_variable(env, name):
    with pytest.raises(BackendConfigError, match=name):
        Settings.from_env(env)
