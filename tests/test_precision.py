"""Compute precision: what ``auto`` picks, and fp16's overflow guard (inf → fp32 recompute)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from featprobe.errors import FeatprobeError
from featprobe.extraction import extract
from featprobe.policy import resolve_precision
from tests.conftest import make_images


def test_auto_precision():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"  # measured: see docstring
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(FeatprobeError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_fp16_overflow_is_recomputed_in_fp32(tmp_path, caplog):
    """A model whose activations pass fp16's 65,504: the guarded fp16 run stores exactly the
    fp32 features instead of inf, and says so."""
    rows = make_images(tmp_path / "images", 6, ext="png", size=32)
    (tmp_path / "d.csv").write_text("image_names,label\n" + "".join(f"{n},{y}\n" for n, y in rows))
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        model.conv1.weight.mul_(1e6)  # batchnorm in eval (running var 1) keeps it huge
    torch.save(model.state_dict(), tmp_path / "big.pth")
    kw = dict(backbone="resnet18", weights=str(tmp_path / "big.pth"), image_size=32,
              dtype="float32", device="cpu", batch_size=3, workers=0, progress=False,
              cache_dir=tmp_path / "cache")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        x = torch.randn(1, 3, 32, 32)
        model.fc = torch.nn.Identity()
        assert not torch.isfinite(model.eval()(x)).all()  # the premise: fp16 overflows
    ref = extract(tmp_path / "d.csv", precision="fp32", **kw)
    caplog.clear()
    got = extract(tmp_path / "d.csv", precision="fp16", **kw)
    assert "fp16 overflowed (inf/nan features) in 2 batch(es)" in caplog.text
    assert got.path != ref.path  # precision is in the cache key
    a, b = ref.features("avgpool"), got.features("avgpool")
    assert np.isfinite(a).all() and a.max() > 65504
    np.testing.assert_array_equal(a, b)


def test_default_workers_rule(monkeypatch):
    """CPU devices decode in the main process, on threads, between forward passes (measured
    faster than a worker process beside the forward's threads); CUDA: all cores but one."""
    from featprobe import policy

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(policy.os, "sched_getaffinity", lambda pid: {0, 1})
    assert policy.default_workers(cpu) == 0
    assert policy.default_workers(cuda) == 1
    monkeypatch.setattr(policy.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert policy.default_workers(cpu) == 0
    assert policy.default_workers(cuda) == 15
