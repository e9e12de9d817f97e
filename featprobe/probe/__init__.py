"""The cheap stage: heads fitted on cached features, many times, in seconds.

:mod:`~featprobe.probe.torch_heads` (LinearHead, MLPHead on autograd and torch.optim),
:mod:`~featprobe.probe.registry` (the one registry of heads and what each supports),
:mod:`~featprobe.probe.sweeps` (grids trained together), :mod:`~featprobe.probe.rows` (row
sources, in memory and from the HDF5 cache), :mod:`~featprobe.probe.outofcore` (fitting under a
memory budget), :mod:`~featprobe.probe.fit` (one recorded fit on the fixed split) and
:mod:`~featprobe.probe.headfile` (saved heads: arrays and JSON, no pickle).

This package is ``featprobe.heads`` in the public API: ``fp.heads.LinearHead``,
``fp.heads.make_head``, ``fp.heads.sweep_linear``...
"""

from featprobe.probe.headfile import load_head, save_head
from featprobe.probe.registry import (
    HEADS,
    HeadSpec,
    head_name,
    head_params,
    list_heads,
    make_head,
)
from featprobe.probe.sweeps import SweepResult, sweep_head, sweep_linear, sweep_logreg
from featprobe.probe.torch_heads import LinearHead, MLPHead

__all__ = ["HEADS", "HeadSpec", "LinearHead", "MLPHead", "SweepResult", "head_name",
           "head_params", "list_heads", "load_head", "make_head", "save_head", "sweep_head",
           "sweep_linear", "sweep_logreg"]
