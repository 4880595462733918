"""Groups entering at the output of MLP L (`Plan.through`: `Neurons(L)`, `MLPByPosition(L)`).

Their components are exactly zero until that MLP's output, so block L runs for the rest, probe and
bias alone (`Plan.block`), and the components' share of the MLP output comes straight from their
rows at the activation, as the folded forward would compute it.
"""

import torch
from jaxtyping import Int
from torch import Tensor

from tl_depass.engine import bridge_mlp, fast, replay
from tl_depass.engine.backends import is_bridge
from tl_depass.engine.hooks import block_hook
from tl_depass.engine.plan import before_mlp
from tl_depass.engine.slots import correct, fold

__all__ = ["after_mlp", "slots_of"]


def slots_of(rows: Tensor, bias: Tensor | None) -> Tensor:
    """One group's slots from its components' `rows`: a zero probe, the bias (None: zero)."""
    ends = rows.new_zeros((2, *rows.shape[1:]))
    if bias is not None:
        ends[1] = bias
    return torch.cat([rows, ends])


def after_mlp(ff: "replay.FoldedForward", tokens: Int[Tensor, "batch pos"], mask: Tensor | None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Each slot's resid_post at L (folded) and the kept values of block L, for the folded forward
    `ff` whose plan enters through MLP L."""
    p, w, n = ff.plan, ff.window, len(ff.groups)
    head = type(ff)(ff.model, ff.clean, p.block, ff.setup, 0, 1, {}).run(
        tokens, mask, stop=p.through.layer + 1)  # [group, rest/probe/bias, batch, ...]

    def widen(x: Tensor) -> Tensor:  # this chunk's slots: its components zero but the rest
        out = x.new_zeros((n, ff.width, *x.shape[2:]))
        out[:, -2:] = x[:, 1:]
        if ff.offset == 0:
            out[:, 0] = x[:, 0]
        return out
    kept = {name: widen(value) for name, value in head.items()}
    module = ff.model.get_submodule(p.through.prefix)
    mlp_output = bridge_mlp.mlp_output if is_bridge(ff.model) else fast.mlp_output
    entries = [next(e for e in g.entries if not e.rest) for g in ff.groups]
    bias = [None if e.bias is None else e.bias[:, w:] for e in entries]
    if p.through.act_hook in p.keep or any(e.written is None for e in entries):
        post = torch.stack([slots_of(e.rows(ff.offset, ff.k)[:, :, w:], b)
                            for e, b in zip(entries, bias, strict=True)])
        out = correct(ff.view(mlp_output(module, fold(post))))  # as the folded forward
        kept[p.through.act_hook] = post
    else:  # the rows only feed W_out: a_i W_out[i] (without b_out added and taken off)
        out = torch.stack([slots_of(
            e.written(ff.offset, ff.k, module.W_out)[:, :, w:],
            None if b is None else mlp_output(module, b)) for e, b in zip(entries, bias, strict=True)])
    layer = p.through.layer
    parts = [kept[name] for name in before_mlp(ff.clean, layer)]  # in TL's order (HF's may round apart)
    resid = (parts[0] if len(parts) == 1 else parts[0] + parts[1]) + out
    kept |= {block_hook(layer, "hook_mlp_out"): out, block_hook(layer, "hook_resid_post"): resid,
             f"{p.through.prefix}.out.hook_out": out}  # a Bridge's out projection
    return fold(resid), {name: value for name, value in kept.items() if name in p.keep}
