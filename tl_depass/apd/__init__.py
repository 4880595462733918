"""Parameter decomposition: APD (Braun et al. 2025) and SPD (Bushnaq et al. 2025) of the papers'
toy models, and SPD of TransformerLens models (`lm.transformer`, `lm.train`), whose
subcomponents `tl_depass.ParamComponents` turns into DePass components.

Targets (`TMS`, `ResidualMLP`) are trained from scratch; `APD` and `SPD` decompose their
weights; `train` runs any of them with resumable checkpoints; `metrics` scores the result
against the known ground truth. One command per paper experiment:

    python -m tl_depass.apd.reproduce tms-5-2 --method spd

In APD/SPD code `C` counts (sub)components and `m` is the rank of an APD component, as in the
papers; neither is the DePass `component` axis.
"""

from tl_depass.apd.apd import APD, batch_topk
from tl_depass.apd.configs import (
    APDConfig,
    ConfigError,
    ExperimentConfig,
    OptimConfig,
    ResidualMLPConfig,
    SPDConfig,
    TMSConfig,
)
from tl_depass.apd.experiments.presets import PRESETS, preset, shortened
from tl_depass.apd.lm.train import TransformerSPDConfig, evaluate, masked_logits, train_spd
from tl_depass.apd.lm.transformer import ParamDecomposition, ParamSite, SiteSpec, find_sites
from tl_depass.apd.spd import SPD
from tl_depass.apd.targets import TMS, ResidualMLP, Site, ToyTarget, make_target, sparse_features
from tl_depass.apd.train import TargetObjective, train

__all__ = [
    "APD",
    "SPD",
    "TMS",
    "ResidualMLP",
    "ToyTarget",
    "Site",
    "make_target",
    "sparse_features",
    "batch_topk",
    "train",
    "TargetObjective",
    "APDConfig",
    "SPDConfig",
    "TMSConfig",
    "ResidualMLPConfig",
    "OptimConfig",
    "ExperimentConfig",
    "ConfigError",
    "PRESETS",
    "preset",
    "shortened",
    "ParamDecomposition",
    "ParamSite",
    "SiteSpec",
    "find_sites",
    "TransformerSPDConfig",
    "train_spd",
    "evaluate",
    "masked_logits",
]
