"""The TransformerBridge's fast path: groups start at their entry block.

A HookedTransformer starts a group's folded forward at the block where the group enters
(`start_at_layer`, from the clean residual). A Bridge's forward wraps Hugging Face's, whose decoder
loop runs every layer (TransformerLens 4's own `start_at_layer` still executes blocks 0..k-1 and
discards their output; TransformerLens 3.9 has none). `starting_at` gives the same start: for one
forward, blocks 0..k-1 do not run at all (none of their hooks fire), the first k-1 pass their
input through and block k-1 hands block k the clean residual entering it, so block k's
`hook_resid_pre` and everything after fire exactly as in the full forward. The embedding still
runs (one lookup; its value is discarded). The instance `forward`s are restored on exit, also
after an exception.

Only where Hugging Face's decoder loop takes each layer's output as a bare tensor
(`hidden_states = layer(hidden_states, ...)`, transformers 5): `STARTS`.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from jaxtyping import Float
from torch import Tensor, nn

from tl_depass.engine.backends import Model, is_bridge

#: Architectures whose Hugging Face decoder loop passes a bare hidden-state tensor from layer to
#: layer (checked in transformers 5.24; Bloom's takes `outputs[0]` and is left out).
STARTS = frozenset({
    "GPT2LMHeadModel", "GPTJForCausalLM", "GPTNeoXForCausalLM", "OPTForCausalLM", "PhiForCausalLM",
    "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "MistralForCausalLM",
})


def can_start(model: Model) -> bool:
    """Whether `starting_at` applies: a Bridge of an architecture in `STARTS` with a `blocks`
    stack."""
    return (is_bridge(model) and getattr(model.cfg, "architecture", None) in STARTS
            and isinstance(getattr(model, "blocks", None), nn.ModuleList))


def _skip(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def starting_at(model: Model, layer: int, residual: Float[Tensor, "batch pos d_model"]
                ) -> Iterator[None]:
    """Inside: a forward of `model` (whose batch matches `residual`'s) skips blocks
    0..`layer`-1; block `layer` receives `residual`."""
    if not 0 < layer < len(model.blocks):
        raise ValueError(f"cannot start a forward at block {layer} of {len(model.blocks)}")
    forwards = [_skip] * (layer - 1) + [lambda *args, **kwargs: residual]
    with instance_forwards(list(zip(model.blocks[:layer], forwards, strict=True))):
        yield


@contextmanager
def instance_forwards(forwards: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Inside: each module runs its given forward. Set in the instance's `__dict__` (a Bridge
    component's `__setattr__` would hand `forward` on to the Hugging Face module it wraps) and
    restored on exit, also after an exception."""
    saved = []
    try:
        for module, forward in forwards:
            saved.append((module, module.__dict__.get("forward")))
            module.__dict__["forward"] = forward
        yield
    finally:
        for module, before in reversed(saved):
            if before is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = before
