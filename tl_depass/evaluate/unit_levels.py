"""The unit levels of the component protocols and baselines: every head (`Heads()`, scores
`[layer head_index]`) or every neuron of one layer (`Neurons(layer)`, scores `[d_mlp]`), and the
hook each one reads. The old `(level: str, layer)` pairs still work, with a DeprecationWarning."""

import warnings

from tl_depass.engine.backends import Model
from tl_depass.engine.hooks import attn_z, block_hook
from tl_depass.engine.validate import check_layers
from tl_depass.errors import DepassError
from tl_depass.levels import Heads, Neurons

UnitLevel = Heads | Neurons


def as_level(level: "str | UnitLevel", layer: int | None = None, stacklevel: int = 3) -> UnitLevel:
    """`level` as a level object; "heads" and ("neurons", layer) are read with a warning."""
    if isinstance(level, Heads | Neurons):
        if layer is not None:
            raise DepassError(f"got a level object and layer={layer}: the layer goes in the level, "
                              "as Neurons(layer) or Heads(layers=[...])")
        if isinstance(level, Neurons) and level.neurons is not None:
            raise DepassError("the protocols score every neuron of a layer: pass Neurons(layer) "
                              "without neuron ids")
        return level
    if level == "heads" or (level == "neurons" and layer is not None):
        new = "Heads()" if level == "heads" else f"Neurons({layer})"
        warnings.warn(f"level={level!r} with layer= is deprecated: pass the level object {new}",
                      DeprecationWarning, stacklevel=stacklevel)
        return Heads() if level == "heads" else Neurons(layer)
    raise DepassError(f"level must be 'heads' or 'neurons' (with a layer), got {level!r}, {layer}: "
                      "pass tl_depass.Heads() or tl_depass.Neurons(layer)")


def unit_hooks(model: Model, level: UnitLevel) -> list[str]:
    """The hooks a level's units live at: each chosen layer's `attn.hook_z`, or the layer's
    `mlp.hook_post`."""
    if isinstance(level, Heads):
        return [attn_z(layer) for layer in check_layers(model, level.layers, "Heads")]
    level.check(model)
    return [block_hook(level.layer, "mlp.hook_post")]


def unit_layers(n_rows: int, level: Heads) -> list[int]:
    """The layer of each row of a `[layer head_index]` array over `level`'s layers."""
    return list(range(n_rows)) if level.layers is None else list(level.layers)
