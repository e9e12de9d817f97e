"""featprobe: extract frozen-backbone features once, fit and compare heads many times.

>>> import featprobe as fp
>>> cache = fp.extract("data/train.csv", backbone="vgg16", layers=["pool5", "fc7"])
>>> run = fp.fit(cache, head="logreg", layer="fc7")
>>> fp.compare(cache.directory)

Attributes are imported lazily so that ``import featprobe`` (and an identical rerun of
``featprobe extract``) does not pay for importing torch.
"""

from importlib import import_module

from featprobe.errors import FeatprobeError

__version__ = "0.1.0"

_LAZY = {
    "extract": ("featprobe.extraction.run", "extract"),
    "FeatureCache": ("featprobe.cache", "FeatureCache"),
    "load_dataset": ("featprobe.data", "load_dataset"),
    "split": ("featprobe.splits", "split"),
    "fit": ("featprobe.probe.fit", "fit"),
    "baseline": ("featprobe.cnn_baseline", "baseline"),
    "compare": ("featprobe.runs.compare", "compare"),
    "predict": ("featprobe.prediction", "predict"),
    "report": ("featprobe.reporting.build", "report"),
    "heads": ("featprobe.heads", None),
}

__all__ = ["FeatprobeError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'featprobe' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = import_module(module)
    return value if attr is None else getattr(value, attr)
