"""The one registry of heads: each entry names a scikit-learn estimator and states what it
supports (:class:`HeadSpec`), so that no code outside this module branches on head names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from featprobe.errors import FeatprobeError
from featprobe.plain import is_plain, to_plain
from featprobe.probe.knn import KNNHead
from featprobe.probe.torch_heads import LinearHead, MLPHead

__all__ = ["HEADS", "HeadSpec", "default_random_state", "head_name", "head_params",
           "is_l2_normalized", "list_heads", "L2Normalizer", "make_head", "spec_of",
           "split_pipeline", "with_preprocessing"]


@dataclass(frozen=True)
class HeadSpec:
    """One registered head: its name, estimator class, one line of description, the
    parameters featprobe sets on top of the class's defaults, and what it supports."""

    name: str
    factory: Callable[..., Any]
    description: str
    defaults: dict = field(default_factory=dict)
    grid: dict[str, tuple] | None = None  # --sweep: the product of these values, in key order
    always_selects: bool = False  # chooses from its grid on every fit, --sweep or not
    out_of_core: str | None = None  # "torch" | "sgd:<loss>" | None (features must fit memory)
    standardize: bool = True  # may be put behind a StandardScaler
    # a 1-D grid ordered weakest model first: stop after this many points in a row score below
    # the best so far (see sweeps.sweep_head); None fits every point
    grid_patience: int | None = None

    def params(self) -> dict:
        """All parameters of the head as ``make_head(name)`` builds it."""
        return plain_params(self.factory(**self.defaults))

    @property
    def sgd_loss(self) -> str | None:
        """The ``SGDClassifier`` loss that stands in for this head out of core, if any."""
        kind = self.out_of_core or ""
        return kind.split(":", 1)[1] if kind.startswith("sgd:") else None


# C for logreg/svm --sweep: one value a decade, 1e-4 ... 1e2 (DINOv2 sweeps 45 values over a
# wider range; a decade apart is enough to find the regime at 7 fits), walked from the
# strongest regularisation up until 2 points in a row score below the best so far.
C_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
C_PATIENCE = 2

HEADS: dict[str, HeadSpec] = {
    spec.name: spec for spec in (
        HeadSpec("linear", LinearHead, "torch linear layer, AdamW + cross-entropy; GPU if present",
                 grid={"lr": (1e-4, 3e-4, 1e-3, 3e-3), "weight_decay": (0, 1e-4, 1e-2)},
                 out_of_core="torch"),
        HeadSpec("mlp", MLPHead, "torch MLP (VGG classifier style): Linear-ReLU-Dropout-Linear",
                 out_of_core="torch"),
        HeadSpec("logreg", LogisticRegression, "scikit-learn logistic regression (lbfgs)",
                 {"max_iter": 1000}, grid={"C": C_GRID}, grid_patience=C_PATIENCE,
                 out_of_core="sgd:log_loss"),
        HeadSpec("svm", LinearSVC, "scikit-learn linear SVM (LinearSVC); no predict_proba",
                 {"random_state": 0}, grid={"C": C_GRID}, grid_patience=C_PATIENCE,
                 out_of_core="sgd:hinge"),
        HeadSpec("svm-rbf", SVC, "scikit-learn RBF-kernel SVM (SVC), Platt-scaled probabilities",
                 {"probability": True, "random_state": 0}),
        HeadSpec("knn", KNNHead, "k nearest neighbours, cosine similarity, weighted vote (T=0.07);"
                 " k chosen on an inner split", grid={"k": (10, 20, 100, 200)},
                 always_selects=True),
    )
}


def list_heads() -> list[str]:
    """Names of the registered heads, in registry order."""
    return list(HEADS)


def spec_of(name: str) -> HeadSpec:
    spec = HEADS.get(name)
    if spec is None:
        raise FeatprobeError(f"unknown head {name!r}; known heads: {', '.join(HEADS)}")
    return spec


def make_head(name: str, standardize: bool = False, l2_normalize: bool = False,
              **params: Any) -> BaseEstimator:
    """An unfitted head by registry name, ``params`` overriding the registry defaults;
    ``l2_normalize`` scales each row to unit length and ``standardize`` puts a
    ``StandardScaler`` after it (a pipeline, so the scaler is fit on the training rows only).
    Raises FeatprobeError for an unknown name, parameter or value."""
    spec = spec_of(name)
    valid = spec.factory().get_params(deep=False)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise FeatprobeError(f"unknown parameter {unknown[0]!r} for head {name!r}; valid: "
                             f"{', '.join(sorted(valid))}")
    if standardize and not spec.standardize:
        raise FeatprobeError(f"head {name!r} does not take --standardize")
    head = spec.factory(**{**spec.defaults, **params})
    check = getattr(head, "_check_params", None) or getattr(head, "_validate_params", None)
    try:
        if check is not None:
            check()
    except (ValueError, TypeError) as e:
        raise FeatprobeError(f"head {name!r}: {str(e).splitlines()[0]}") from e
    return with_preprocessing(head, standardize, l2_normalize)


class L2Normalizer(Normalizer):
    """scikit-learn's ``Normalizer(norm="l2")`` on float32 rows: cached float16 features would
    be normalised in float16, whose sum of squares overflows above 65504."""

    def transform(self, X, copy=None):
        return super().transform(np.asarray(X, dtype=np.float32), copy=False)


def with_preprocessing(head: BaseEstimator, standardize: bool, l2_normalize: bool):
    """``head`` behind ``L2Normalizer`` and/or ``StandardScaler``, in that order."""
    steps = [L2Normalizer()] * l2_normalize + [StandardScaler()] * standardize
    return make_pipeline(*steps, head) if steps else head


def split_pipeline(estimator) -> tuple[BaseEstimator, bool]:
    """The head inside ``estimator`` and whether a StandardScaler precedes it."""
    if isinstance(estimator, Pipeline):
        steps = [s for _, s in estimator.steps]
        return steps[-1], any(isinstance(s, StandardScaler) for s in steps[:-1])
    return estimator, False


def default_random_state(estimator, seed: int, params: dict) -> None:
    """Give the head the run's ``seed`` as its ``random_state`` (if it has one and ``params``,
    the parameters asked for, do not set it): the policy of ``fit`` and ``curve``."""
    head, _ = split_pipeline(estimator)
    if "random_state" in head.get_params() and "random_state" not in params:
        head.set_params(random_state=seed)


def is_l2_normalized(estimator) -> bool:
    """Whether a ``Normalizer`` precedes the head."""
    return isinstance(estimator, Pipeline) and any(
        isinstance(s, Normalizer) for _, s in estimator.steps[:-1])


def head_name(estimator: BaseEstimator) -> str:
    """The registry name of a head (or of the head at the end of a pipeline); an out-of-core
    ``SGDClassifier`` answers to the head it stood in for."""
    head, _ = split_pipeline(estimator)
    for spec in HEADS.values():
        if type(head) is spec.factory or (type(head) is SGDClassifier
                                          and spec.sgd_loss == head.loss):
            return spec.name
    raise FeatprobeError(f"{type(head).__name__} is not a registered head")


def plain_params(estimator) -> dict:
    """The estimator's parameters that are plain JSON (what a record can hold and rebuild)."""
    out = {}
    for k, v in estimator.get_params(deep=False).items():
        try:
            v = to_plain(v)
        except TypeError:
            continue
        if is_plain(v):
            out[k] = v
    return out


def head_params(estimator: BaseEstimator) -> dict:
    """All JSON-representable parameters of a head, for run records, with ``standardize``, so
    that ``make_head(head_name(est), **head_params(est))`` rebuilds an unfitted copy."""
    head, standardize = split_pipeline(estimator)
    out = {"standardize": standardize, **plain_params(head)}
    if is_l2_normalized(estimator):
        out["l2_normalize"] = True
    return out
