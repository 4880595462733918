"""The package's layers (docs/architecture.md): a module imports from its own layer and the layers
below it, never from above. Read from the source (every import, also inside functions)."""

import ast
from pathlib import Path

import tl_depass

PACKAGE = Path(tl_depass.__file__).parent

# Lower number = lower layer. Keys are the first part of the module path below tl_depass.
LAYERS = {
    "errors": 0, "tolerances": 0, "optional": 0, "commands": 0, "moved": 0,
    "engine": 1,
    "levels": 2,
    "arguments": 3, "footprint": 3, "backward": 3, "memory": 3, "decompose": 3, "decomposition": 3,
    "readouts": 3, "attribute": 3, "saving": 3,
    "models": 4, "evaluate": 4, "dataset": 4, "apd": 4,
    "app": 5,
}
# Imports that go up on purpose, each inside the one function that needs it.
ALLOWED = {
    # dec.show(): a result draws itself in Jupyter with the plots of app/ (imported when called)
    ("tl_depass.decomposition", "tl_depass.app.viz"),
    # the deprecated names pretrained_name & co., which moved to models/ (imported when asked for)
    ("tl_depass.engine.backends", "tl_depass.models"),
}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 3  # the package itself: the public API


def defined_in(name: str) -> str:
    """The module `from tl_depass import name` takes `name` from."""
    obj = getattr(tl_depass, name, None)
    if obj is None or isinstance(obj, str):  # __version__ and the like: the package itself
        return "tl_depass"
    return getattr(obj, "__name__", "") if hasattr(obj, "__path__") or hasattr(obj, "__file__") \
        else obj.__module__


def imports() -> list[tuple[str, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # a command: the top of its own folder
        module = ".".join(("tl_depass", *parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tl_depass"):
                if node.module == "tl_depass":
                    out += [(module, defined_in(a.name)) for a in node.names]
                else:
                    out.append((module, node.module))
            elif isinstance(node, ast.Import):
                out += [(module, a.name) for a in node.names if a.name.startswith("tl_depass")]
    return out


def test_every_module_has_a_layer():
    unknown = {m.split(".")[1] for m, _ in imports() if "." in m} - set(LAYERS)
    assert not unknown, f"modules with no layer in LAYERS (docs/architecture.md): {sorted(unknown)}"


def test_no_module_imports_from_a_layer_above_it():
    upward = sorted({(m, n) for m, n in imports()
                     if m != "tl_depass" and layer(n) > layer(m) and (m, n) not in ALLOWED})
    assert not upward, "imports from a layer above (move the code down, or the import up):\n" + \
        "\n".join(f"  {m} (layer {layer(m)}) imports {n} (layer {layer(n)})" for m, n in upward)
