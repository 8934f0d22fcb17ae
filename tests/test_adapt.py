"""Per-project adaptation of the interactive network (model/interactive/adapt.py, backend/adaptation.py): only a
network that validates better is published; a crash mid-fit leaves the served version; projects adapt and are
served independently; a restart serves the last published version; the jobs' ADAPT_INTERACTIVE action."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from backend.adaptation import publish_version
from backend.app import create_app
from backend.jobs import ADAPT, START, JobManager
from backend.services import build_services
from backend.settings import Settings
from tests.api_support import RecordingServer, Route, encode, interactive_body, keypoint
from tests.conftest import structured, texture

H, W = 192, 256


def _ignore(*_):
    return None


def _perturbed(net, scale: float, seed: int):
    out = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 1e-3))
    return out.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("adapt")
    folders = {}
    for project, make in (("1", lambda i: texture(h=H, w=W, seed=10 + i)),
                          ("2", lambda i: structured(h=H, w=W, seed=20 + i))):
        folder = root / f"normals{project}"
        folder.mkdir()
        for i in range(6):
            (folder / f"n{i}.png").write_bytes(encode(make(i)))
        folders[project] = folder
    settings = replace(Settings(), model_dir=root / "m", warm_on_setup=False, device="cpu", predictor="auto",
                       adapt_minutes=0.15, sync_card_title=False)
    services = build_services(settings)
    for project, folder in folders.items():
        services.projects.update(project, label_config=None, extra_params={"normal_dir": str(folder)})
    if services.model.choice.kind != "adclick":
        pytest.skip(f"no learned weights: {services.model.choice.reason}")
    return settings, services, folders


def _base(services):
    from model.interactive.learned import shipped_network

    return shipped_network(services.model.engine)


def test_a_fit_that_does_not_validate_better_is_not_published(world, monkeypatch):
    settings, services, _ = world
    from model.interactive import adapt

    real = adapt._fine_tune

    def damaged(*args, **kwargs):  # the fine-tuning runs, then its network is spoilt
        net, figures = real(*args, **kwargs)
        return _perturbed(net, 3.0, 0), figures

    monkeypatch.setattr(adapt, "_fine_tune", damaged)
    from backend.adaptation import adapt_interactive

    figures = adapt_interactive("1", services.training.context(_ignore), None, ADAPT)
    assert figures["interactive_adaptation"] == "kept"
    assert figures["interactive_score"] < figures["interactive_base_score"]
    assert services.projects.interactive_store("1").latest(refresh=True) is None
    record = services.projects.adaptation_info("1")
    assert record["status"] == "kept" and "not 0.005 better than the shipped network" in record["reason"]
    health = create_app(settings, services, start_jobs=False).test_client().get("/health").get_json()
    assert health["interactive_adaptation"]["projects"]["1"]["reason"] == record["reason"]
    assert services.serving.model_for("1").adapted == ""


def test_an_unchanged_network_is_not_kept(world):
    """lr 0: the fine-tuned network is the shipped one, which is not `min_gain` better than itself (scored through
    the served chain, as the service validates: its per-image memory does not leak from one network's scoring
    into the other's)."""
    _, services, folders = world
    from model.engine.residuals import content_hash
    from model.interactive.adapt import AdaptConfig, adapt_network
    from model.interactive.learned import predictor_for

    engine = services.model.engine
    images = sorted(folders["1"].glob("*.png"))
    bank = engine.build_bank(images)
    base, _ = _base(services)
    result = adapt_network(base, engine, bank, [(content_hash(p), p) for p in images],
                           lambda net: predictor_for(engine, bank, net, chain=True), cfg=AdaptConfig(
                               lr=0.0, minutes=2.0, train_samples=8, val_references=2, val_per_reference=2,
                               max_steps=2, batch=4))
    assert result.net is None and result.figures["steps"] == 2
    assert result.score == pytest.approx(result.base_score, abs=1e-6)
    assert "not 0.005 better" in result.reason


def test_adaptation_validates_the_chain_the_service_serves(world):
    """predictor_for(chain=True) wraps the blend as the service does (boundary refinement, then the click-seeded
    stage), following the settings; unwrap finds the network's predictor inside."""
    _, services, folders = world
    from model.interactive.choose import InteractiveConfig
    from model.interactive.learned import AdClickPredictor, BlendPredictor, predictor_for, unwrap
    from model.interactive.refine import RefinedPredictor
    from model.interactive.seeded import SeededPredictor

    engine = services.model.engine
    bank = engine.build_bank(sorted(folders["1"].glob("*.png"))[:2])
    base, _ = _base(services)
    served = predictor_for(engine, bank, base, InteractiveConfig(), chain=True)
    assert isinstance(served, SeededPredictor) and isinstance(served.base, RefinedPredictor)
    assert isinstance(served.base.base, BlendPredictor)
    assert isinstance(unwrap(served), AdClickPredictor) and unwrap(served).net is base
    plain = predictor_for(engine, bank, base, InteractiveConfig(refine="off", seeded=False), chain=True)
    assert isinstance(plain, BlendPredictor) and unwrap(plain) is plain.learned
    alone = predictor_for(engine, bank, base, InteractiveConfig(learned_weight=1.0), chain=False)
    assert unwrap(alone) is alone


def test_a_crash_mid_fit_leaves_the_served_version(world, monkeypatch):
    settings, services, _ = world
    base, entry = _base(services)
    store = services.projects.interactive_store("1", keep=settings.adapt_keep)
    published = publish_version(store, _perturbed(base, 0.01, 1), entry, {"trigger": "test"})
    assert services.serving.model_for("1").adapted == published.name

    import model.training.train_adclick as loop

    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("worker killed mid-fit")

    monkeypatch.setattr(loop, "train_step", crash)
    jobs = services.jobs
    jobs.submit("1", ADAPT)
    jobs.ensure_started()
    try:
        assert jobs.wait_idle(120)
    finally:
        jobs.stop()
    state = jobs.snapshot("1")
    assert calls and state["status"] == "failed" and "worker killed mid-fit" in state["reason"]
    assert services.projects.adaptation_info("1")["status"] == "failed"
    assert store.latest(refresh=True).name == published.name
    assert not list(store.root.glob(".tmp-*"))
    assert services.serving.model_for("1").adapted == published.name


def test_projects_adapt_and_are_served_independently(world):
    settings, services, _ = world
    base, entry = _base(services)
    one = services.projects.interactive_store("1").latest(refresh=True)
    two = publish_version(services.projects.interactive_store("2", keep=3), _perturbed(base, 0.02, 2), entry,
                          {"trigger": "test"})
    assert two.name == "adclick-adapted-p2-v1"
    assert one is not None and one.name.startswith("adclick-adapted-p1-v")
    m1, m2 = services.serving.model_for("1"), services.serving.model_for("2")
    assert (m1.adapted, m2.adapted) == (one.name, two.name)
    assert m1.predictor.version != m2.predictor.version

    client = create_app(settings, services, start_jobs=False).test_client()
    v1 = client.get("/versions", query_string={"project": "1"}).get_json()["versions"]
    assert one.name in v1 and two.name not in v1
    with RecordingServer() as server:
        img = structured(h=H, w=W, seed=20)
        img[80:110, 150:185] = (235, 235, 60)
        server.routes["/d.png"] = Route(encode(img))
        body = interactive_body(f"{server.url}/d.png", [keypoint(167 / W * 100, 95 / H * 100, w=W, h=H)])
        body["project"] = "2"
        resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["results"][0]["model_version"] == two.name

    # a completed bank queues an adaptation for the projects using it, once per bank
    class Jobs:
        def __init__(self):
            self.submitted = []

        def snapshot(self, project):
            return {"status": "idle"}

        def submit(self, project, action):
            self.submitted.append((project, action))

    from backend.adaptation import AdaptationHook

    jobs = Jobs()
    hook = AdaptationHook(settings, services.projects, jobs, services.model)
    services.projects.set_adaptation_info("2", {"bank_key": "bank-of-2"})
    hook("bank-of-2", ["2"])
    hook("new-bank", ["2"])
    assert jobs.submitted == [("2", ADAPT)]


def test_a_restart_serves_the_last_published_version_and_keeps_three(world):
    settings, services, _ = world
    base, entry = _base(services)
    store = services.projects.interactive_store("2", keep=settings.adapt_keep)
    for seed in range(3, 6):
        last = publish_version(store, _perturbed(base, 0.02, seed), entry, {"trigger": "test"})
    restarted = build_services(settings)
    assert restarted.serving.model_for("2").adapted == last.name == "adclick-adapted-p2-v4"
    names = restarted.versions.versions("2")
    assert [n for n in names if n.startswith("adclick-adapted-p2")] == [
        "adclick-adapted-p2-v2", "adclick-adapted-p2-v3", "adclick-adapted-p2-v4"]
    off = build_services(replace(settings, adapt=False))
    assert off.serving.model_for("2").adapted == ""


def test_adapt_jobs_run_alone_unless_a_fit_is_due(tmp_path):
    seen = []

    def runner(project, event, progress):
        seen.append((project, event["action"]))
        return {"model_version": "v"}

    jobs = JobManager(tmp_path / "state.json", runner, after_n=2, debounce_s=1000)
    jobs.submit("1", ADAPT)
    jobs.submit("2", ADAPT)
    jobs.submit("2", START)  # a START pending: the full fit (which adapts too) runs instead
    jobs.submit("3", ADAPT)
    jobs.submit("3", "ANNOTATION_CREATED")  # labels pending: a full fit too
    jobs.ensure_started()
    try:
        assert jobs.wait_idle(10)
    finally:
        jobs.stop()
    assert sorted(seen) == [("1", ADAPT), ("2", START), ("3", START)]
    assert np.all([jobs.snapshot(p)["status"] == "done" for p in "123"])


@pytest.mark.parametrize("value", ["8", -1, 1000, True, [3]])
def test_setup_refuses_a_bad_adapt_minutes(tmp_path, value):
    from tests.api_support import CONTRACT_CONFIG, make_app

    app, _, _ = make_app(replace(Settings(), model_dir=tmp_path / "m", warm_on_setup=False))
    resp = app.test_client().post("/setup", json={"project": "3", "schema": CONTRACT_CONFIG,
                                                  "extra_params": {"adapt_minutes": value}})
    assert resp.status_code == 400 and "adapt_minutes" in resp.get_json()["error"]
    ok = app.test_client().post("/setup", json={"project": "3", "schema": CONTRACT_CONFIG,
                                                "extra_params": {"adapt_minutes": 2.5}})
    assert ok.status_code == 200


def test_a_pasted_defect_keeps_the_reference_around_it():
    from model.interactive.adapt import paste

    ref = np.full((40, 50, 3), 100, np.uint8)
    lab = np.full((40, 50, 3), 30, np.uint8)
    lab[10:20, 10:20] = 250
    mask = np.zeros((40, 50), bool)
    mask[10:20, 10:20] = True
    out = paste(ref, lab, mask)
    assert (out[mask] == 250).all()  # the defect's own pixels
    far = np.ones_like(mask)
    far[5:25, 5:25] = False
    assert (out[far] == 100).all()  # the other reference's surroundings, not the labelled image's


def test_a_damaged_version_falls_back_to_the_shipped_network(world):
    settings, services, folders = world
    services.projects.update("4", label_config=None, extra_params={"normal_dir": str(folders["1"])})
    base, entry = _base(services)
    info = publish_version(services.projects.interactive_store("4", keep=3), _perturbed(base, 0.02, 9), entry,
                           {"trigger": "test"})
    (info.path / "model.pt").write_bytes(b"not a checkpoint")
    fresh = build_services(settings)
    model = fresh.serving.model_for("4")
    assert model.adapted == "" and model.predictor.version == fresh.model.choice.version


def test_an_exiting_process_stops_the_adaptation_without_a_record(world):
    _, services, _ = world
    from backend import adaptation

    before = services.projects.adaptation_info("1")
    adaptation._EXITING.set()
    try:
        with pytest.raises(adaptation.AdaptationStopped):
            adaptation.adapt_interactive("1", services.training.context(_ignore), None, ADAPT)
    finally:
        adaptation._EXITING.clear()
    assert services.projects.adaptation_info("1") == before  # the next process adapts for this bank again
