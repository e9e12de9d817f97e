"""What an extraction is asked for, and what it resolved to: two frozen objects passed down the
stage. Torch-free, so an identical rerun can be answered from :class:`ExtractSettings` alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from featprobe.cache.writer import PartialCache
    from featprobe.data import Dataset
    from featprobe.extraction.backbones import FeatureModel
    from featprobe.extraction.sharding import Shard


@dataclass(frozen=True)
class ExtractSettings:
    """The options of ``featprobe extract`` / ``fp.extract`` as given (``None``: the default
    the run works out, see :mod:`featprobe.policy`)."""

    backbone: str = "vgg16"
    weights: Any = "DEFAULT"
    layers: tuple[str, ...] | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    on_error: str = "fail"
    dtype: str = "auto"
    precision: str = "auto"
    image_size: int | None = None
    decode: str = "auto"
    progress: bool = True
    crop: str = "center"
    preprocess_like: str | None = None


@dataclass(frozen=True, eq=False)
class ExtractJob:
    """One extraction, resolved: the dataset, the model, where it runs and where it writes."""

    ds: Dataset
    model: FeatureModel
    device: Any  # torch.device
    precision: str
    dtype: str
    on_error: str
    decode: str
    workers: int | None
    batch_size: int | None
    progress: bool
    shard: Shard
    partial: PartialCache
    config: dict  # what the content-addressed key hashes
    key: str
