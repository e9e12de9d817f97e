"""The cheap stage: heads fitted on cached features, many times, in seconds.

``torch_heads`` (LinearHead, MLPHead), ``knn`` (KNNHead), ``registry`` (the heads and what
each supports), ``sweeps``, ``selection`` (choosing on an inner split), ``rows`` (row sources),
``outofcore`` (fitting under a memory budget), ``fit`` (one recorded fit), ``curve`` (few-shot
curves) and ``headfile`` (saved heads, no pickle). Public as ``featprobe.heads``.
"""

from featprobe.probe.headfile import load_head, save_head
from featprobe.probe.knn import KNNHead
from featprobe.probe.registry import HEADS, HeadSpec, head_name, head_params, list_heads, make_head
from featprobe.probe.sweeps import SweepResult, sweep_head, sweep_linear, sweep_logreg
from featprobe.probe.torch_heads import LinearHead, MLPHead

__all__ = ["HEADS", "HeadSpec", "KNNHead", "LinearHead", "MLPHead", "SweepResult", "head_name",
           "head_params", "list_heads", "load_head", "make_head", "save_head", "sweep_head",
           "sweep_linear", "sweep_logreg"]
