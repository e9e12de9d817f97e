"""The HDF5 feature cache that joins the two stages: written once by extraction, read by every
fit. :mod:`~featprobe.cache.format` (constants, attributes, digests), :mod:`~featprobe.cache.reader`
(:class:`FeatureCache`), :mod:`~featprobe.cache.writer` (crash-safe parts and consolidation),
:mod:`~featprobe.cache.integrity` (merge, verify, list). Needs h5py and numpy, never torch.
"""

from featprobe.cache.format import FORMAT_VERSION, default_cache_dir
from featprobe.cache.integrity import list_caches, merge, verify
from featprobe.cache.reader import FeatureCache, iter_rows, read_rows
from featprobe.cache.writer import H5Builder, PartialCache, write_arrays

__all__ = ["FORMAT_VERSION", "FeatureCache", "H5Builder", "PartialCache", "default_cache_dir",
           "iter_rows", "list_caches", "merge", "read_rows", "verify", "write_arrays"]
