"""Attribution over a dataset: `run_dataset` (batched, resumable shards, torchrun ranks) and
readouts of its table (`aggregate`)."""

from tl_depass.dataset.aggregate import deletion_curves, summary, top_components
from tl_depass.dataset.runner import run_dataset

__all__ = ["deletion_curves", "run_dataset", "summary", "top_components"]
