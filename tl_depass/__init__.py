"""tl_depass: decomposed forward pass (DePass) for TransformerLens models.

    import tl_depass
    dec = tl_depass.decompose(model, tokens)          # token level
    dec.logit_attribution(answer, wrong)              # [component, batch]
"""

from tl_depass import compare
from tl_depass.components import Split, TokensAt
from tl_depass.decompose import decompose
from tl_depass.decomposition import Decomposition
from tl_depass.errors import DepassError, UnsupportedModelError
from tl_depass.levels import Heads, Modules, Neurons, SAEFeatures, Subspace
from tl_depass.tolerances import COMPLETENESS_RTOL, completeness_rtol

__version__ = "0.1.0"

__all__ = [
    "COMPLETENESS_RTOL",
    "Decomposition",
    "DepassError",
    "Heads",
    "Modules",
    "Neurons",
    "SAEFeatures",
    "Split",
    "Subspace",
    "TokensAt",
    "UnsupportedModelError",
    "compare",
    "completeness_rtol",
    "decompose",
]
