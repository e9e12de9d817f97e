"""``featprobe report``: one self-contained HTML page of a cache directory's runs: the comparison
table, the accuracy chart, few-shot curves, the best head's per-class figures and misclassified
images, and what was compared (docs/report.md)."""

from featprobe.reporting.build import report

__all__ = ["report"]
