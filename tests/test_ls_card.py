"""The model card's title follows the served version (issue 12 item 7): Label Studio 1.23 shows no version on the
card and averages the Data Manager's prediction scores only over predictions whose version equals the card's
title, so the backend renames its card; Label Studio moves the project's model version along."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from backend import ls_card
from backend.settings import Settings
from tests.api_support import CONTRACT_CONFIG, RecordingServer, Route, make_app


class FakeML:
    """`client.ml` of label-studio-sdk: list(project=) and update(id=, url=, project=, title=)."""

    def __init__(self, cards: list[dict], appear_after: int = 0):
        self.cards, self.appear_after, self.lists, self.updates = cards, appear_after, 0, []

    def list(self, project: int):
        self.lists += 1
        return [c for c in self.cards if c["project"] == project] if self.lists > self.appear_after else []

    def update(self, id: int, **fields):
        self.updates.append((id, fields))


class FakeClient:
    def __init__(self, ml: FakeML):
        self.ml = ml


def card(id_: int, title: str, version: str, project: int = 3) -> dict:
    return {"id": id_, "title": title, "model_version": version, "project": project, "url": f"http://m{id_}:9090"}


def test_renames_our_card_only():
    ml = FakeML([card(1, "Other model", "other-v9"), card(2, "ADClick", "residual-click-abc")])
    got = ls_card.sync_card_title(FakeClient(ml), "3", "residual-click-abc", delay_s=0)
    assert got == 2
    assert ml.updates == [(2, {"url": "http://m2:9090", "project": 3, "title": "residual-click-abc"})]


def test_after_training_the_card_is_found_by_an_older_version_of_ours():
    """Label Studio still stores the version of the last /setup; the new trained version is not there yet."""
    ml = FakeML([card(2, "residual-click-abc", "residual-click-abc")])
    got = ls_card.sync_card_title(FakeClient(ml), "3", "adclick-seg-v1", known=("residual-click-abc",), delay_s=0)
    assert got == 2 and ml.updates[0][1]["title"] == "adclick-seg-v1"


def test_nothing_to_do_when_the_title_is_the_version_or_no_card_is_ours():
    ml = FakeML([card(2, "adclick-seg-v1", "adclick-seg-v1")])
    assert ls_card.sync_card_title(FakeClient(ml), "3", "adclick-seg-v1", delay_s=0) is None
    ml = FakeML([card(1, "Other model", "other-v9")])
    assert ls_card.sync_card_title(FakeClient(ml), "3", "adclick-seg-v1", attempts=3, delay_s=0) is None
    assert ml.updates == [] and ml.lists == 3
    assert ls_card.sync_card_title(FakeClient(ml), "default", "adclick-seg-v1", delay_s=0) is None


def test_waits_for_the_card_label_studio_creates_after_setup():
    ml = FakeML([card(5, "My model", "v1")], appear_after=2)
    assert ls_card.sync_card_title(FakeClient(ml), "3", "v1", attempts=5, delay_s=0) == 5 and ml.lists == 3


@pytest.mark.parametrize("enabled", [True, False])
def test_setup_renames_the_card_in_label_studio(tmp_path, enabled):
    with RecordingServer() as ls:
        cards = [card(7, "My model", "tiny-tiny0001", project=3)]
        ls.routes["/api/ml/"] = Route(body=json.dumps(cards).encode(), headers={"Content-Type": "application/json"})
        ls.routes["/api/ml/7/"] = Route(body=json.dumps(cards[0]).encode(),
                                        headers={"Content-Type": "application/json"})
        settings = replace(Settings(), model_dir=tmp_path / "models", warm_on_setup=False,
                           label_studio_url=ls.url, label_studio_api_key="legacy-token", sync_card_title=enabled)
        app, _, _ = make_app(settings)
        resp = app.test_client().post("/setup", json={"project": "3.1712345678", "schema": CONTRACT_CONFIG})
        assert resp.status_code == 200 and resp.get_json()["model_version"] == "tiny-tiny0001"
        deadline = time.monotonic() + 5
        while enabled and time.monotonic() < deadline and not any(m == "PATCH" for m, *_ in ls.requests):
            time.sleep(0.05)
        time.sleep(0.2)
        patches = [(p, h, json.loads(b)) for m, p, h, b in ls.requests if m == "PATCH"]
        if not enabled:
            assert ls.requests == []
            return
        assert len(patches) == 1
        path, headers, body = patches[0]
        assert path.startswith("/api/ml/7") and body["title"] == "tiny-tiny0001" and body["project"] == 3
        assert headers["Authorization"] == "Token legacy-token"
        assert any(p.startswith(("/api/ml/?project=3", "/api/ml?project=3"))
                   for m, p, *_ in ls.requests if m == "GET")
