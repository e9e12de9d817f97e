"""The expensive stage: images → a frozen backbone, once → the HDF5 cache.

:mod:`~featprobe.extraction.run` (``extract``: the request key, reuse, resume, the run),
:mod:`~featprobe.extraction.settings` (what was asked, what it resolved to),
:mod:`~featprobe.extraction.backbones` (the one registry of backbones and their layers),
:mod:`~featprobe.extraction.weights` (weights and checkpoints), :mod:`~featprobe.extraction.images`
(decoding files), :mod:`~featprobe.extraction.pixels` (the one image → tensor path),
:mod:`~featprobe.extraction.gpu_decode` (JPEGs decoded on the device),
:mod:`~featprobe.extraction.stream` (the streaming loop) and
:mod:`~featprobe.extraction.sharding` (torchrun ranks and ``--shard`` jobs).
"""

from featprobe.extraction.run import extract

__all__ = ["extract"]
