"""model/training/distributed.py under torchrun: 2 CPU processes (gloo) train one model; both ranks end with identical
weights, equal to single-process training on the full batch (the gradients really are averaged)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.training.distributed import (
    DistContext,
    all_reduce_mean,
    any_rank,
    average_gradients,
    broadcast_module,
    broadcast_object,
    fingerprint,
    init,
    shard,
    wrap,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS, N, LR = 5, 32, 0.1

SCRIPT = textwrap.dedent(f"""
    import sys, torch
    from torch import nn
    from model.training import distributed as d
    torch.set_num_threads(1)
    ctx = d.init(torch.device(sys.argv[2]), backend=sys.argv[3])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(ctx.device)
    start = d.fingerprint(model)
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn({N}, 8, generator=g).to(ctx.device), torch.randn({N}, 1, generator=g).to(ctx.device)
    mine = torch.tensor(d.shard(list(range({N})), ctx), device=ctx.device)
    ddp = d.wrap(model, ctx)
    opt = torch.optim.SGD(ddp.parameters(), lr={LR})
    for _ in range({STEPS}):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x[mine]), y[mine])
        loss.backward()
        opt.step()
    mean_loss = d.all_reduce_mean(loss.item(), ctx)
    tag = d.broadcast_object("rank0-says-%d" % ctx.rank, ctx)
    # manual mode (loops that call model methods, not a DDP forward): rank-dependent init, broadcast, average
    torch.manual_seed(100 + ctx.rank)
    manual = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(ctx.device)
    d.broadcast_module(manual, ctx)
    manual_start = d.fingerprint(manual)
    opt = torch.optim.SGD(manual.parameters(), lr={LR})
    for _ in range({STEPS}):
        opt.zero_grad()
        nn.functional.mse_loss(manual[2](manual[1](manual[0](x[mine]))), y[mine]).backward()
        d.average_gradients(manual, ctx)
        opt.step()
    stop = d.any_rank(ctx.rank == 1, ctx)
    import os, time
    marker = sys.argv[1] + "/built-by-rank0"
    with d.main_first(ctx):
        if ctx.is_main:
            time.sleep(0.5)
            open(marker, "w").write("x")
        found_marker = os.path.exists(marker)
    torch.save({{"rank": ctx.rank, "world": ctx.world_size, "start": start, "end": d.fingerprint(ddp),
                "state": {{k: v.cpu() for k, v in d.unwrap(ddp).state_dict().items()}},
                "n_mine": len(mine), "mean_loss": mean_loss, "tag": tag,
                "manual_start": manual_start, "manual_end": d.fingerprint(manual),
                "manual_state": {{k: v.cpu() for k, v in manual.state_dict().items()}}, "stop": stop,
                "device": str(ctx.device), "backend": ctx.backend, "found_marker": found_marker}},
               sys.argv[1] + "/rank%d.pt" % ctx.rank)
    d.cleanup(ctx)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CUDA_GLOO = pytest.param(
    "cuda",
    "gloo",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)
DEVICES = [("cpu", ""), CUDA_GLOO]


def _torchrun(code: str, tmp_path: Path, device: str, backend: str, *extra: str) -> None:
    """2 ranks of `code` under torchrun on `device` (2 ranks share one GPU with gloo; NCCL needs 2 GPUs)."""
    script = tmp_path / "script.py"
    script.write_text(code)
    _run_two_ranks(str(script), str(tmp_path), device, backend, *extra)


# What libstdc++ prints when a rank aborts in a C++ thread of gloo (twice in the CI runs of 2026-12-07, each time
# a different ADClick torchrun test; never in 88 local repetitions of that script, also with 3 runs at once on the
# 2 cores). The run is repeated once on exactly that message, and the repeat must pass every assertion like the
# first; any other failure fails at once. faulthandler prints the aborting rank's Python stack (where it was).
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def _run_two_ranks(*target: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 <target...>` on loopback, one thread per rank; fails with its stderr (with
    the aborting rank's Python stack: faulthandler is on)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    for attempt in (1, 2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            *target,
        ]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode == 0 or GLOO_TEARDOWN_ABORT not in result.stderr or attempt == 2:
            break
        warnings.warn(f"torchrun rank aborted in gloo (attempt 1), repeating once:\n{result.stderr[-3000:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _reference_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(N, 8, generator=g), torch.randn(N, 1, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", DEVICES)
def test_torchrun_two_ranks_train_the_same_model(tmp_path, device, backend):
    _torchrun(SCRIPT, tmp_path, device, backend)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["n_mine"] == r1["n_mine"] == N // 2, "each rank trains on its own half"
    assert r0["start"] == r1["start"] and r0["end"] == r1["end"], "ranks diverged"
    assert r0["end"] != r0["start"], "training did not change the weights"
    assert r0["mean_loss"] == pytest.approx(r1["mean_loss"])
    assert r0["tag"] == r1["tag"] == "rank0-says-0"
    assert r0["device"].startswith(device) and r0["backend"] == (backend or "gloo")
    tol = {"rtol": 1e-5, "atol": 1e-6} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-5}
    reference = _reference_state()
    for name, value in reference.items():  # averaged half-batch gradients == full-batch gradient
        torch.testing.assert_close(r0["state"][name], value, **tol)
    # manual sync: ranks started from different seeds, broadcast made them rank 0's model, and they stay equal
    assert r0["manual_start"] == r1["manual_start"] and r0["manual_end"] == r1["manual_end"]
    for name, value in _reference_state(seed=100).items():
        torch.testing.assert_close(r0["manual_state"][name], value, **tol)
    assert r0["stop"] is True and r1["stop"] is True
    assert r1["found_marker"], "main_first: rank 1 ran its block only after rank 0 finished"


def test_single_process_helpers_are_identity():
    ctx = init(torch.device("cpu"), env={})
    assert ctx == DistContext() and not ctx.distributed and ctx.is_main
    model = nn.Linear(2, 2)
    assert wrap(model, ctx) is model
    assert shard([1, 2, 3], ctx) == [1, 2, 3]
    assert all_reduce_mean(2.5, ctx) == 2.5 and broadcast_object({"a": 1}, ctx) == {"a": 1}
    assert any_rank(True, ctx) and not any_rank(False, ctx)
    model(torch.ones(1, 2)).sum().backward()
    grad = model.weight.grad.clone()
    broadcast_module(model, ctx)
    average_gradients(model, ctx)
    assert torch.equal(model.weight.grad, grad)


@pytest.mark.parametrize("n,world", [(10, 2), (7, 3), (2, 4), (12, 4)])
def test_shard_covers_everything_with_equal_counts(n, world):
    items = list(range(n))
    parts = [shard(items, DistContext(rank=r, world_size=world)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1, "every rank must take the same number of steps"
    assert set().union(*parts) == set(items)
    assert len(parts[0]) == -(-n // world)


def test_fingerprint_sees_any_weight_change():
    model = nn.Linear(3, 1)
    before = fingerprint(model)
    assert fingerprint(model) == before
    with torch.no_grad():
        model.bias.add_(1e-7)
    assert fingerprint(model) != before


ADCLICK_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from model.training import distributed as d
    from model.training.samples import build_samples
    from model.training.train_adclick import LoopConfig, build_net, train
    from tests.test_adclick import fake_residual, tiny_cfg
    import torch.nn.functional as F
    from model.training.synth import KIND_WORDS
    torch.set_num_threads(1)
    import os
    auto = sys.argv[4] == "auto"  # train() joins torchrun's group itself
    ctx = None if auto else d.init(torch.device(sys.argv[2]), backend=sys.argv[3])
    rank = int(os.environ["RANK"])
    clean = np.full((128, 160, 3), 120, np.uint8)
    samples = build_samples([clean], fake_residual(clean), 8, np.random.default_rng(0), product="flat",
                            kinds=("contamination", "hole"))
    g = torch.Generator().manual_seed(0)
    prompts = {k: F.normalize(torch.randn(2, 16, generator=g), dim=-1) for k in KIND_WORDS}
    torch.manual_seed(rank)  # different init per rank on purpose: train() must start from rank 0's
    net = build_net(tiny_cfg(), samples, text_dim=16)
    start = d.fingerprint(net)
    # a 5 s budget ends the run (all ranks at one step) and drives the time-aware lr, which must not let the
    # ranks drift apart
    cfg = LoopConfig(steps=100_000, batch=4, lr=3e-3, warmup=2, max_rounds=1, log_every=50, ckpt_every=10_000,
                     max_minutes=5 / 60)
    losses = train(net, samples, prompts, cfg, seed=0, device=torch.device(sys.argv[2]),
                   ckpt_path=__import__("pathlib").Path(sys.argv[1]) / "ckpt.pt", dist=ctx)
    torch.save({"start": start, "end": d.fingerprint(net), "losses": losses}, sys.argv[1] + "/r%d.pt" % rank)
    if ctx is not None:
        d.cleanup(ctx)
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    "device,backend,mode",
    [
        ("cpu", "", "explicit"),
        ("cpu", "", "auto"),
        pytest.param(*CUDA_GLOO.values, "explicit", marks=CUDA_GLOO.marks),
    ],
)
def test_torchrun_adclick_training_loop_keeps_ranks_identical(tmp_path, device, backend, mode):
    """The real ADClick loop (model/train_adclick.train) under torchrun: different per-rank data and init,
    one model: identical weights on both ranks at the end, different losses (own data), rank 0 saves.
    "auto": the caller passes no `dist` (like `python -m model.train adclick`) and train() joins the group."""
    _torchrun(ADCLICK_SCRIPT, tmp_path, device, backend, mode)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["start"] != r1["start"], "the ranks were meant to start from different random inits"
    assert r0["end"] == r1["end"], "ranks ended with different weights"
    assert r0["end"] not in (r0["start"], r1["start"])
    assert r0["losses"] != r1["losses"], "each rank should have trained on its own batches"
    assert len(r0["losses"]) == len(r1["losses"]) > 2, "both ranks stop at the same step"
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["meta"]["step"] == len(r0["losses"])


@pytest.mark.slow
def test_torchrun_train_cli_writes_one_model(tmp_path):
    """The documented command, `torchrun --nproc_per_node=2 -m model.train adclick --config ...`, on a tiny
    cached training set: both ranks train, rank 0 writes the final weights and the resumable checkpoint."""
    from model.training.samples import build_samples, save_samples
    from model.training.synth import KIND_WORDS
    from tests.test_adclick import fake_residual, tiny_cfg

    clean = np.full((128, 160, 3), 120, np.uint8)
    samples = build_samples(
        [clean],
        fake_residual(clean),
        8,
        np.random.default_rng(0),
        product="flat",
        kinds=("contamination", "hole"),
    )
    save_samples(samples, tmp_path / "samples.pt")
    g = torch.Generator().manual_seed(0)
    torch.save(
        {k: torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1) for k in KIND_WORDS},
        tmp_path / "prompts.pt",
    )
    config = {
        "data": {"cache": str(tmp_path / "samples.pt"), "tire_samples": 0, "texture_samples": 0},
        "out": str(tmp_path / "adclick.pt"),
        "model": tiny_cfg(),
        "loop": {"steps": 4, "batch": 4, "lr": 3e-3, "warmup": 1, "max_rounds": 1, "log_every": 2},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = _run_two_ranks("-m", "model.cli.train", "adclick", "--config", str(tmp_path / "config.json"),
                            "--prompts", str(tmp_path / "prompts.pt"), "--device", "cpu")
    weights = torch.load(tmp_path / "adclick.pt", weights_only=True)
    assert weights["meta"]["samples"] == len(samples) and weights["meta"]["final_loss"] > 0
    assert torch.load(tmp_path / "adclick.ckpt", weights_only=True)["meta"]["step"] == 4
    assert result.stderr.count("wrote ") == 1, "only rank 0 writes the final weights"
