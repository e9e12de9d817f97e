"""The torch heads: :class:`LinearHead` and :class:`MLPHead`, scikit-learn estimators trained
with autograd and ``torch.optim`` on minibatches of cached features.

One training loop serves both and trains ``G`` heads side by side, each with its own parameters
in an optimiser group of its own learning rate and weight decay, all from the same
initialisation and minibatches: a lone fit is ``G = 1``, a sweep one pass over the features.
Rows come from a row source (:mod:`featprobe.probe.rows`), converted to float32 a minibatch at
a time.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch.optim.adam import adam

from featprobe.policy import resolve_device
from featprobe.probe.rows import ArrayRows, as_tensor, check_finite_rows

__all__ = ["LinearHead", "MLPHead"]

# Inference converts at most this many bytes of rows at a time.
_PREDICT_BYTES = 64 << 20


def _seed(random_state: int | None) -> int:
    if random_state is None:  # fresh entropy, without touching any global RNG
        return int(np.random.SeedSequence().entropy % (2**63))
    return int(random_state)


def _check_int(est, name: str) -> None:
    v = getattr(est, name)
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {v!r}")


def _uniform(gen: torch.Generator, fan_in: int, *shape: int) -> torch.Tensor:
    """``nn.Linear``'s default initialisation, from a local generator."""
    bound = 1 / math.sqrt(fan_in)
    return torch.empty(*shape).uniform_(-bound, bound, generator=gen)


class _Adam:
    """``torch.optim.AdamW`` (``decoupled``) or ``Adam`` with ``fused=True``: the same update,
    through torch.optim's functional form (:func:`torch.optim.adam.adam`), on parameter groups
    ``{(lr, weight_decay): [tensors]}``. Not the optimiser classes themselves: constructing one
    imports torch's compiler stack, dynamo (torch 2.14: 2.0 s and +159 MiB in every ``featprobe
    fit`` process, twice the time of a whole linear fit on 1,500 x 25,088 here)."""

    def __init__(self, groups: dict[tuple[float, float], list[torch.Tensor]], decoupled: bool):
        self.groups, self.decoupled = groups, decoupled
        self.state = [[(torch.zeros_like(p), torch.zeros_like(p),
                        torch.zeros((), dtype=torch.float32, device=p.device)) for p in ps]
                      for ps in groups.values()]

    def step(self) -> None:
        """One update from the gradients, which are then dropped (``zero_grad(set_to_none)``)."""
        for ((lr, wd), ps), state in zip(self.groups.items(), self.state):
            exp_avgs, exp_avg_sqs, steps = (list(t) for t in zip(*state))
            adam(ps, [p.grad for p in ps], exp_avgs, exp_avg_sqs, [], steps, fused=True,
                 decoupled_weight_decay=self.decoupled, amsgrad=False, beta1=0.9, beta2=0.999,
                 lr=lr, weight_decay=wd, eps=1e-8, maximize=False)
            for p in ps:
                p.grad = None


@functools.lru_cache(maxsize=8)
def _relative(n_heads: int, n_classes: int, device: torch.device) -> torch.Tensor:
    """``[G*(C-1), G*C]``, block diagonal: each head's logits minus its last class's."""
    a = torch.cat([torch.eye(n_classes - 1), -torch.ones(n_classes - 1, 1)], dim=1)
    return torch.block_diag(*[a] * n_heads).to(device)


class _TorchHead(ClassifierMixin, BaseEstimator):
    """Validation, the training loop and inference shared by the torch heads.

    Subclasses define one head's parameters (``_init``, with ``_decayed`` marking those that
    get weight decay), the forward pass (``_forward(params, x, train=False)``), how the
    parameters are stored as learned attributes (``_store``, ``_stored``) and ``n_parameters``.
    """

    _decayed: tuple[bool, ...] = ()

    def _check_params(self) -> None:
        _check_int(self, "epochs")
        _check_int(self, "batch_size")
        for name, low_open in (("lr", True), ("weight_decay", False)):
            v = getattr(self, name)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < 0 or (low_open and v == 0):
                low = ">" if low_open else ">="
                raise ValueError(f"{name} must be a number {low} 0; got {v!r}")
        rs = self.random_state
        if rs is not None and (not isinstance(rs, numbers.Integral) or isinstance(rs, bool)
                               or rs < 0):
            raise ValueError(f"random_state must be a non-negative integer or None; got {rs!r}")
        resolve_device(self.device, error=ValueError)

    def _epochs(self, n_rows: int, batch_size: int) -> int:
        """``epochs``, or more for a small set, so that training takes ``min_steps`` steps."""
        steps = math.ceil(n_rows / batch_size)
        return max(int(self.epochs), math.ceil(getattr(self, "min_steps", 0) / steps))

    def _set_classes(self, y) -> np.ndarray:
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes in y; got 1 class "
                             f"({self.classes_[0]!r})")
        return y_idx

    def _validate_fit(self, X, y) -> tuple[np.ndarray, np.ndarray]:
        """Validate X, y and set ``classes_``, ``n_features_in_``; return X and class indices.
        Non-finite values are caught after each epoch from the weights (see _train)."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float16], order="C",
                             ensure_all_finite=False)
        return X, self._set_classes(y)

    def _optimizer(self, params: list[list[torch.Tensor]], lrs, wds) -> _Adam:
        """One parameter group per distinct (lr, weight decay); biases get no weight decay."""
        groups: dict[tuple[float, float], list[torch.Tensor]] = {}
        for head, lr, wd in zip(params, lrs, wds):
            for p, decay in zip(head, self._decayed):
                groups.setdefault((float(lr), float(wd) if decay else 0.0), []).append(p)
        return _Adam(groups, decoupled=getattr(self, "optimizer", "adamw") == "adamw")

    def _scores(self, params: list[list[torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
        """``[G, C, k]``: every head's logits for the rows ``x``, classes before rows (the
        layout whose gradients reach the weights without a transposed copy)."""
        return torch.stack([self._forward(p, x, train=True).T for p in params])

    def _train(self, rows, lrs: Sequence[float], wds: Sequence[float]
               ) -> tuple[list[list[torch.Tensor]], np.ndarray]:
        """Train ``len(lrs)`` heads side by side on the minibatches of ``rows`` (a row source).

        Returns each head's parameters (CPU tensors) and the mean training loss of each
        epoch, ``[epochs, G]``. Head ``g`` gets what a lone fit with ``lrs[g], wds[g]`` would:
        the same initialisation, minibatch order and update, up to float32 rounding.
        """
        device = resolve_device(self.device)
        n_classes, n_heads = len(self.classes_), len(lrs)
        gen = torch.Generator().manual_seed(_seed(self.random_state))  # CPU: same on any device
        init = self._init(rows.d, n_classes, gen)
        self._dropout_gen = torch.Generator(device=device)
        self._dropout_gen.manual_seed(int(torch.randint(2**62, (), generator=gen)))
        params = [[t.to(device, copy=True).requires_grad_() for t in init] for _ in range(n_heads)]
        opt = self._optimizer(params, lrs, wds)
        bs = min(self.batch_size, rows.n)
        epochs = self._epochs(rows.n, bs)
        curve = torch.zeros(epochs, n_heads, device=device)  # summed loss per epoch
        checked = False
        for epoch in range(epochs):
            for x, y in rows.batches(gen, bs, device):
                scores = self._scores(params, x)  # [G, C, k]
                loss = F.cross_entropy(scores, y.expand(n_heads, -1), reduction="none").sum(1)
                (loss.sum() / x.shape[0]).backward()  # each head: the gradient of its mean loss
                opt.step()
                curve[epoch] += loss.detach()
            # a non-finite row reaches the weights through its gradient (0 * inf is NaN)
            if not checked and not all(bool(torch.isfinite(p).all()) for h in params for p in h):
                rows.check_finite()  # raises if X is the culprit; else a head diverged
                checked = True
        curve = (curve.double() / rows.n).cpu().numpy()
        if not np.isfinite(curve[-1]).all():
            warnings.warn(f"{type(self).__name__}: training diverged (loss is not finite); "
                          "lower lr", ConvergenceWarning, stacklevel=3)
        del self._dropout_gen
        return [[t.detach().cpu() for t in head] for head in params], curve

    def fit(self, X: ArrayLike, y: ArrayLike) -> _TorchHead:
        """Fit on features ``X`` (float16 and float32 used as they are, never copied whole;
        anything else converted to float32) and labels ``y`` (ints or strings)."""
        X, y_idx = self._validate_fit(X, y)
        return self.fit_rows(ArrayRows(X, y_idx))

    def fit_rows(self, rows, y=None) -> _TorchHead:
        """Fit on a row source (:mod:`featprobe.probe.rows`); with ``y`` (the labels of its
        rows, in its order) the classes are set here, else ``fit`` set them already."""
        if y is not None:
            self._check_params()
            rows.set_targets(self._set_classes(y))
            self.n_features_in_ = rows.d
        params, curve = self._train(rows, [float(self.lr)], [float(self.weight_decay)])
        return self._fitted(params[0], curve[:, 0])

    def _fitted(self, params: list[torch.Tensor], curve: np.ndarray) -> _TorchHead:
        """Set the learned attributes from one head's trained parameters and loss curve."""
        self._store(params)
        self.n_iter_ = len(curve)
        self.loss_curve_ = [float(v) for v in curve]
        return self

    def _logits(self, X) -> np.ndarray:
        """Logits ``[n, C]``: float64 on CPU (a row's result does not depend on its batch),
        float32 on CUDA."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float16], order="C",
                          ensure_all_finite=False)
        device = resolve_device(self.device, error=ValueError)
        dtype = torch.float64 if device.type == "cpu" else torch.float32
        params = [as_tensor(np.asarray(w)).to(device=device, dtype=dtype) for w in self._stored()]
        out = np.empty((X.shape[0], len(self.classes_)), dtype=np.float64)
        Xt = as_tensor(X)
        step = min(X.shape[0], max(1, _PREDICT_BYTES // (8 * X.shape[1])))
        # one reused buffer: fresh memory for every block costs a page fault per 4 KiB (90,000 x
        # 4,096 float16: 1.1-1.4 s with 720,000 faults, 0.54 s reused)
        buf = torch.empty(step, X.shape[1], dtype=dtype, device=device)
        with torch.no_grad():
            for s in range(0, X.shape[0], step):
                xb = buf[: min(step, X.shape[0] - s)]
                xb.copy_(Xt[s : s + step])
                out[s : s + step] = self._forward(params, xb).cpu().numpy()
        if not np.isfinite(out).all():
            check_finite_rows(X)
        return out

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """Binary: positive minus negative class logit (> 0 predicts ``classes_[1]``), shape
        ``(n,)``; multiclass: the logits ``(n, C)``, columns in the order of ``classes_``."""
        logits = self._logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities (softmax of the logits), ``(n, C)`` in ``classes_`` order."""
        return torch.softmax(torch.from_numpy(self._logits(X)), dim=1).numpy()

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The most probable class of each row, from ``classes_``."""
        logits = self._logits(X)  # first: an unfitted head raises NotFittedError here
        return self.classes_[np.argmax(logits, axis=1)]


class LinearHead(_TorchHead):
    """A linear probe: ``nn.Linear(D, C)`` trained with AdamW (or Adam) and cross-entropy.

    Parameters
    ----------
    epochs : int, default=30
        Passes over the training rows (at least; see ``min_steps``).
    batch_size : int, default=128
        Rows per minibatch (the last one of an epoch may be smaller).
    lr : float, default=1e-3
    weight_decay : float, default=1e-4
        On the weight matrix, not the bias; decoupled for ``"adamw"``, an L2 term for ``"adam"``.
    min_steps : int, default=500
        Small sets get more epochs, so that training takes at least this many optimiser steps:
        30 epochs of 300 rows are 90 steps of lr 1e-3, too few to fit even separable data
        (62% training accuracy on scikit-learn's 3-blob check, 92% with 500 steps). Sets of
        2,000+ rows are unaffected at the defaults. 0: exactly ``epochs``.
    optimizer : {"adamw", "adam"}, default="adamw"
    device : str, default="auto"
        ``"auto"`` uses CUDA when available.
    random_state : int or None, default=0
        Seeds the initialisation and the minibatch order (a local generator; the global torch
        RNG is untouched). Same input and seed give identical weights on CPU.

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

    def __init__(self, epochs: int = 30, batch_size: int = 128, lr: float = 1e-3,
                 weight_decay: float = 1e-4, optimizer: str = "adamw", device: str = "auto",
                 random_state: int | None = 0, min_steps: int = 500):
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.min_steps = min_steps
        self.optimizer = optimizer
        self.device = device
        self.random_state = random_state

    def _check_params(self) -> None:
        super()._check_params()
        m = self.min_steps
        if not isinstance(m, numbers.Integral) or isinstance(m, bool) or m < 0:
            raise ValueError(f"min_steps must be an integer >= 0; got {m!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw'; got {self.optimizer!r}")

    def _init(self, n_features, n_classes, gen):
        return [_uniform(gen, n_features, n_classes, n_features),
                _uniform(gen, n_features, n_classes)]

    def _forward(self, params, x, train=False):
        w, b = params
        # (W x^T)^T: for few classes MKL runs [C, D] @ [D, k] much faster than x @ W^T
        return torch.addmm(b[:, None], w, x.T).T

    def _scores(self, params, x):
        # Cross-entropy is unchanged when every logit of a row moves by the same amount, so the
        # loss is taken on logits relative to the last class: C-1 rows per head in both the
        # forward and autograd's backward matmul (half the matmul time for two classes, the
        # fit's largest cost), and every head in one matmul: [G * (C-1), D].
        w, b = (torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*params))
        a = _relative(len(params), len(b) // len(params), x.device)
        rel = torch.addmm((a @ b)[:, None], a @ w, x.T).view(len(params), -1, x.shape[0])
        return F.pad(rel, (0, 0, 0, 1))  # the last class's relative logit: 0

    def _store(self, params):
        self.coef_, self.intercept_ = params[0].numpy(), params[1].numpy()

    def _stored(self):
        return [self.coef_, self.intercept_]

    def n_parameters(self, n_features: int, n_classes: int) -> int:
        return (n_features + 1) * n_classes


class MLPHead(_TorchHead):
    """The VGG-style classifier head: Linear(D, hidden) → ReLU → Dropout → Linear(hidden, C).

    Trained like :class:`LinearHead` (AdamW, cross-entropy, the same loop). Dropout masks come
    from a generator seeded by ``random_state``, so fits are reproducible on CPU.

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

    def __init__(self, hidden: int = 4096, dropout: float = 0.5, epochs: int = 30,
                 batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 1e-4,
                 device: str = "auto", random_state: int | None = 0):
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
        _check_int(self, "hidden")
        p = self.dropout
        if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0 <= p < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {p!r}")

    def _init(self, n_features, n_classes, gen):
        out = []
        for fan_in, fan_out in ((n_features, self.hidden), (self.hidden, n_classes)):
            out += [_uniform(gen, fan_in, fan_out, fan_in), _uniform(gen, fan_in, fan_out)]
        return out

    def _forward(self, params, x, train=False):
        w1, b1, w2, b2 = params
        h = torch.relu(torch.addmm(b1, x, w1.T))
        if train and self.dropout > 0:  # F.dropout takes no generator: the mask is drawn here
            keep = torch.empty_like(h).bernoulli_(1 - self.dropout, generator=self._dropout_gen)
            h = h * keep / (1 - self.dropout)
        return torch.addmm(b2, h, w2.T)

    def _store(self, params):
        self.coefs_ = [params[0].numpy(), params[2].numpy()]
        self.intercepts_ = [params[1].numpy(), params[3].numpy()]

    def _stored(self):
        return [self.coefs_[0], self.intercepts_[0], self.coefs_[1], self.intercepts_[1]]

    def n_parameters(self, n_features: int, n_classes: int) -> int:
        return (n_features + 1) * self.hidden + (self.hidden + 1) * n_classes
