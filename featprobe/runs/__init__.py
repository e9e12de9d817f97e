"""What the fit stage leaves behind: run records in ``runs.jsonl``
(:mod:`~featprobe.runs.records`) and the comparison table built from them
(:mod:`~featprobe.runs.compare`).
"""

from featprobe.runs.records import (
    RECORD_FIELDS,
    RUNS_FILE,
    append_run,
    compute_metrics,
    majority_rate,
    make_record,
    read_runs,
)

__all__ = ["RECORD_FIELDS", "RUNS_FILE", "append_run", "compute_metrics", "majority_rate",
           "make_record", "read_runs"]
