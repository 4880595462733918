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
        """The clean run at positions `start` onwards (patterns: queries and keys alike), each
        value in its own layout (`by_position`)."""
        if not start:
            return self
        batch, pos = self.logits.shape[:2]

        def cut(name: str, x: Tensor) -> Tensor:
            if name.endswith(("hook_pattern", "hook_attn_scores")):
                return x[..., start:, start:]
            if x.ndim < 2:
                return x
            head = head_major(name, x, batch, pos)
            return by_position(by_position(x, head)[:, start:], head)
        return CleanRun(self.order, {n: cut(n, x) for n, x in self.values.items()},
                        self.logits[:, start:])


#: Query/key norms: a TransformerBridge's values hold the head axis before the position axis
#: ([batch, head, pos, ...], Qwen3; a HookedTransformer's are flattened: `unflatten_rows`).
QK_NORMS = ("attn.q_norm.", "attn.k_norm.", "attn.hook_q_normed", "attn.hook_k_normed")


def head_major(name: str, x: Tensor, batch: int, pos: int, lead: int = 0) -> bool:
    """Whether hook `name`'s value `x` (after `lead` leading axes) is [batch, head, pos, ...]."""
    shape = x.shape[lead:]
    return (any(q in name for q in QK_NORMS) and len(shape) >= 3 and shape[0] == batch
            and shape[2] == pos and shape[1] != pos)


def by_position(x: Tensor, head: bool, lead: int = 0) -> Tensor:
    """[lead..., batch, head, pos, ...] -> [lead..., batch, pos, head, ...] where `head`
    (`head_major`), a view; its own inverse."""
    return x.transpose(lead + 1, lead + 2) if head else x


def unflatten_rows(x: Tensor, batch: int, pos: int) -> Tensor:
    """[batch*pos, d] -> [batch, pos, d] and [batch*pos*head, d] -> [batch, pos, head, d]: some
    blocks flatten the token axes (OPT's MLP in Hugging Face, a HookedTransformer's query/key
    norms); DePass keeps TransformerLens's [batch, pos, ...] everywhere."""
    if x.is_floating_point() and x.ndim == 2 and x.shape[0] % (batch * pos) == 0:
        return x.unflatten(0, (batch, pos) if x.shape[0] == batch * pos else (batch, pos, -1))
    return x


class Recorder:
    """The clean run's recording hooks, for any forward that computes the clean values (the
    clean run itself, or the backward path's frozen forward, `frozen.FreezeOwn`): the order in
    which hook points fire, the first non-finite one, and the values `record` names."""

    def __init__(self, shape: tuple[int, int], record: Callable[[str], bool],
                 check: bool = True) -> None:
        self.shape, self.record, self.check = shape, record, check  # check: each hook's finiteness
        self.order: list[str] = []
        self.values: dict[str, Tensor] = {}
        self.fired: set[str] = set()
        self.finite: list[tuple[str, Tensor]] = []  # per hook call, in order: all values finite?

    def hook(self, name: str) -> Callable:
        def hook(x: Tensor, hook) -> Tensor | None:
            if name not in self.fired:
                self.fired.add(name)
                self.order.append(name)
            if self.check and x.is_floating_point() and not name.endswith(MASKED):
                self.finite.append((name, finite_flag(x)))  # read in finish(), if needed
            if self.record(name):
                self.values[name] = unflatten_rows(x.detach().clone(), *self.shape)
            return clean_hook_value(name, x)
        return hook

    def hooks(self, model: Model) -> list[tuple[str, Callable]]:
        """A recording hook at every hook point of `model`."""
        return [(name, self.hook(name)) for name in dict.fromkeys(canonical_names(model).values())]

    def finish(self, logits: Tensor, attention_mask: Tensor | None) -> CleanRun:
        """The clean run, once the forward has returned `logits`; a `DepassError` naming the
        first non-finite hook if the logits of a real (unpadded) position are not finite."""
        real = logits if attention_mask is None else torch.where(  # padding counts as finite
            attention_mask.bool().to(logits.device)[..., None], logits, 0)
        if not all_finite(real):  # (one host sync; the hooks' flags are read only now)
            first = next((name for name, flag in self.finite if not flag), "the logits")
            raise DepassError(f"the clean run is not finite: NaN or inf first appear at {first}; "
                              + (LEFT_PADDED if left_padded(attention_mask) else
                                 "check the weights there (and norm eps > 0)"))
        return CleanRun(self.order, place_patterns(self.values), logits)


LEFT_PADDED = ("the model's own forward gives them with this left-padded attention_mask (a padded "
               "query that may attend to nothing gets a NaN pattern, which spreads): "
               "pad on the right (tokenizer.padding_side = 'right', TransformerLens's default) or "
               "decompose the rows one at a time")


def left_padded(attention_mask: Tensor | None) -> bool:
    """Whether some row has padding before a real token."""
    if attention_mask is None:
        return False
    real_later = attention_mask.bool().flip(-1).cummax(-1).values.flip(-1)
    return bool((real_later & ~attention_mask.bool()).any())


def record_clean_run(
    model: Model, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None,
    record: Callable[[str], bool],
) -> CleanRun:
    """Run `model` once, unchanged (recording hooks change no value), keeping what `record` names."""
    recorder = Recorder(tuple(tokens.shape), record)
    with torch.no_grad(), forward_as_recorded(model), model.hooks(fwd_hooks=recorder.hooks(model)):
        logits = model(tokens, attention_mask=attention_mask)
    return recorder.finish(logits, attention_mask)


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
