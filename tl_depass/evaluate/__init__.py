"""The paper's faithfulness protocols, with DePass as one method among the baselines.

- `tl_depass.evaluate.tokens`: Disrupt-top / Recover-top by deleting tokens, AOPC, hit rate.
- `tl_depass.evaluate.components`: zero-ablate the top-k / bottom-k heads or neurons; correlation
  of each method's scores with exact activation patching.
- `tl_depass.evaluate.run.evaluate(model, batch, name)`: everything on one model and task batch.
- `tl_depass.evaluate.completions.make(model, n)`: the natural-text protocol's batch, real code
  completions from `pystdlib`'s held-out files (no key positions: hit rate not defined).
- `tl_depass.evaluate.patch`: the one patcher (zero or another run's value at any hook, one
  forward or k units folded into the batch, the frozen model's hooks added); `compare` keeps
  `transformer_lens.patching` where it does the job.
- `tl_depass.evaluate.metrics`: the logit difference and the correlations (Pearson, Spearman).
- `python -m tl_depass.evaluate --all`: every protocol on the bundled models, written to
  docs/results.md.
"""

from tl_depass.evaluate import components, tokens
from tl_depass.evaluate.run import Result, evaluate

__all__ = ["Result", "components", "evaluate", "tokens"]
