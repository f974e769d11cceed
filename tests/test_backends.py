"""Backend selection: env, context manager (per thread), forced errors, one fallback warning."""
import threading
import warnings

import pytest

import fastbig
from fastbig import backends
from conftest import has_extension


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("FASTBIG_BACKEND", raising=False)
    assert backends.current() == "auto"


def test_env_selects(monkeypatch):
    monkeypatch.setenv("FASTBIG_BACKEND", "reference")
    assert backends.current() == "reference"
    monkeypatch.setenv("FASTBIG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTBIG_BACKEND"):
        backends.current()


def test_use_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("FASTBIG_BACKEND", "cpu")
    with backends.use("reference"):
        assert backends.current() == "reference"
        with backends.use("triton"):
            assert backends.current() == "triton"
        assert backends.current() == "reference"
    assert backends.current() == "cpu"


def test_use_rejects_unknown():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with backends.use("fastest"):
            pass


def test_use_is_thread_local(monkeypatch):
    monkeypatch.delenv("FASTBIG_BACKEND", raising=False)
    inside, seen = threading.Event(), []
    release = threading.Event()

    def worker():
        with backends.use("reference"):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    seen.append(backends.current())
    release.set()
    t.join()
    assert seen == ["auto"]


def test_auto_falls_back_with_one_warning():
    backends._reset_warnings()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            assert backends.resolve("myop", "cpu", fast={"cpu": (False, "no kernel")}) == "reference"
    msgs = [x for x in w if issubclass(x.category, backends.FastbigFallbackWarning)]
    assert len(msgs) == 1 and "no kernel" in str(msgs[0].message)


def test_forced_backend_that_cannot_run_raises():
    with backends.use("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run these inputs: nope"):
            backends.resolve("myop", "cpu", fast={"cuda": (False, "nope")})
        with pytest.raises(RuntimeError, match="has no implementation"):
            backends.resolve("myop", "cpu", fast={})


@has_extension
def test_info_reports_build(capsys):
    from fastbig.cli import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    info = fastbig.build_info()
    assert "lstm_cell" in out
    if info["cuda"]:
        assert "sm_" in out
    else:
        assert "CPU only" in out


def test_cli_unknown_command(capsys):
    from fastbig.cli import main
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_errors_module_is_public_and_the_old_import_is_the_same_class():
    from fastbig.errors import DtypeError
    from fastbig.ops._checks import DtypeError as OldDtypeError
    assert DtypeError is OldDtypeError is fastbig.errors.DtypeError
    assert issubclass(DtypeError, TypeError) and issubclass(DtypeError, RuntimeError)


def test_extension_backend_forced_auto_and_reference(monkeypatch):
    """The one picker of the extension ops: forced cpu without the schema raises naming it, auto
    falls back to the reference with a warning, reference is the reference."""
    import torch
    monkeypatch.delenv("FASTBIG_BACKEND", raising=False)
    cpu = torch.device("cpu")
    with backends.use("reference"):
        assert backends.extension_backend("lstm", cpu, "lstm_layer") == "reference"
    with backends.use("cpu"), pytest.raises(RuntimeError, match="no_such_schema not built"):
        backends.extension_backend("lstm", cpu, "no_such_schema")
    with backends.use("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' has no implementation"):
        backends.extension_backend("lstm", cpu, "lstm_layer")
    backends._reset_warnings()
    with pytest.warns(backends.FastbigFallbackWarning, match="no_such_schema not built"):
        assert backends.extension_backend("lstm", cpu, "no_such_schema") == "reference"
    if backends.extension_available(cpu)[0]:
        assert backends.extension_backend("lstm", cpu, "lstm_layer") == "cpu"
