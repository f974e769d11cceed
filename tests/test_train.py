"""The training workflow (fastbig train / evaluate / demo), on short runs: a few steps each.
The long accuracy runs are measured by hand (see the models engineer's report)."""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from fastbig import train  # noqa: E402

QUICK = ["--epochs", "1", "--limit", "24", "--batch-size", "8", "--quiet"]


def _one_line_error(capsys, rc, prefix):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(prefix), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_evaluate_and_twin(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["mnistnet", *QUICK, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test: loss" in printed and "acc" in printed
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["model_name"] == "mnistnet" and ckpt["config"]["fused"]
    assert {"model", "optimizers", "schedulers", "config", "history"} <= set(ckpt)
    metrics = json.loads((out / "metrics.json").read_text())
    acc = metrics["test"]["acc"]
    assert 0.0 <= acc <= 1.0
    assert train.evaluate_main([str(out / "checkpoint.pt")]) == 0
    line = capsys.readouterr().out
    assert f"acc {acc:.4f}" in line, (line, acc)
    # the torch.nn twin loads the fused checkpoint (strict) and scores the same
    m_twin = train.evaluate_checkpoint(str(out / "checkpoint.pt"), fused=False)
    assert abs(m_twin["acc"] - acc) < 1e-9 and abs(m_twin["loss"] - metrics["test"]["loss"]) < 1e-4


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    base = ["mlp", "--limit", "40", "--batch-size", "8", "--quiet", "--epochs", "2"]
    assert train.main([*base, "--lr-schedule", "cosine", "--out", str(tmp_path / "a")]) == 0
    real_save = train.save_checkpoint

    def save_then_crash(*args, **kw):  # the run dies right after the epoch-1 checkpoint
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.loop, "save_checkpoint", save_then_crash)  # what fit calls
    with pytest.raises(KeyboardInterrupt):
        train.main([*base, "--lr-schedule", "cosine", "--out", str(tmp_path / "b")])
    monkeypatch.setattr(train.loop, "save_checkpoint", real_save)
    ck_b = str(tmp_path / "b" / "checkpoint.pt")
    assert torch.load(ck_b, weights_only=True)["epoch"] == 1
    assert train.main(["--resume", ck_b, "--quiet"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(ck_b, weights_only=True)
    assert b["epoch"] == 2 and len(b["history"]) == 2
    for k, v in a["model"].items():
        assert torch.allclose(b["model"][k], v, rtol=1e-6, atol=1e-7), k


def test_resume_to_more_epochs_keeps_learning(tmp_path):
    base = ["mlp", "--limit", "40", "--batch-size", "8", "--quiet", "--lr-schedule", "cosine"]
    assert train.main([*base, "--epochs", "1", "--out", str(tmp_path)]) == 0
    ck = str(tmp_path / "checkpoint.pt")
    one = torch.load(ck, weights_only=True)
    assert train.main(["--resume", ck, "--epochs", "3", "--quiet"]) == 0
    three = torch.load(ck, weights_only=True)
    assert three["epoch"] == 3 and three["config"]["epochs"] == 3
    moved = max((three["model"][k] - one["model"][k]).abs().max().item() for k in one["model"])
    assert moved > 1e-4  # the lengthened schedule restarts from a nonzero learning rate
    assert three["history"][-1]["train_loss"] < one["history"][-1]["train_loss"]


@pytest.mark.parametrize("argv,needle", [
    (["nosuchmodel"], "unknown model"),
    ([], "MODEL is required"),
    (["mlp", "--lr", "-1"], "--lr"),
    (["mlp", "--optimizer", "rmsprop"], "--optimizer"),
    (["mlp", "--epochs", "0"], "--epochs"),
    (["mlp", "--device", "tpu"], "--device"),
    (["mlp", "--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["dcgan", "--tune"], "--tune"),
])
def test_bad_train_options(argv, needle, capsys):
    err = _one_line_error(capsys, train.main(argv), "fastbig train: error:")
    assert needle in err


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    """--out that cannot be a folder: a one-line usage error before any training (it was a
    traceback from the checkpoint save, after the whole run)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = _one_line_error(capsys, train.main(["mlp", "--limit", "8", "--out", str(a_file)]), "fastbig train: error:")
    assert "--out" in err and "not a folder" in err
    under_file = a_file / "sub"
    err = _one_line_error(capsys, train.main(["mlp", "--limit", "8", "--out", str(under_file)]),
                          "fastbig train: error:")
    assert "--out" in err and "cannot create" in err
    assert a_file.read_text() == "x"


def test_bad_checkpoints(tmp_path, capsys):
    _one_line_error(capsys, train.evaluate_main([str(tmp_path / "missing.pt")]), "fastbig evaluate: error:")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    err = _one_line_error(capsys, train.evaluate_main([str(bad)]), "fastbig evaluate: error:")
    assert "not a readable" in err
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    err = _one_line_error(capsys, train.evaluate_main([str(other)]), "fastbig evaluate: error:")
    assert "not a fastbig training checkpoint" in err
    rc = train.main(["mlp", "--resume", str(bad), "--quiet"])
    _one_line_error(capsys, rc, "fastbig train: error:")


def test_cli_process_exit_code(tmp_path):
    """Through the real entry point: one line on stderr, exit code 2, no traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "fastbig.train", "mlp", "--lr-schedule", "linear"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "--lr-schedule" in p.stderr


def test_tune_picks_from_grid(tmp_path, capsys):
    rc = train.main(["mlp", "--tune", "--epochs", "1", "--limit", "24", "--batch-size", "8", "--quiet",
                     "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("  lr ") == 6 and "tuning picked" in out
    cfg = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["config"]
    assert cfg["batch_size"] in (4, 8)
    assert any(abs(cfg["lr"] - v) < 1e-12 for v in (3e-3 / 3, 3e-3, 3e-3 * 3)), cfg["lr"]


def test_dcgan_writes_png(tmp_path):
    assert train.main(["dcgan", *QUICK, "--out", str(tmp_path)]) == 0
    png = (tmp_path / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    w, h = struct.unpack(">II", png[16:24])
    assert w == h == (8 * 9 + 1) * 4  # 8x8 grid of 8x8 samples, 1-pixel borders, scaled 4x


@pytest.mark.parametrize("model", ["lstm", "transformer", "bert", "widedeep", "selfattention",
                                   "autoencoder", "resnet18", "simplecnn"])
def test_each_task_runs(model, tmp_path, capsys):
    assert train.main([model, *QUICK, "--out", str(tmp_path)]) == 0
    assert "test:" in capsys.readouterr().out
    assert train.evaluate_main([str(tmp_path / "checkpoint.pt"), "--no-fused"]) == 0


def test_list_and_demo(capsys):
    assert train.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("mnistnet", "transformer", "widedeep", "dcgan"))
    assert train.demo_main(epochs=1, limit=24) == 0
    out = capsys.readouterr().out
    assert "fastbig (fused)" in out and "torch.nn twin" in out and "s/epoch" in out


def test_progress_bar_lines_each_and_last():
    """The one progress bar of train and bench, off a terminal: one line per update (bench's log)
    or one line when closed (an epoch of fastbig train)."""
    import io

    from fastbig._progress import Progress

    out = io.StringIO()
    p = Progress(4, stream=out)
    p.update("case a", 1)
    p.update("case b", 3)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[######..................] 1/4 ") and lines[0].endswith("s case a")
    assert lines[1].startswith("[########################] 4/4 ")
    out = io.StringIO()
    p = Progress(3, "epoch 1/2", stream=out, lines="last", clock=False)
    for step in range(3):
        p.update(f"loss {step}", 1)
    assert out.getvalue() == ""
    p.close()
    assert out.getvalue() == "epoch 1/2 [########################] 3/3 loss 2\n"
    assert train.Progress is Progress
    with pytest.raises(ValueError, match="lines must be"):
        Progress(1, lines="some")
