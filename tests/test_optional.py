"""Plot, report and baseline dependencies are extras: the core imports none of them, and a
missing one is a DepassError that names the extra to install."""

import subprocess
import sys

import pytest

from tl_depass.errors import DepassError
from tl_depass.optional import EXTRAS, need


def test_import_loads_no_optional_dependency():
    code = ("import sys, tl_depass; tl_depass.decompose; "
            f"print(sorted(m for m in {sorted(EXTRAS)!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("module, extra", [("plotly.graph_objects", "viz"), ("circuitsvis.tokens", "viz"),
                                           ("matplotlib.pyplot", "viz"), ("captum.attr", "eval")])
def test_a_missing_extra_is_named(module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(DepassError, match=rf"pip install 'tl_depass\[{extra}\]'"):
        need(module, "this picture")


def test_import_adds_no_transformer_lens_module_it_does_not_need():
    """`import tl_depass` costs little beyond `import transformer_lens` (issue 14: at most 0.3 s):
    it imports no part of TransformerLens that `import transformer_lens` did not (TL 4 imports the
    Bridge lazily; the `Model` type checks against it only when a model is checked)."""
    code = ("import sys, transformer_lens; before = {m for m in sys.modules if m.startswith("
            "'transformer_lens')}; import tl_depass; tl_depass.decompose; print(sorted("
            "m for m in sys.modules if m.startswith('transformer_lens.model_bridge') and m not in before))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
