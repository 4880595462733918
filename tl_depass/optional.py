"""Optional dependencies: pictures and reports (`[viz]`: plotly, CircuitsVis, matplotlib) and the
baselines' reference implementations (`[eval]`: Captum). The core (decompose, attribute,
compare, the bundled models) needs none of them; a missing one is a DepassError naming the extra."""

import importlib
from types import ModuleType

from tl_depass.errors import DepassError

#: top-level package -> the extra of tl_depass that installs it
EXTRAS = {"plotly": "viz", "circuitsvis": "viz", "matplotlib": "viz", "captum": "eval"}


def need(module: str, what: str) -> ModuleType:
    """Import `module` (e.g. "plotly.graph_objects") for `what`, or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise DepassError(
            f"{what} needs {top}, which is not installed: pip install 'tl_depass[{EXTRAS[top]}]' "
            "(or 'tl_depass[all]')") from None
