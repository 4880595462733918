"""Module paths that moved when the package was layered (0.2): the old path still imports the
module at its new place, with a DeprecationWarning that names it. One table, no copies."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "tl_depass.backends": "tl_depass.engine.backends",
    "tl_depass.clean_run": "tl_depass.engine.clean_run",
    "tl_depass.files": "tl_depass.engine.files",
    "tl_depass.frozen": "tl_depass.engine.frozen",
    "tl_depass.guard": "tl_depass.engine.guard",
    "tl_depass.replay": "tl_depass.engine.replay",
    "tl_depass.rules": "tl_depass.engine.rules",
    "tl_depass.support": "tl_depass.engine.support",
    "tl_depass.validate": "tl_depass.engine.validate",
    "tl_depass.components": "tl_depass.levels.components",
    "tl_depass.params": "tl_depass.levels.params",
    "tl_depass.compare": "tl_depass.evaluate.compare",
    "tl_depass.baselines": "tl_depass.evaluate.baselines",
    "tl_depass.evaluate.report": "tl_depass.evaluate.summary",
    "tl_depass.report": "tl_depass.app.explain",
    "tl_depass.cli": "tl_depass.app.cli",
    "tl_depass.viz": "tl_depass.app.viz",
    "tl_depass.tasks": "tl_depass.models.tasks",
    "tl_depass.apd.transformer": "tl_depass.apd.lm.transformer",
    "tl_depass.apd.transformer_train": "tl_depass.apd.lm.train",
    "tl_depass.apd.presets": "tl_depass.apd.experiments.presets",
    "tl_depass.apd.plots": "tl_depass.apd.experiments.plots",
    "tl_depass.apd.report": "tl_depass.apd.experiments.summary",
}
# Names that stay public at their old path (documented in the README): no warning.
PUBLIC = {"tl_depass.compare", "tl_depass.tasks", "tl_depass.baselines", "tl_depass.viz"}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands back the module already imported at its new path."""

    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        if spec.name not in PUBLIC:
            warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; import it from there",
                          DeprecationWarning, stacklevel=3)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        sys.modules[module.__spec__.name if module.__spec__ else module.__name__] = module


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
