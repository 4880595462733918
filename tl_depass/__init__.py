"""tl_depass: decomposed forward pass (DePass) for TransformerLens models.

    import tl_depass
    dec = tl_depass.decompose(model, tokens)          # token level
    dec.logit_attribution(answer, wrong)              # [component, batch]
    tl_depass.attribute(model, tokens, tl_depass.Heads(), answer=a, wrong=w, mlp_rule="ratio")
"""

import importlib

from tl_depass import models, moved
from tl_depass.attribute import Attribution, attribute
from tl_depass.dataset import run_dataset
from tl_depass.decompose import decompose
from tl_depass.decomposition import Decomposition
from tl_depass.errors import DepassError, UnsupportedModelError
from tl_depass.evaluate import baselines, compare
from tl_depass.levels import (
    Heads,
    Label,
    Level,
    Modules,
    Neurons,
    ParamComponents,
    SAEFeatures,
    Split,
    Subspace,
    TokensAt,
)
from tl_depass.memory import MemoryEstimate, estimate_memory
from tl_depass.models import tasks
from tl_depass.saving import load_results
from tl_depass.tolerances import COMPLETENESS_RTOL, completeness_rtol

moved.install()


def __getattr__(name: str):
    """`tl_depass.viz` imports plotly (the [viz] extra): only when first used."""
    if name == "viz":
        return importlib.import_module("tl_depass.app.viz")
    raise AttributeError(f"module 'tl_depass' has no attribute {name!r}")

__version__ = "0.2.0"

__all__ = [
    "COMPLETENESS_RTOL",
    "Attribution",
    "Decomposition",
    "DepassError",
    "Heads",
    "Label",
    "Level",
    "MemoryEstimate",
    "Modules",
    "Neurons",
    "ParamComponents",
    "SAEFeatures",
    "Split",
    "Subspace",
    "TokensAt",
    "UnsupportedModelError",
    "attribute",
    "baselines",
    "compare",
    "completeness_rtol",
    "decompose",
    "estimate_memory",
    "load_results",
    "models",
    "run_dataset",
    "tasks",
    "viz",
]
