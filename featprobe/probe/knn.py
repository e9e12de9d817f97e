"""The k-NN head: cosine similarity on L2-normalised features and a temperature-weighted vote of
the ``k`` nearest training rows (the protocol of DINOv2's k-NN evaluation: each neighbour votes
for its class with weight ``exp(similarity / T)``).

Similarities are computed in blocks (``query rows x training rows``) with torch, on the GPU when
there is one, keeping a running top-``k`` per query: memory is the training matrix plus one
block, so 100k+ training rows never need a ``n_query x n_train`` matrix.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featprobe.policy import resolve_device
from featprobe.probe.torch_heads import _check_int

__all__ = ["KNNHead"]

# Elements of one similarity block (queries x training rows): 32 MiB of float32.
_BLOCK_ELEMENTS = 8 << 20


class KNNHead(ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity, weighted vote ``exp(sim / temperature)``.

    ``k`` is capped by the number of training rows. ``featprobe fit --head knn`` chooses ``k``
    from {10, 20, 100, 200} on an inner split of the training rows (docs/heads.md).
    Fitted attributes: ``classes_``, ``n_features_in_``, ``train_`` (the normalised training
    rows, float32) and ``train_labels_`` (their class indices).
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, device: str = "auto"):
        self.k = k
        self.temperature = temperature
        self.device = device

    def _check_params(self) -> None:
        _check_int(self, "k")
        t = self.temperature
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not 0 < t < float("inf"):
            raise ValueError(f"temperature must be a positive number; got {t!r}")

    def fit(self, X: ArrayLike, y: ArrayLike) -> KNNHead:
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float32, reset=True)
        check_classification_targets(y)
        self.classes_, idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("KNNHead needs at least 2 classes in y; got 1 class")
        self.train_ = F.normalize(torch.as_tensor(X), dim=1).numpy()
        self.train_labels_ = idx.astype(np.int64)
        return self

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class shares of the weighted vote of the ``k`` nearest training rows."""
        check_is_fitted(self, "train_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        device = resolve_device(self.device)
        train = torch.as_tensor(self.train_).to(device)
        labels = torch.as_tensor(self.train_labels_).to(device)
        n_train, n_classes = len(train), len(self.classes_)
        k = min(int(self.k), n_train)
        q_rows = max(1, min(len(X), _BLOCK_ELEMENTS // max(1, n_train)))
        t_rows = max(k, _BLOCK_ELEMENTS // max(1, q_rows))
        out = np.empty((len(X), n_classes), dtype=np.float64)
        for start in range(0, len(X), q_rows):
            q = F.normalize(torch.as_tensor(X[start:start + q_rows]).to(device), dim=1)
            best_sim = torch.full((len(q), 0), -2.0, device=device)
            best_idx = torch.zeros((len(q), 0), dtype=torch.long, device=device)
            for t0 in range(0, n_train, t_rows):  # running top-k over blocks of training rows
                sim = q @ train[t0:t0 + t_rows].T
                sim, idx = torch.cat([best_sim, sim], 1), torch.cat(
                    [best_idx, torch.arange(t0, t0 + sim.shape[1], device=device).expand_as(sim)],
                    1)
                best_sim, pos = sim.topk(min(k, sim.shape[1]), dim=1)
                best_idx = idx.gather(1, pos)
            weights = (best_sim / float(self.temperature)).exp()
            votes = torch.zeros((len(q), n_classes), dtype=weights.dtype, device=device)
            votes.scatter_add_(1, labels[best_idx], weights)
            out[start:start + len(q)] = (votes / votes.sum(1, keepdim=True)).double().cpu().numpy()
        return out

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The class with the largest vote (ties to the first class)."""
        proba = self.predict_proba(X)  # first: it says when the head is not fitted
        return self.classes_[proba.argmax(axis=1)]
