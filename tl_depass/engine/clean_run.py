"""The clean run: one ordinary forward whose hooks record the quantities DePass freezes."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.backends import Model, canonical_names, clean_hook_value, forward_as_recorded
from tl_depass.engine.validate import all_finite, finite_flag
from tl_depass.errors import DepassError

#: Hook-name endings whose values hold -inf by design (causal masks), not a broken model.
MASKED = ("hook_attn_scores",)
#: Hook-name endings whose clean values the decomposed pass replays.
FROZEN = ("hook_scale", "hook_pattern", "attn.hook_z", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_mid",
          "mlp.hook_post", "hook_embed", "hook_pos_embed", "unembed.hook_out")


@dataclass
class CleanRun:
    order: list[str]  # every hook point that fired, in the order it first fired
    values: dict[str, Tensor]  # recorded activations, keyed by the name we registered
    logits: Float[Tensor, "batch pos d_vocab"]  # the model's own output (after any softcap)

    def __getitem__(self, name: str) -> Tensor:
        return self.values[name]

    def after(self, name: str) -> list[str]:
        """Hook points that fire after `name` first fires (the part of the model DePass replays)."""
        return self.order[self.order.index(name) + 1:]

    def window(self, start: int) -> "CleanRun":
        """The clean run at positions `start` onwards (patterns: queries and keys alike), views
        only; HookedTransformer's [batch, pos, ...] layout."""
        if not start:
            return self

        def cut(name: str, x: Tensor) -> Tensor:
            if name.endswith(("hook_pattern", "hook_attn_scores")):
                return x[..., start:, start:]
            return x[:, start:] if x.ndim >= 2 else x
        return CleanRun(self.order, {n: cut(n, x) for n, x in self.values.items()},
                        self.logits[:, start:])


def unflatten_rows(x: Tensor, batch: int, pos: int) -> Tensor:
    """[batch*pos, d] -> [batch, pos, d]: some Hugging Face blocks (OPT's MLP) flatten the token
    axes; DePass keeps TransformerLens's [batch, pos, ...] everywhere."""
    if x.is_floating_point() and x.ndim == 2 and x.shape[0] == batch * pos:
        return x.unflatten(0, (batch, pos))
    return x


def record_clean_run(
    model: Model, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None,
    record: Callable[[str], bool],
) -> CleanRun:
    """Run `model` once, unchanged (recording hooks change no value), keeping what `record` names."""
    order: list[str] = []
    seen: set[str] = set()
    values: dict[str, Tensor] = {}
    finite: list[tuple[str, Tensor]] = []  # per hook call, in forward order: all values finite?

    def recorder(name: str):
        def hook(x: Tensor, hook) -> Tensor | None:
            if name not in seen:
                seen.add(name)
                order.append(name)
            if x.is_floating_point() and not name.endswith(MASKED):
                finite.append((name, finite_flag(x)))  # read only if the logits are not finite
            if record(name):
                values[name] = unflatten_rows(x.detach().clone(), *tokens.shape)
            return clean_hook_value(name, x)
        return hook

    hooks = [(name, recorder(name)) for name in dict.fromkeys(canonical_names(model).values())]
    with torch.no_grad(), forward_as_recorded(model), model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=attention_mask)
    real = logits if attention_mask is None else torch.where(  # padding counts as finite
        attention_mask.bool().to(logits.device)[..., None], logits, 0)
    if not all_finite(real):
        bad = [name for name, flag in finite if not flag]
        raise DepassError(f"the clean run is not finite: NaN or inf first appear at "
                          f"{bad[0] if bad else 'the logits'}; check the weights there (and norm eps > 0)")
    return CleanRun(order, place_patterns(values), logits)


def place_patterns(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each attention pattern on the device where its layer's z is computed. A HookedTransformer
    over several devices (n_devices) with a padding mask fires hook_pattern on the mask's device
    (the first) and only then moves the pattern to V's; the replay needs it with V. No copy where
    it is there already."""
    for name, value in values.items():
        z = values.get(name.removesuffix("hook_pattern") + "hook_z")
        if name.endswith("attn.hook_pattern") and z is not None:
            values[name] = value.to(z.device)
    return values
