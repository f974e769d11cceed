"""DistributedDataParallel on 2 CPU processes (gloo on 127.0.0.1, a free port, spawned workers,
a hard timeout): fastbig's fused models train to the same parameters as their torch.nn twins;
SyncBatchNorm-converted conv-bn blocks either synchronize or say clearly that they do not."""
import os
import socket
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import assert_close, has_extension

WORLD = 2
TIMEOUT_S = 120
STEPS = 5
MODELS = ("SimpleCNN", "LSTMClassifier", "SelfAttentionClassifier")
# torch.multiprocessing's start_processes (what mp.spawn runs) with "fork" where the platform has
# it: the workers inherit the imported torch and fastbig instead of importing them cold (~15 s on
# 2 busy cores for two `import torch`); nothing here has touched CUDA or a process group before
# the fork (DataLoader workers rely on the same). FASTBIG_DDP_START=spawn forces a clean start.
START_METHOD = os.environ.get("FASTBIG_DDP_START") or (
    "fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, outdir, job):
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD, timeout=__import__("datetime").timedelta(seconds=60))
        try:
            result = globals()[job](rank)
        finally:
            dist.destroy_process_group()
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:  # the parent reads this instead of hanging
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _spawn(job):
    port = _free_port()
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(port, outdir, job), nprocs=WORLD, join=False,
                                 start_method=START_METHOD)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DDP job {job} did not finish in {TIMEOUT_S} s")
        except mp.ProcessRaisedException as e:
            errs = [open(os.path.join(outdir, f)).read() for f in os.listdir(outdir) if f.endswith(".err")]
            raise AssertionError(f"a worker failed:\n{errs[0] if errs else e}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# ---- jobs (run in the workers) --------------------------------------------------------------
def _train_job(rank):
    import fuzz as fc
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name in MODELS:
        make, inputs = fc.model_cases()[name]
        params = {}
        for fused in (True, False):
            torch.manual_seed(0)
            model = make(fused)
            if fused:
                init = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                model.load_state_dict(init, strict=True)
            ddp = DDP(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
            g = torch.Generator().manual_seed(100 + rank)   # each rank its own data
            (x,) = inputs()
            for _ in range(STEPS):
                xb = torch.randn(x.shape, generator=g)
                yb = torch.randint(0, 3, (x.shape[0],), generator=g)
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(ddp(xb)[:, :3], yb)
                loss.backward()
                opt.step()
            params[fused] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[name] = params
    return out


def _syncbn_job(rank):
    import fastbig
    from torch import nn

    torch.manual_seed(0)
    block = fastbig.nn.ConvBnReLU2d(3, 4, 3, padding=1)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(block))
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(rank)) + 3.0 * rank
    res = {"converted_to": type(model[0].bn).__name__}
    try:
        model(x)
        res["raised"] = None
    except Exception as e:  # noqa: BLE001
        res["raised"] = (type(e).__name__, str(e))
    res["running_mean"] = model[0].bn.running_mean.clone()
    # what a synchronized BatchNorm would hold: the momentum update with the GLOBAL batch mean
    z = torch.nn.functional.conv2d(x, model[0].conv.weight.detach(), None, padding=1)
    s = torch.stack([z.sum(dim=(0, 2, 3)), torch.tensor([float(z.numel() // z.shape[1])] * 4)])
    dist.all_reduce(s)
    res["global_mean_update"] = 0.1 * (s[0] / s[1])
    return res


def _all_jobs(rank):
    return {"train": _train_job(rank), "syncbn": _syncbn_job(rank)}


# ---- the tests ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_results():
    """One spawn (two processes starting torch costs seconds) runs every job."""
    return _spawn("_all_jobs")


@has_extension
def test_ddp_fused_models_train_like_their_twins(ddp_results):
    results = [r["train"] for r in ddp_results]
    for name in MODELS:
        for rank in range(WORLD):
            fused, twin = results[rank][name][True], results[rank][name][False]
            assert list(fused) == list(twin)
            for k in fused:
                if fused[k].is_floating_point():
                    # 5 SGD steps compound roundoff: bounded by 10x float32's tolerance
                    assert_close(fused[k], twin[k].double(), torch.float32, name=f"{name} rank{rank} {k}",
                                 factor=10.0)
                else:
                    assert torch.equal(fused[k], twin[k]), f"{name} {k}"
        # DDP keeps the parameter replicas identical (running statistics are per process, as
        # with torch: rank 0's are broadcast at each forward, then each rank updates its own)
        for k, v in results[0][name][True].items():
            if "running_" not in k:
                assert torch.equal(v, results[1][name][True][k]), f"{name}: ranks differ in {k}"
        moved = max((results[0][name][True][k].double() - v.double()).abs().max().item()
                    for k, v in results[0][name][False].items() if v.is_floating_point())
        assert moved < 1e-3


@has_extension
def test_syncbatchnorm_is_synced_or_a_clear_error(ddp_results):
    """torch's SyncBatchNorm syncs statistics over the process group (on CPU it raises a clear
    ValueError). A fastbig conv-bn block whose BatchNorm was converted must do one of those, not
    silently use per-process statistics."""
    results = [r["syncbn"] for r in ddp_results]
    for rank, res in enumerate(results):
        assert res["converted_to"] == "SyncBatchNorm"
        if res["raised"] is not None:
            typ, msg = res["raised"]
            assert "SyncBatchNorm" in msg, f"rank {rank}: raised {typ} without naming SyncBatchNorm: {msg}"
            continue
        err = (res["running_mean"] - res["global_mean_update"]).abs().max().item()
        assert err < 1e-5, (f"rank {rank}: a SyncBatchNorm-converted ConvBnReLU2d used per-process "
                            f"statistics silently (running_mean off the synchronized one by {err:.3e})")
