"""Replay paths that skip what the decomposed pass freezes (HookedTransformer only).

In a folded forward the attention pattern, the norm scales and the MLP activations are replayed
from the clean run, so the model's own Q, K, scores, softmax, norm statistics and activation
function are computed and thrown away. For the duration of one folded forward, `skipping_frozen`
gives the attention, MLP and norm modules a forward that computes only what the pass keeps:

- attention: V (hook_v fires), z = the clean pattern @ V (hook_z fires with it), W_O;
- MLP: W_in (hook_pre fires), the activation hook fires with the pre-activation as a placeholder
  (the pass overrides it: the activation function is never evaluated), W_out; a gated MLP skips
  the activation and the up projection (the rules use the clean up projection);
- LayerNorm / RMSNorm (and their folded Pre forms): hook_scale fires with a placeholder (the
  pass replays the clean scale).

Every bias of a fast forward (b_V, b_O, b_in, b_out, the norm's b) is added to the bias slot only
(`FoldedForward.add_bias`), so the probe stays exactly zero and no correction follows these
modules (engine/replay.py): the components' shares never carry a bias added and taken off again.
The results equal the full replay's to rounding (tests/engine/test_fast.py). A module keeps
its own forward when anything it would skip is hooked (a user's hook, a kept value) or when
its configuration computes V differently (split or 4-bit inputs, clipped QKV, attention result per
head, SoLU's layer-norm activation). A TransformerBridge keeps its forward (its modules wrap
Hugging Face's). The instance `forward` is restored on exit, also after an exception.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tl_depass.engine.backends import Model, is_bridge

SKIPPED_ATTN = ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern",
                "q_norm.hook_scale", "q_norm.hook_normalized", "k_norm.hook_scale", "k_norm.hook_normalized")


@dataclass
class FastPaths:
    """Module names (under `model`) that run their fast forward in the folded pass."""

    attn: set[str] = field(default_factory=set)
    mlps: set[str] = field(default_factory=set)
    norms: set[str] = field(default_factory=set)


def _unhooked(module: nn.Module, points: tuple[str, ...]) -> bool:
    for name in points:
        try:
            point = module.get_submodule(name)
        except AttributeError:  # not in this configuration (e.g. no query/key norms)
            continue
        if point._forward_hooks or point._forward_pre_hooks:
            return False
    return True


def _attention_ok(module: nn.Module) -> bool:
    from transformer_lens.components.abstract_attention import AbstractAttention

    cfg = module.cfg
    return (isinstance(module, AbstractAttention) and type(module).forward is AbstractAttention.forward
            and not (cfg.use_split_qkv_input or cfg.use_attn_in or cfg.load_in_4bit
                     or cfg.use_attn_result or cfg.clip_qkv is not None
                     or getattr(cfg, "use_attention_sinks", False))
            and _unhooked(module, SKIPPED_ATTN))


def _mlp_ok(module: nn.Module, act_hook: str) -> bool:
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.mlps.mlp import MLP

    return (type(module) in (MLP, GatedMLP) and act_hook.endswith("hook_post")
            and not module.cfg.is_layer_norm_activation()
            and _unhooked(module, ("hook_post", "hook_pre_linear")))


def _norm_ok(module: nn.Module) -> bool:
    from transformer_lens.components.layer_norm import LayerNorm
    from transformer_lens.components.layer_norm_pre import LayerNormPre
    from transformer_lens.components.rms_norm import RMSNorm
    from transformer_lens.components.rms_norm_pre import RMSNormPre

    return (type(module) in (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)
            and module.cfg.dtype in (torch.float32, torch.float64)
            and _unhooked(module, ("hook_scale",)))


def fast_paths(model: Model, attn: list[str], mlps: list[tuple[str, str]], norms: list[str],
               keep: list[str]) -> FastPaths:
    """Which of the replayed modules can skip their frozen work. `mlps`: (prefix, act_hook);
    `keep`: the kept hook names (a kept value is never skipped). Call it before the pass adds its
    hooks: any hook found on a skipped point is then the user's."""
    if is_bridge(model):
        return FastPaths()
    kept = set(keep)
    return FastPaths(
        attn={a for a in attn if _attention_ok(model.get_submodule(a))
              and not kept & {f"{a}.{p}" for p in SKIPPED_ATTN}},
        mlps={p for p, act in mlps if _mlp_ok(model.get_submodule(p), act)
              and f"{p}.hook_pre_linear" not in kept},
        norms={n for n in norms if _norm_ok(model.get_submodule(n))},
    )


#: `add_bias(x, b)`: `b` added to the bias slot of every group of the fresh folded tensor `x`
#: (`FoldedForward.add_bias`), which it returns; `b` None: `x` as it is.
AddBias = Callable[[Tensor, Tensor | None], Tensor]


def attention_forward(module: nn.Module, attend: Callable[[Tensor], Tensor], add_bias: AddBias) -> Callable:
    """V -> hook_v -> `attend` (the frozen pattern) -> hook_z -> W_O, the biases to the bias slot."""
    grouped = hasattr(module, "_W_V") and not module.cfg.ungroup_grouped_query_attention

    def forward(query_input, key_input, value_input, *args, **kwargs):
        w_v, b_v = (module._W_V, module._b_V) if grouped else (module.W_V, module.b_V)
        w_v = einops.rearrange(w_v, "head_index d_model d_head -> (head_index d_head) d_model")
        v = F.linear(value_input, w_v.to(value_input.device))
        v = module.hook_v(add_bias(v.reshape(*value_input.shape[:2], *b_v.shape), b_v))
        z = module.hook_z(attend(v))
        w = einops.rearrange(module.W_O, "head_index d_head d_model -> d_model (head_index d_head)")
        z = z.reshape(z.shape[0], z.shape[1], -1)
        return add_bias(F.linear(z.to(w.dtype), w.contiguous()), module.b_O)
    return forward


def mlp_output(module: nn.Module, post: Tensor) -> Tensor:
    """W_out and b_out on the activations `post`, as the MLP's own forward."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.utilities.addmm import batch_addmm

    if isinstance(module, GatedMLP):
        return F.linear(post, module.W_out.T.contiguous(), module.b_out)
    return batch_addmm(module.b_out, module.W_out, post)


def mlp_forward(module: nn.Module, add_bias: AddBias) -> Callable:
    """W_in -> hook_pre -> the activation hook (overridden) -> W_out; no activation function; the
    biases to the bias slot."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    w_in = module.W_gate if isinstance(module, GatedMLP) else module.W_in
    b_in = None if isinstance(module, GatedMLP) else module.b_in  # a gated b_in: after the activation

    def forward(x):
        x = x.to(w_in.device)
        post = module.hook_post(module.hook_pre(add_bias(x @ w_in, b_in)))
        return add_bias(post @ module.W_out, module.b_out)
    return forward


def norm_forward(module: nn.Module, add_bias: AddBias) -> Callable:
    """A LayerNorm / RMSNorm (or their folded `Pre` forms) whose hook_scale is replayed: the
    statistics are never computed; the bias to the bias slot."""
    centre = type(module).__name__ in ("LayerNorm", "LayerNormPre")
    weight, bias = hasattr(module, "w"), hasattr(module, "b")

    def forward(x):
        if centre:
            x = x - x.mean(-1, keepdim=True)
        scale = module.hook_scale(x[..., :1])  # a placeholder: the pass replays the clean scale
        x = module.hook_normalized(x.div_(scale) if centre else x / scale).to(module.cfg.dtype)
        if not weight:
            return x
        # in place where no hook can hold the normalized value (a kept one, the user's)
        x = x * module.w if module.hook_normalized._forward_hooks else x.mul_(module.w)
        return add_bias(x, module.b if bias else None)
    return forward


@contextmanager
def skipping_frozen(model: Model, fast: FastPaths, attend: Callable[[str], Callable],
                    add_bias: AddBias) -> Iterator[None]:
    """Inside: the modules in `fast` run their fast forward. `attend(prefix)`: z from V there."""
    forwards = [(a, attention_forward(model.get_submodule(a), attend(a), add_bias)) for a in fast.attn]
    forwards += [(p, mlp_forward(model.get_submodule(p), add_bias)) for p in fast.mlps]
    forwards += [(n, norm_forward(model.get_submodule(n), add_bias)) for n in fast.norms]
    saved = []
    try:
        for name, forward in forwards:
            module = model.get_submodule(name)
            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, before in saved:
            if before is None:
                del module.forward
            else:
                module.forward = before
