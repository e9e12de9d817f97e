"""Heads: the classifiers fitted on cached features, and the one registry that names them.

Every head is a scikit-learn estimator, so pipelines, ``clone``, ``GridSearchCV`` and
``cross_val_score`` work on all of them. Two are torch models written here:

- :class:`LinearHead`: one linear layer (``nn.Linear(D, C)``) trained with AdamW and
  cross-entropy on minibatches;
- :class:`MLPHead`: the VGG-style classifier head, Linear → ReLU → Dropout → Linear.

Both share one training loop (:class:`_TorchHead`). The loop holds ``G`` stacked copies of
the weights, each with its own learning rate and weight decay, which is how
:func:`sweep_linear` trains a whole lr × weight-decay grid in one pass over the features:
a ``LinearHead`` fit is the same loop with ``G = 1``.

Cached features are float16. They are gathered and converted to float32 a slice of a
minibatch at a time into reused buffers; the whole matrix is never copied to float32 or
float64. On CPU, a minibatch larger than half the last-level cache is processed in slices,
so that the linear head's backward finds each slice still in cache; a single head's step is
memory traffic, a sweep's is arithmetic (its 12-row matmuls).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featprobe.errors import FeatprobeError

__all__ = [
    "HEADS",
    "HeadSpec",
    "LinearHead",
    "MLPHead",
    "SweepResult",
    "head_name",
    "head_params",
    "list_heads",
    "make_head",
    "sweep_linear",
    "sweep_logreg",
]

# On CPU a minibatch is split into equal slices of at most this many float32 bytes, so the
# converted rows are still in cache for the backward matmul (see _slice_bytes). Measured on a
# 2-core VM whose last-level cache was small, 1500 x 25088 fp16, batch 128: 3 slices (5 MiB)
# 1.07 s, 4 slices 1.09 s, 2 slices 1.12 s, unsliced 1.3-1.4 s.
_SLICE_BYTES = 5 << 20
# Inference converts at most this many bytes of rows at a time.
_PREDICT_BYTES = 64 << 20
_BETAS = (0.9, 0.999)
_EPS = 1e-8


# --------------------------------------------------------------------------- helpers


def _resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else must name a usable device."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


@functools.cache
def _last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Size of CPU 0's last-level data cache from Linux sysfs; None where it cannot be read."""
    best = None
    for entry in Path(root).glob("index*"):
        try:
            if (entry / "type").read_text().strip() == "Instruction":
                continue
            level = int((entry / "level").read_text())
            size = (entry / "size").read_text().strip()
            n = int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, n)
    return None if best is None else best[1]


def _slice_bytes() -> int:
    """Float32 bytes of minibatch rows processed together on CPU: half the last-level cache,
    and at least ``_SLICE_BYTES``.

    Slicing pays where the cache is small (figures at ``_SLICE_BYTES``) and costs where it
    is large: on a VM with a 260 MB L3 (1350 x 25088 fp16, 10 epochs, batch 128) one head
    trained in 0.20 s unsliced vs 0.24-0.28 s in 5 MiB slices, a 12-head sweep in 0.42 vs
    0.52-0.62 s (the sweep's 12-row matmuls run at ~55 GFLOP/s on 43-row slices, ~95 on 128).
    """
    llc = _last_level_cache_bytes()
    return _SLICE_BYTES if llc is None else max(_SLICE_BYTES, llc // 2)


def _seed(random_state: int | None) -> int:
    if random_state is None:  # fresh entropy, without touching any global RNG
        return int(np.random.SeedSequence().entropy % (2**63))
    return int(random_state)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy view of a numpy array; read-only arrays (memmaps) are fine, we never write."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(a)


def _check_finite_rows(X: np.ndarray) -> None:
    """Slow, exact scan; only run once training has already produced a non-finite loss."""
    Xt = _as_tensor(X)
    step = max(1, _PREDICT_BYTES // (4 * max(1, X.shape[1])))
    for s in range(0, X.shape[0], step):
        if not bool(torch.isfinite(Xt[s : s + step]).all()):
            raise ValueError("Input X contains NaN or infinity.")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class _Feeder:
    """Gathers minibatch rows into reused float32 buffers (float16 rows converted on the way).

    Reusing the buffers matters: a fresh 10 MB tensor per step costs page faults comparable
    to the step itself. ``X`` may be replaced (same dtype, width and device) between
    calls, which is how the out-of-core source feeds rows from its shuffle buffer.
    """

    def __init__(self, X, onehot_t: torch.Tensor | None, rows: int, device):
        self.X = _as_tensor(X) if isinstance(X, np.ndarray) else X
        if device.type != "cpu":  # one transfer, in the stored dtype (float16 stays float16)
            self.X = self.X.to(device)
        self.onehot_t = onehot_t  # [C, N] float32, or None (then pass targets to rows())
        d = self.X.shape[1]
        self._f32 = torch.empty(rows, d, dtype=torch.float32, device=device)
        self._raw = (
            None
            if self.X.dtype == torch.float32
            else torch.empty(rows, d, dtype=self.X.dtype, device=device)
        )
        self.shift: torch.Tensor | None = None  # optional standardisation, (x - shift) * scale
        self.scale: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor, onehot_t=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` as float32 ``[k, D]`` (a reused buffer) and their one-hot ``[C, k]``."""
        k = idx.shape[0]
        out = self._f32[:k]
        if self._raw is None:
            torch.index_select(self.X, 0, idx, out=out)
        else:
            raw = self._raw[:k]
            torch.index_select(self.X, 0, idx, out=raw)
            out.copy_(raw)
        if self.shift is not None:
            out.sub_(self.shift).mul_(self.scale)
        src = self.onehot_t if onehot_t is None else onehot_t
        return out, torch.index_select(src, 1, idx)


def _onehot_t(y_idx, n_classes: int, device) -> torch.Tensor:
    """``[C, N]`` float32 one-hot of class indices (the layout the training step reads)."""
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y_idx, dtype=torch.long), n_classes)
    return onehot.T.contiguous().to(device=device, dtype=torch.float32)


class _ArrayRows:
    """Training rows held in memory: a whole-array permutation per epoch.

    A *row source* gives the training loop ``n``, ``d``, ``bind`` (targets, buffers),
    ``epoch`` (the minibatches of one pass, as ``(n_rows, slices)``) and ``check_finite``.
    :mod:`featprobe.outofcore` has the other source, reading an HDF5 file in blocks.
    """

    def __init__(self, X: np.ndarray):
        self.X = X
        self.n, self.d = X.shape

    def bind(self, y_idx, n_classes: int, slice_rows: int, device) -> None:
        self.device = device
        self.feeder = _Feeder(self.X, _onehot_t(y_idx, n_classes, device), slice_rows, device)

    def epoch(self, gen: torch.Generator, batch_size: int, slice_rows: int):
        perm = torch.randperm(self.n, generator=gen).to(self.device)
        for idx in perm.split(batch_size):
            yield idx.shape[0], (self.feeder.rows(part) for part in idx.split(slice_rows))

    def check_finite(self) -> None:
        _check_finite_rows(self.X)


class _Params:
    """The weights of ``G`` stacked heads packed in one flat buffer, with a matching gradient.

    ``weights[i]`` / ``grads[i]`` are views shaped ``[G, ...]`` (head index first), so one
    matmul serves all heads; :meth:`views` cuts the optimiser's state the same way.
    """

    def __init__(self, weights: Sequence[torch.Tensor], device: torch.device):
        self.shapes = [w.shape for w in weights]
        self.flat = torch.cat([w.reshape(-1) for w in weights]).to(device)
        self.grad = torch.zeros_like(self.flat)
        self.weights = self.views(self.flat)
        self.grads = self.views(self.grad)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (shaped like the weights' buffer) cut into the weights' shapes."""
        out, start = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(flat[start : start + n].view(shape))
            start += n
        return out


class _AdamW:
    """AdamW (or Adam with L2 when ``decoupled=False``) with a learning rate and weight
    decay per head; weights flagged False in ``decayed`` (biases) get no weight decay.

    This is ``torch.optim.AdamW(fused=True)``'s kernel called directly, once per distinct
    (lr, weight decay): one pass over the weights per step, where composing it from elementwise
    ops takes ~8 (measured 0.35 vs 2.4 ms per step for 12 heads of 2 × 25088), and without
    the optimiser class's per-group Python overhead (~1.7 ms per step for 24 groups).
    """

    def __init__(self, params: _Params, lrs, wds, decayed, decoupled: bool):
        self.m, self.v = torch.zeros_like(params.flat), torch.zeros_like(params.flat)
        ms, vs = params.views(self.m), params.views(self.v)
        self.kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
        groups: dict[tuple[float, float], list[list[torch.Tensor]]] = {}
        for g, (lr, wd) in enumerate(zip(lrs, wds)):
            for j, decay in enumerate(decayed):
                key = (float(lr), float(wd) if decay else 0.0)
                lists = groups.setdefault(key, [[], [], [], []])
                for out, t in zip(lists, (params.weights, params.grads, ms, vs)):
                    out.append(t[j][g])
        self.calls = [(lists, len(lists[0]), lr, wd) for (lr, wd), lists in groups.items()]
        self.t = torch.zeros((), device=params.flat.device)  # the kernel reads, never bumps it

    def step(self) -> None:
        b1, b2 = _BETAS
        self.t += 1
        for (w, g, m, v), n, lr, wd in self.calls:
            steps = [self.t] * n
            self.kernel(
                w,
                g,
                m,
                v,
                [],
                steps,
                lr=lr,
                beta1=b1,
                beta2=b2,
                weight_decay=wd,
                eps=_EPS,
                amsgrad=False,
                maximize=False,
            )


# --------------------------------------------------------------------------- torch heads


class _TorchHead(ClassifierMixin, BaseEstimator):
    """Validation, the training loop and inference shared by the torch heads.

    Subclasses say what the weights are (``_init_weights``, ``_weights``, ``_set_weights``),
    how a minibatch gives the loss and gradients (``_minibatch``) and the inference forward
    (``_forward``). Weights carry a leading head dimension ``G`` while training.
    """

    _decayed: tuple[bool, ...] = ()  # which weights get weight decay (matrices, not biases)
    _slice_rows_on_cpu = False  # process minibatches in cache-sized slices on CPU

    # ----- parameters and input

    def _check_params(self) -> None:
        def pos_int(name):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")

        def real(name, low, low_open):
            v = getattr(self, name)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < low or (low_open and v == low):
                raise ValueError(
                    f"{name} must be a number {'>' if low_open else '>='} {low}; got {v!r}"
                )

        pos_int("epochs")
        pos_int("batch_size")
        real("lr", 0, True)
        real("weight_decay", 0, False)
        rs = self.random_state
        if rs is not None and (
            not isinstance(rs, numbers.Integral) or isinstance(rs, bool) or rs < 0
        ):
            raise ValueError(f"random_state must be a non-negative integer or None; got {rs!r}")
        _resolve_device(self.device)

    def _validate_X(self, X, reset: bool):
        return validate_data(
            self,
            X,
            reset=reset,
            dtype=[np.float32, np.float16],
            order="C",
            ensure_all_finite=False,  # checked for free by the loss / logits (see fit)
        )

    def _validate_fit(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """Validate X, y and set ``classes_``, ``n_features_in_``; return X and class indices."""
        self._check_params()
        X, y = validate_data(
            self, X, y, dtype=[np.float32, np.float16], order="C", ensure_all_finite=False
        )
        return X, self._set_classes(y)

    # ----- training

    def _decoupled(self) -> bool:
        return True

    def _train(
        self, data, y_idx: np.ndarray, lrs: Sequence[float], wds: Sequence[float]
    ) -> tuple[list[torch.Tensor], np.ndarray]:
        """Train ``len(lrs)`` heads side by side on the same minibatches.

        ``data`` is a float16/float32 array ``[n, D]`` or a row source (see
        :class:`_ArrayRows`); ``y_idx`` holds the class indices of its rows. Returns the CPU
        weights (leading dim = head) and the per-epoch mean training loss, ``[epochs, G]``.
        Head ``g`` gets exactly what a lone fit with ``lrs[g], wds[g]`` would: same init,
        same minibatch order, same update.
        """
        if isinstance(data, np.ndarray):
            data = _ArrayRows(data)
        device = _resolve_device(self.device)
        n, d = data.n, data.d
        n_classes, n_heads = len(self.classes_), len(lrs)
        gen = torch.Generator().manual_seed(_seed(self.random_state))  # CPU: same on any device
        init = self._init_weights(d, n_classes, n_heads, gen)
        scratch = {"dropout_gen": torch.Generator(device=device)}  # per-fit state of the hooks
        scratch["dropout_gen"].manual_seed(int(torch.randint(2**62, (), generator=gen)))
        params = _Params(init, device)
        opt = _AdamW(params, lrs, wds, self._decayed, decoupled=self._decoupled())

        bs = min(self.batch_size, n)
        n_slices = 1
        if self._slice_rows_on_cpu and device.type == "cpu":
            n_slices = math.ceil(bs * 4 * d / _slice_bytes())
        slice_rows = math.ceil(bs / n_slices)
        data.bind(y_idx, n_classes, slice_rows, device)

        curve = torch.zeros(self.epochs, n_heads, device=device)  # summed loss per epoch
        with torch.no_grad():
            for epoch in range(self.epochs):
                loss = curve[epoch]
                for n_rows, slices in data.epoch(gen, bs, slice_rows):
                    self._minibatch(params.weights, params.grads, slices, n_rows, loss, scratch)
                    opt.step()
                if epoch == 0 and not bool(torch.isfinite(loss).all()):
                    data.check_finite()  # raises if X is the culprit; else a head diverged
        curve = (curve.double() / n).cpu().numpy()
        if not np.isfinite(curve[-1]).all():
            warnings.warn(
                f"{type(self).__name__}: training diverged (loss is not finite); lower lr",
                ConvergenceWarning,
                stacklevel=3,
            )
        return [w.cpu() for w in params.weights], curve

    def _init_weights(self, n_features, n_classes, n_heads, gen) -> list[torch.Tensor]:
        raise NotImplementedError

    def _minibatch(self, weights, grads, slices, n_rows: int, loss, scratch: dict) -> None:
        """Write the gradient of the minibatch's mean loss into ``grads``; add its summed
        loss to ``loss`` ``[G]``.

        ``slices`` yields the minibatch's ``n_rows`` rows as ``(x [k, D] float32, one-hot
        target [C, k])`` pieces; ``scratch`` is a dict kept for the whole fit
        (``"dropout_gen"`` is set).
        """
        raise NotImplementedError

    def _set_weights(self, weights: Sequence[torch.Tensor]) -> None:
        """Store one head's weights (no head dim) as numpy learned attributes."""
        raise NotImplementedError

    def _weights(self) -> list[np.ndarray]:
        raise NotImplementedError

    def _forward(self, weights, x) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, X: ArrayLike, y: ArrayLike) -> _TorchHead:
        """Fit the head.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Features; float16 and float32 are used as they are (no full copy), anything else
            is converted to float32.
        y : array-like of shape (n_samples,)
            Class labels, ints or strings.

        Returns
        -------
        self
        """
        X, y_idx = self._validate_fit(X, y)
        return self._fit_indexed(X, y_idx)

    def _fit_source(self, data, y) -> _TorchHead:
        """Fit on a row source (e.g. :class:`featprobe.outofcore.BlockRows`) whose rows, in
        the source's order, have labels ``y``; the rows themselves are never all in memory."""
        self._check_params()
        y_idx = self._set_classes(y)
        self.n_features_in_ = data.d
        return self._fit_indexed(data, y_idx)

    def _set_classes(self, y) -> np.ndarray:
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes in y; got 1 class "
                f"({self.classes_[0]!r})"
            )
        return y_idx

    def _fit_indexed(self, data, y_idx: np.ndarray) -> _TorchHead:
        weights, curve = self._train(data, y_idx, [float(self.lr)], [float(self.weight_decay)])
        self._set_weights([w[0].clone() for w in weights])
        self.n_iter_ = int(self.epochs)
        self.loss_curve_ = [float(v) for v in curve[:, 0]]
        return self

    # ----- inference

    def _logits(self, X) -> np.ndarray:
        """Logits ``[n, C]``: float64 on CPU (row results do not depend on the batch), float32
        on CUDA."""
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        device = _resolve_device(self.device)
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        weights = [
            _as_tensor(np.asarray(w)).to(device=device, dtype=dtype) for w in self._weights()
        ]
        out = np.empty((X.shape[0], len(self.classes_)), dtype=np.float64)
        Xt = _as_tensor(X)
        step = max(1, _PREDICT_BYTES // (8 * X.shape[1]))
        # One reused buffer: converting into fresh memory each block costs page faults
        # (1500 x 25088 fp16 → float64: ~110 ms fresh vs ~30 ms reused, 2-core VM).
        buf = torch.empty(min(step, X.shape[0]), X.shape[1], dtype=dtype, device=device)
        with torch.no_grad():
            for s in range(0, X.shape[0], step):
                xb = buf[: min(step, X.shape[0] - s)]
                xb.copy_(Xt[s : s + step])
                out[s : s + step] = self._forward(weights, xb).cpu().numpy()
        if not np.isfinite(out).all():
            _check_finite_rows(X)
        return out

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """Class scores (logits).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, C)
            Binary: positive minus negative class logit (> 0 predicts ``classes_[1]``).
            Multiclass: the logits, columns in the order of ``classes_``.
        """
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities (softmax of the logits).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, C)
            Columns in the order of ``classes_``; rows sum to 1.
        """
        return _softmax(self._logits(X))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Most probable class of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        logits = self._logits(X)
        return self.classes_[np.argmax(logits, axis=1)]


class LinearHead(_TorchHead):
    """A linear probe: ``nn.Linear(D, C)`` trained with Adam(W) and cross-entropy.

    Parameters
    ----------
    epochs : int, default=30
        Passes over the training rows.
    batch_size : int, default=128
        Rows per minibatch (the last one of an epoch may be smaller).
    lr : float, default=1e-3
        Learning rate.
    weight_decay : float, default=1e-4
        Weight decay on the weight matrix (not the bias); decoupled for ``"adamw"``, an L2
        term in the gradient for ``"adam"``.
    optimizer : {"adamw", "adam"}, default="adamw"
    device : str, default="auto"
        ``"auto"`` uses CUDA when available.
    random_state : int or None, default=0
        Seeds the initialisation and the minibatch order (a local generator; the global
        torch RNG is untouched). Same input and seed give identical weights on CPU.

    Attributes
    ----------
    classes_ : ndarray of shape (C,)
    coef_ : ndarray of shape (C, D), float32
    intercept_ : ndarray of shape (C,), float32
    n_features_in_ : int
    n_iter_ : int
        Epochs run.
    loss_curve_ : list of float
        Mean training cross-entropy of each epoch.
    """

    _decayed = (True, False)
    _slice_rows_on_cpu = True

    def __init__(
        self,
        epochs: int = 30,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        device: str = "auto",
        random_state: int | None = 0,
    ):
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.device = device
        self.random_state = random_state

    def _check_params(self) -> None:
        super()._check_params()
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw'; got {self.optimizer!r}")

    def _decoupled(self) -> bool:
        return self.optimizer == "adamw"

    def _init_weights(self, n_features, n_classes, n_heads, gen):
        bound = 1 / math.sqrt(n_features)  # nn.Linear's default init
        w = torch.empty(n_classes, n_features).uniform_(-bound, bound, generator=gen)
        b = torch.empty(n_classes).uniform_(-bound, bound, generator=gen)
        return [w.expand(n_heads, -1, -1).contiguous(), b.expand(n_heads, -1).contiguous()]

    def _minibatch(self, weights, grads, slices, n_rows, loss, scratch):
        w, b = weights
        gw, gb = grads
        n_heads, n_classes, d = w.shape
        # Softmax is shift-invariant, so logits relative to the last class need C-1 rows per
        # head; and softmax - onehot sums to 0 over classes, so the last class's gradient is
        # minus the others'. Both matmuls shrink by (C-1)/C: half for a binary problem.
        n_rel = n_heads * (n_classes - 1)
        if "rel_w" not in scratch:
            # The forward matmul gets zero rows up to a multiple of 16: MKL runs 12 rows x
            # 25088 x 128 in ~1.4 ms but 16 rows in ~1.1 (2-core VM); a 12-head sweep's
            # 10 epochs took 0.37-0.41 s padded vs 0.40-0.42 unpadded.
            padded = -(-n_rel // 16) * 16 if n_rel > 8 else n_rel
            scratch["rel_w_pad"] = w.new_zeros(padded, d)
            scratch["rel_b_pad"] = w.new_zeros(padded, 1)
            scratch["rel_w"] = scratch["rel_w_pad"][:n_rel].view(n_heads, n_classes - 1, d)
            scratch["rel_g"] = torch.empty_like(w[:, 1:])
        rel_w_pad, rel_b_pad = scratch["rel_w_pad"], scratch["rel_b_pad"]
        rel_g = scratch["rel_g"].view(-1, d)
        torch.sub(w[:, :-1], w[:, -1:], out=scratch["rel_w"])
        rel_b_pad[:n_rel] = (b[:, :-1] - b[:, -1:]).reshape(-1, 1)
        gb.zero_()
        for i, (x, target) in enumerate(slices):  # a slice is still in cache for the backward
            k = x.shape[0]
            rel = torch.addmm(rel_b_pad, rel_w_pad, x.T)[:n_rel].view(n_heads, n_classes - 1, k)
            logits = torch.cat([rel, rel.new_zeros(n_heads, 1, k)], dim=1)
            logp = torch.log_softmax(logits, dim=1)
            loss.sub_(torch.mv(logp.view(n_heads, -1), target.view(-1)))
            dlogits = logp.exp_().sub_(target).div_(n_rows)  # d(mean loss)/d(logits)
            rel_dlogits = dlogits[:, :-1].reshape(-1, k)
            if i == 0:
                torch.mm(rel_dlogits, x, out=rel_g)
            else:
                rel_g.addmm_(rel_dlogits, x)
            gb.add_(dlogits.sum(dim=2))
        rel_g3 = scratch["rel_g"]
        gw[:, :-1] = rel_g3
        torch.neg(rel_g3[:, 0], out=gw[:, -1])  # 0.03 ms; torch.sum(dim=1, out=) took 0.16
        if n_classes > 2:
            gw[:, -1].sub_(rel_g3[:, 1:].sum(dim=1))

    def _set_weights(self, weights):
        self.coef_ = weights[0].numpy()
        self.intercept_ = weights[1].numpy()

    def _weights(self):
        return [self.coef_, self.intercept_]

    def _forward(self, weights, x):
        w, b = weights
        return torch.addmm(b, x, w.T)


class MLPHead(_TorchHead):
    """The VGG-style classifier head: Linear(D, hidden) → ReLU → Dropout → Linear(hidden, C).

    Trained like :class:`LinearHead` (AdamW, cross-entropy, same loop). Dropout masks come
    from a local generator, so fits are reproducible on CPU.

    Parameters
    ----------
    hidden : int, default=4096
    dropout : float, default=0.5
        Drop probability, in [0, 1).
    epochs, batch_size, lr, weight_decay, device, random_state
        As for :class:`LinearHead`.

    Attributes
    ----------
    classes_ : ndarray of shape (C,)
    coefs_ : list of ndarray
        Weight matrices ``[hidden, D]`` and ``[C, hidden]`` (torch's ``[out, in]``), float32.
    intercepts_ : list of ndarray
        Biases ``[hidden]`` and ``[C]``.
    n_features_in_, n_iter_, loss_curve_
        As for :class:`LinearHead`.
    """

    _decayed = (True, False, True, False)

    def __init__(
        self,
        hidden: int = 4096,
        dropout: float = 0.5,
        epochs: int = 30,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        device: str = "auto",
        random_state: int | None = 0,
    ):
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.device = device
        self.random_state = random_state

    def _check_params(self) -> None:
        super()._check_params()
        h = self.hidden
        if not isinstance(h, numbers.Integral) or isinstance(h, bool) or h < 1:
            raise ValueError(f"hidden must be an integer >= 1; got {h!r}")
        p = self.dropout
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 <= p < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {p!r}")

    def _init_weights(self, n_features, n_classes, n_heads, gen):
        out = []
        for fan_in, fan_out in ((n_features, self.hidden), (self.hidden, n_classes)):
            bound = 1 / math.sqrt(fan_in)
            out.append(torch.empty(n_heads, fan_out, fan_in).uniform_(-bound, bound, generator=gen))
            out.append(torch.empty(n_heads, fan_out).uniform_(-bound, bound, generator=gen))
        return out

    def _minibatch(self, weights, grads, slices, n_rows, loss, scratch):
        p = self.dropout
        for g in grads:
            g.zero_()
        for x, target in slices:
            with torch.enable_grad():
                params = [w[0].detach().requires_grad_() for w in weights]  # one head
                w1, b1, w2, b2 = params
                h = torch.relu(torch.addmm(b1, x, w1.T))
                if p > 0:
                    keep = torch.empty_like(h).bernoulli_(1 - p, generator=scratch["dropout_gen"])
                    h = h * keep / (1 - p)
                logp = torch.log_softmax(torch.addmm(b2, h, w2.T), dim=1)
                slice_loss = -(logp * target.T).sum()
                for acc, g in zip(grads, torch.autograd.grad(slice_loss, params)):
                    acc[0].add_(g, alpha=1 / n_rows)
            loss.add_(slice_loss.detach())

    def _set_weights(self, weights):
        self.coefs_ = [weights[0].numpy(), weights[2].numpy()]
        self.intercepts_ = [weights[1].numpy(), weights[3].numpy()]

    def _weights(self):
        return [self.coefs_[0], self.intercepts_[0], self.coefs_[1], self.intercepts_[1]]

    def _forward(self, weights, x):
        w1, b1, w2, b2 = weights
        return torch.addmm(b2, torch.relu(torch.addmm(b1, x, w1.T)), w2.T)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class HeadSpec:
    """One registered head.

    Attributes
    ----------
    name : str
        The name used on the command line and in run records.
    factory : type
        The estimator class.
    description : str
        One line for ``featprobe heads`` and the docs.
    defaults : dict
        Parameters featprobe sets on top of the class's own defaults.
    """

    name: str
    factory: Callable[..., Any]
    description: str
    defaults: dict = field(default_factory=dict)

    def params(self) -> dict:
        """All parameters of the head as ``make_head(name)`` builds it."""
        return _jsonable_params(self.factory(**self.defaults))


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec("linear", LinearHead, "torch linear layer, AdamW + cross-entropy; GPU if present"),
        HeadSpec("mlp", MLPHead, "torch MLP (VGG classifier style): Linear-ReLU-Dropout-Linear"),
        HeadSpec(
            "logreg",
            LogisticRegression,
            "scikit-learn logistic regression (lbfgs)",
            {"max_iter": 1000},
        ),
        HeadSpec(
            "svm",
            LinearSVC,
            "scikit-learn linear SVM (LinearSVC); no predict_proba",
            {"random_state": 0},
        ),
        HeadSpec(
            "svm-rbf",
            SVC,
            "scikit-learn RBF-kernel SVM (SVC), Platt-scaled probabilities",
            {"probability": True, "random_state": 0},
        ),
    )
}


def list_heads() -> list[str]:
    """Names of the registered heads, in registry order."""
    return list(HEADS)


def make_head(name: str, standardize: bool = False, **params: Any) -> BaseEstimator:
    """Build an unfitted head by registry name.

    Parameters
    ----------
    name : str
        A key of :data:`HEADS`.
    standardize : bool, default=False
        Put a ``StandardScaler`` in front (a pipeline, so the scaler is fit on the training
        rows only).
    **params
        Head parameters, overriding the registry defaults.

    Returns
    -------
    estimator
        The head, or ``Pipeline(StandardScaler, head)``.

    Raises
    ------
    FeatprobeError
        Unknown name, unknown parameter or a bad parameter value.
    """
    spec = HEADS.get(name)
    if spec is None:
        raise FeatprobeError(f"unknown head {name!r}; known heads: {', '.join(HEADS)}")
    valid = spec.factory().get_params(deep=False)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise FeatprobeError(
            f"unknown parameter {unknown[0]!r} for head {name!r}; valid: {', '.join(sorted(valid))}"
        )
    head = spec.factory(**{**spec.defaults, **params})
    check = getattr(head, "_check_params", None) or getattr(head, "_validate_params", None)
    try:
        if check is not None:
            check()
    except (ValueError, TypeError) as e:
        raise FeatprobeError(f"head {name!r}: {str(e).splitlines()[0]}") from e
    return make_pipeline(StandardScaler(), head) if standardize else head


def _split(estimator) -> tuple[BaseEstimator, bool]:
    """The head inside ``estimator`` and whether a StandardScaler precedes it."""
    if isinstance(estimator, Pipeline):
        steps = [s for _, s in estimator.steps]
        return steps[-1], any(isinstance(s, StandardScaler) for s in steps[:-1])
    return estimator, False


def head_name(estimator: BaseEstimator) -> str:
    """The registry name of a head (or of the head at the end of a pipeline)."""
    head, _ = _split(estimator)
    for spec in HEADS.values():
        if type(head) is spec.factory:
            return spec.name
    if type(head) is SGDClassifier and head.loss in _SGD_FALLBACK_OF:
        return _SGD_FALLBACK_OF[head.loss]  # the out-of-core stand-in for logreg / svm
    raise FeatprobeError(f"{type(head).__name__} is not a registered head")


# featprobe.outofcore fits these SGDClassifier losses for logreg / svm over the memory budget
_SGD_FALLBACK_OF = {"log_loss": "logreg", "hinge": "svm"}


def _to_json(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return [_to_json(x) for x in v]
    return v


def _jsonable_params(estimator) -> dict:
    out = {}
    for k, v in estimator.get_params(deep=False).items():
        v = _to_json(v)
        try:
            if json.loads(json.dumps(v)) == v:
                out[k] = v
        except (TypeError, ValueError):
            pass
    return out


def head_params(estimator: BaseEstimator) -> dict:
    """All JSON-representable parameters of a head, for run records.

    Includes ``standardize`` so that ``make_head(head_name(est), **head_params(est))``
    rebuilds an unfitted copy.
    """
    head, standardize = _split(estimator)
    return {"standardize": standardize, **_jsonable_params(head)}


# --------------------------------------------------------------------------- sweeps


@dataclass
class SweepResult:
    """Outcome of a sweep.

    Attributes
    ----------
    grid : list of dict
        One entry per grid point, in grid order: its parameters, ``train_accuracy`` and
        ``val_accuracy``.
    best : dict
        The grid entry with the highest validation accuracy (ties → the earlier point).
    best_estimator_ : estimator
        A fitted head carrying the winner's parameters and weights.
    estimators_ : list of estimator
        Every grid point's fitted head, in grid order (for a linear sweep their weights are
        views of one stacked array; ``best_estimator_`` owns a copy).
    """

    grid: list[dict]
    best: dict
    best_estimator_: BaseEstimator
    estimators_: list[BaseEstimator] = field(default_factory=list, repr=False)


def _best(grid: list[dict]) -> int:
    return max(range(len(grid)), key=lambda i: (grid[i]["val_accuracy"], -i))


def sweep_linear(
    X_train: ArrayLike,
    y_train: ArrayLike,
    X_val: ArrayLike,
    y_val: ArrayLike,
    lrs: Sequence[float] = (1e-4, 3e-4, 1e-3, 3e-3),
    weight_decays: Sequence[float] = (0, 1e-4, 1e-2),
    epochs: int = 30,
    batch_size: int = 128,
    device: str = "auto",
    random_state: int | None = 0,
) -> SweepResult:
    """Train a grid of :class:`LinearHead` (lr × weight decay) together; pick the best on val.

    All heads share one pass over the features: each minibatch is gathered and converted
    once, one matmul computes every head's logits and one every head's gradient, and each
    head is updated with its own lr and weight decay. Every head starts from the same
    initialisation and sees the same minibatches, so grid point ``(lr, wd)`` ends with the
    weights that ``LinearHead(lr=lr, weight_decay=wd, epochs=..., batch_size=...,
    random_state=...)`` gets alone, up to float32 rounding.

    Parameters
    ----------
    X_train, y_train : array-like
        Training features ``[n, D]`` (float16 used as is) and labels.
    X_val, y_val : array-like
        Validation features and labels, for choosing the best grid point.
    lrs, weight_decays : sequence of float
        The grid is their product, lr-major: ``[(lr, wd) for lr in lrs for wd in wds]``.
    epochs, batch_size, device, random_state
        As for :class:`LinearHead`, shared by every grid point. ``random_state=None`` draws
        one seed for the whole grid.

    Returns
    -------
    SweepResult
        ``grid`` entries have ``lr``, ``weight_decay``, ``train_accuracy``,
        ``val_accuracy``; ``best_estimator_`` is a fitted :class:`LinearHead`.
    """
    proto, points = _sweep_setup(lrs, weight_decays, epochs, batch_size, device, random_state)
    X, y_idx = proto._validate_fit(X_train, y_train)
    weights, curve = proto._train(X, y_idx, [p[0] for p in points], [p[1] for p in points])
    correct = _sweep_scorer(proto, weights)
    train_acc = correct(X_train, y_train) / len(y_train)
    val_acc = correct(X_val, y_val) / max(1, len(y_val))
    return _sweep_result(proto, points, weights, curve, train_acc, val_acc)


def _sweep_setup(lrs, weight_decays, epochs, batch_size, device, random_state):
    """The unfitted prototype head and the grid points of a linear sweep (checked)."""
    if random_state is None:  # every head must see the same init and batches
        random_state = _seed(None)
    points = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    if not points:
        raise FeatprobeError("sweep_linear needs at least one lr and one weight decay")
    proto = LinearHead(
        epochs=epochs, batch_size=batch_size, device=device, random_state=random_state
    )
    try:
        for lr, wd in points:
            proto.set_params(lr=lr, weight_decay=wd)._check_params()
    except ValueError as e:
        raise FeatprobeError(f"sweep_linear: {e}") from e
    return proto, points


def _fitted_linear(proto, weights, curve, **params) -> LinearHead:
    est = clone(proto).set_params(**params)
    for k in ("classes_", "n_features_in_", "feature_names_in_"):
        if hasattr(proto, k):
            setattr(est, k, getattr(proto, k))
    est._set_weights(weights)
    est.n_iter_ = int(proto.epochs)
    est.loss_curve_ = [float(v) for v in curve]
    return est


def _sweep_scorer(proto, weights):
    """``correct(X, y) -> [G]``: how many rows of ``(X, y)`` each grid head gets right.

    All heads are scored in one pass: one stacked head with ``G * C`` outputs. Usable on
    blocks of rows (the counts add up).
    """
    w, b = weights  # [G, C, D], [G, C]
    stacked = _fitted_linear(proto, [w.reshape(-1, w.shape[2]), b.reshape(-1)], [])
    stacked.classes_ = np.arange(w.shape[0] * w.shape[1])

    def correct(X_, y_) -> np.ndarray:
        if len(y_) == 0:
            return np.zeros(w.shape[0])
        logits = stacked._logits(X_).reshape(len(X_), w.shape[0], w.shape[1])
        pred = proto.classes_[logits.argmax(axis=2)]  # [n, G]
        return (pred == np.asarray(y_).reshape(-1, 1)).sum(axis=0)

    return correct


def _sweep_result(proto, points, weights, curve, train_acc, val_acc) -> SweepResult:
    w, b = weights
    grid = [
        {
            "lr": lr,
            "weight_decay": wd,
            "train_accuracy": float(train_acc[g]),
            "val_accuracy": float(val_acc[g]),
        }
        for g, (lr, wd) in enumerate(points)
    ]
    estimators = [
        _fitted_linear(proto, [w[g], b[g]], curve[:, g], lr=lr, weight_decay=wd)
        for g, (lr, wd) in enumerate(points)
    ]
    g = _best(grid)
    best = _fitted_linear(
        proto, [w[g].clone(), b[g].clone()], curve[:, g], lr=points[g][0],
        weight_decay=points[g][1],
    )
    return SweepResult(grid=grid, best=grid[g], best_estimator_=best, estimators_=estimators)


def sweep_logreg(
    X_train: ArrayLike,
    y_train: ArrayLike,
    X_val: ArrayLike,
    y_val: ArrayLike,
    Cs: Sequence[float] = (0.001, 0.01, 0.1, 1, 10, 100),
) -> SweepResult:
    """Fit ``logreg`` for each inverse regularisation strength ``C``; pick the best on val.

    Parameters
    ----------
    X_train, y_train, X_val, y_val : array-like
        As for :func:`sweep_linear`.
    Cs : sequence of float
        The values of ``LogisticRegression(C=...)`` to try, in grid order.

    Returns
    -------
    SweepResult
        ``grid`` entries have ``C``, ``train_accuracy``, ``val_accuracy``; ``best_estimator_``
        is the fitted ``LogisticRegression``.
    """
    if not len(Cs):
        raise FeatprobeError("sweep_logreg needs at least one C")
    # One float32 copy shared by all fits (lbfgs keeps float32; float16 would become float64).
    X_train = np.asarray(X_train, dtype=np.float32)
    X_val = np.asarray(X_val, dtype=np.float32)
    grid, fitted = [], []
    for C in Cs:
        est = make_head("logreg", C=float(C)).fit(X_train, y_train)
        fitted.append(est)
        grid.append(
            {
                "C": float(C),
                "train_accuracy": float(est.score(X_train, y_train)),
                "val_accuracy": float(est.score(X_val, y_val)),
            }
        )
    g = _best(grid)
    return SweepResult(grid=grid, best=grid[g], best_estimator_=fitted[g], estimators_=fitted)
