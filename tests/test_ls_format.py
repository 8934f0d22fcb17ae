"""Label config parsing, context -> clicks/box/prompt, and brush RLE results checked by the SDK."""

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from backend import ls_format
from backend.errors import BadRequest, LabelConfigError
from tests.api_support import CONTRACT_CONFIG as CONTRACT  # the contract's label config

MINIMAL = """<View><Image name="img" value="$photo"/>
  <BrushLabels name="b" toName="img"><Label value="Crack"/></BrushLabels></View>"""

RENAMED = """<View><Image name="pic" value="$url"/>
  <BrushLabels name="brush" toName="pic"><Label value="crack"/></BrushLabels>
  <KeyPointLabels name="kp" toName="pic" smart="true"><Label value="Crack"/></KeyPointLabels>
  <Choices name="qc" toName="pic"><Choice value="Good"/><Choice value="Defective"/></Choices></View>"""

NO_BRUSH = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Dent"/></RectangleLabels></View>"""

MISMATCH = """<View><Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Scratch"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Hole"/></KeyPointLabels></View>"""


@pytest.mark.parametrize(
    "xml, expected",
    [
        (
            CONTRACT,
            {
                "image_name": "image",
                "image_key": "image",
                "brush_name": "mask",
                "brush_labels": ("Scratch", "Dent"),
                "keypoint_names": ("click",),
                "rectangle_names": ("box",),
                "textarea_names": ("prompt",),
                "choices_name": "verdict",
                "ok_choice": "OK",
                "anomalous_choice": "Anomalous",
            },
        ),
        (
            MINIMAL,
            {
                "image_name": "img",
                "image_key": "photo",
                "brush_name": "b",
                "brush_labels": ("Crack",),
                "keypoint_names": (),
                "rectangle_names": (),
                "textarea_names": (),
                "choices_name": None,
            },
        ),
        (
            RENAMED,
            {
                "image_name": "pic",
                "image_key": "url",
                "brush_labels": ("crack",),
                "keypoint_names": ("kp",),
                "choices_name": "qc",
                "ok_choice": "Good",
                "anomalous_choice": "Defective",
            },
        ),
    ],
)
def test_parse_label_config_table(xml, expected):
    cfg = ls_format.parse_label_config(xml)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


def test_capabilities_follow_optional_tags():
    assert ls_format.parse_label_config(CONTRACT).capabilities == [
        "brush",
        "keypoints",
        "rectangle",
        "prompt",
        "verdict",
    ]
    assert ls_format.parse_label_config(MINIMAL).capabilities == ["brush"]


@pytest.mark.parametrize("xml, words", [(NO_BRUSH, "BrushLabels"), ("", "missing"), ("<View><Image", "XML")])
def test_unusable_configs_raise_clear_errors(xml, words):
    with pytest.raises(LabelConfigError, match=words):
        ls_format.parse_label_config(xml)


def test_smart_labels_must_exist_in_brushlabels():
    ls_format.check_smart_labels(ls_format.parse_label_config(CONTRACT))
    ls_format.check_smart_labels(ls_format.parse_label_config(RENAMED))  # "Crack" ~ "crack"
    with pytest.raises(LabelConfigError, match="Hole"):
        ls_format.check_smart_labels(ls_format.parse_label_config(MISMATCH))


def kp(x, y, label="Scratch", positive=True):
    return {
        "id": "k",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": 200,
        "original_height": 100,
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]},
    }


def test_context_percent_to_pixels_with_negatives_box_and_prompt():
    cfg = ls_format.parse_label_config(CONTRACT)
    ctx = {
        "result": [
            kp(50, 50),
            kp(25, 10, positive=False),
            {
                "type": "rectanglelabels",
                "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rectanglelabels": ["Scratch"]},
            },
            {"type": "textarea", "value": {"text": ["long thin mark"]}},
        ]
    }
    req = ls_format.parse_context(ctx, cfg)
    assert req.label == "Scratch"
    clicks = req.clicks_px(width=200, height=100)
    # pixel indices: 50 % of 200 px is the edge between pixels 99 and 100, i.e. 99.5
    assert [(c.x, c.y, c.positive) for c in clicks] == [(99.5, 49.5, True), (49.5, 9.5, False)]
    assert req.box_px(width=200, height=100) == pytest.approx((20.0, 20.0, 80.0, 60.0))
    assert req.prompt == "Scratch, long thin mark"


def test_context_prompt_falls_back_to_the_given_text_only_without_a_textarea_region():
    cfg = ls_format.parse_label_config(CONTRACT)
    assert ls_format.parse_context({"result": [kp(50, 50)]}, cfg, extra_prompt="dark pit").prompt == \
        "Scratch, dark pit"
    ctx = {"result": [kp(50, 50), {"type": "textarea", "value": {"text": "radial crack"}}]}
    assert ls_format.parse_context(ctx, cfg, extra_prompt="dark pit").prompt == "Scratch, radial crack"


@pytest.mark.parametrize("ctx", [{"result": []}, {}, {"result": None},
                                 {"result": [{"type": "textarea", "value": {"text": ["x"]}}]}])
def test_context_without_a_smart_region_is_no_request(ctx):
    """Label Studio's editor sends such a context after every submit: nothing to segment, not an error."""
    assert ls_format.parse_context(ctx, ls_format.parse_label_config(CONTRACT)) is None


def test_context_edge_click_is_clamped_inside():
    cfg = ls_format.parse_label_config(CONTRACT)
    req = ls_format.parse_context({"result": [kp(100, 100)]}, cfg)
    click = req.clicks_px(width=200, height=100)[0]
    assert (click.x, click.y) == (199.0, 99.0)


@pytest.mark.parametrize(
    "ctx, error, match",
    [
        ({"result": [kp(120, 50)]}, BadRequest, "outside the image"),
        ({"result": [kp(50, -3)]}, BadRequest, "outside the image"),
        ({"result": [kp("a", 3)]}, BadRequest, "must be a number"),
        ({"result": [kp(10, 10), kp(20, 20, label="Dent")]}, BadRequest, "several labels"),
        ({"result": [kp(10, 10, label="Hole")]}, LabelConfigError, "Hole"),
        ({"result": [kp(10 ** 400, 3)]}, BadRequest, "must be a number"),
        ({"result": [kp([1], 3)]}, BadRequest, "must be a number"),
        ({"result": [{**kp(10, 10), "value": {"x": 10, "y": 10, "keypointlabels": []}}]}, BadRequest,
         "select a label"),
        ({"result": "nope"}, BadRequest, "list"),
        ("nope", BadRequest, "object"),
    ],
)
def test_bad_contexts(ctx, error, match):
    cfg = ls_format.parse_label_config(CONTRACT)
    with pytest.raises(error, match=match):
        ls_format.parse_context(ctx, cfg)


def test_brush_region_round_trips_and_validates():
    cfg = ls_format.parse_label_config(CONTRACT)
    mask = np.zeros((30, 50), bool)
    mask[5:12, 7:40] = True
    mask[20, 3] = True
    region = ls_format.brush_region(mask, "Dent", cfg, 0.8)
    assert (
        isinstance(region["id"], str) and region["original_width"] == 50 and region["original_height"] == 30
    )
    decoded = decode_rle(region["value"]["rle"]).reshape(30, 50, 4)[:, :, 3] > 0
    assert np.array_equal(decoded, mask)
    verdict = ls_format.choice_region("Anomalous", cfg, 0.9)
    pred = ls_format.prediction([region, verdict], 0.9, "v1")
    assert ls_format.validation_errors(cfg, pred) == []
    bad = ls_format.prediction([ls_format.brush_region(mask, "Hole", cfg, 0.5)], 0.5, "v1")
    assert ls_format.validation_errors(cfg, bad)
