"""The TransformerBridge's fast path (engine/fast.py's for the HookedTransformer): groups start
at their entry block; the attention, MLP activation and norm statistics that the pass freezes are
not computed.

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
(`hidden_states = layer(hidden_states, ...)`, transformers 5): `STARTS`. A neuron group starts
after its block (`output_half`, `through.after_mlp`) on the sequential architectures of
`bridge_mlp.SEQUENTIAL`, as on the HookedTransformer.

`skipping_frozen_bridge`, for one folded forward: (1) attention (`frozen_attention`: GPT-2's
`JointQKVAttentionBridge`, the Llama-like `PositionEmbeddingsAttentionBridge`) computes V (hook_v
fires, the pass corrects it), z from the clean pattern (the pass's `attend`), and the output
projection (hook_z fires with its input): never Q, K, RoPE, the scores or the softmax. (2) The
MLP's activation function is frozen (the pass overrides
`hook_post`, the input of the MLP's out projection, with the rule's shares), so inside one folded
forward Hugging Face's activation module passes its input through instead: `hook_post` fires with
the pre-activation (gated: gate * up) as a placeholder the pass replaces. Only for the MLP classes
in `ACTIVATED` (one activation call, just before the out projection), where `hook_post` is the out
projection's `hook_in`, nothing else is hooked there, and the activation module is the MLP's own.
A gated MLP's up projection (`frozen_ups`) returns ones: the rules read the clean one.
Everything else is computed by the model's own kernels: the results are bit-identical.
(3) The pass replays every norm's `hook_scale` from the clean run, so a
`NormalizationBridge` (TransformerLens's own norm path, which the pass takes) need not compute its
statistics: it centres (LayerNorm), fires `hook_scale` with a placeholder that the pass replaces,
divides, and applies its weight and bias with its own `_apply_weight_and_bias`, the operations of
its own forward in the same order (bit-identical). Not where `hook_scale` or `hook_normalized`
has a user's hook, the norm wraps no norm (Identity), or the model is not float32/float64.
Each keeps the module's own forward where what it skips is hooked by the user or kept.
"""

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_depass.engine.backends import Model, is_bridge
from tl_depass.engine.bridge_mlp import frozen_activations, frozen_ups, ones_forward, unhooked

#: Architectures whose Hugging Face decoder loop passes a bare hidden-state tensor from layer to
#: layer, or (`TUPLE_STARTS`) takes `outputs[0]` of each layer's output (checked in transformers
#: 5.24).
STARTS = frozenset({
    "GPT2LMHeadModel", "GPTJForCausalLM", "GPTNeoXForCausalLM", "OPTForCausalLM", "PhiForCausalLM",
    "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
    "MistralForCausalLM", "OlmoForCausalLM", "BloomForCausalLM",
})
TUPLE_STARTS = frozenset({"BloomForCausalLM"})  # (hidden_states, attention weights)


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
    if not 0 < layer <= len(model.blocks):  # len(blocks): straight to the final norm
        raise ValueError(f"cannot start a forward at block {layer} of {len(model.blocks)}")
    forwards = [_skip] * (layer - 1) + [lambda *args, **kwargs: residual]
    if model.cfg.architecture in TUPLE_STARTS:
        forwards = [lambda *args, f=f, **kwargs: (f(*args, **kwargs), None) for f in forwards]
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


def _identity(x, *args, **kwargs):
    return x




NORM_METHODS = ("forward", "_python_norm_forward", "_hf_autograd_forward_with_hooks",
                "_apply_weight_and_bias")


def _norm_ok(module: nn.Module) -> bool:
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    original = module._modules.get("_original_component")
    return (isinstance(module, NormalizationBridge)
            and all(getattr(type(module), m) is getattr(NormalizationBridge, m) for m in NORM_METHODS)
            and original is not None and not isinstance(original, nn.Identity)
            and all(unhooked(p) and not p.bwd_hooks for p in (module.hook_scale, module.hook_normalized)))


def frozen_norms(model: Model, norms: list[str]) -> list[nn.Module]:
    """The norm modules (names under `model`, whose `hook_scale` the pass replays) that may skip
    their statistics. Call it before the pass adds its hooks."""
    if not is_bridge(model) or model.cfg.dtype not in (torch.float32, torch.float64):
        return []
    return [m for m in map(model.get_submodule, norms) if _norm_ok(m)]


def norm_forward(module: nn.Module) -> Callable:
    """A NormalizationBridge whose hook_scale is replayed: no statistics."""
    def forward(hidden_states, **kwargs):
        x = module.hook_in(hidden_states)
        dtype = x.dtype
        if not module.uses_rms_norm:
            x = x - x.mean(-1, keepdim=True)
        scale = module.hook_scale(x[..., :1])  # a placeholder: the pass replays the clean scale
        x = module.hook_normalized(x / scale)
        return module.hook_out(module._apply_weight_and_bias(x, dtype))
    return forward


#: What the fast attention never computes (a hook there, or a kept value, keeps the module's own).
SKIPPED_ATTN = ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern",
                "q.hook_in", "q.hook_out", "k.hook_in", "k.hook_out", "qkv.hook_in", "qkv.hook_out",
                "hook_q_normed", "hook_k_normed", "q_norm.hook_in", "q_norm.hook_out", "k_norm.hook_in",
                "k_norm.hook_out", "q_norm.hook_scale", "k_norm.hook_scale", "hook_cos", "hook_sin")


#: Hugging Face attention classes behind a plain `AttentionBridge` whose forward (transformers 5)
#: is `v_proj` -> the pattern -> heads merged -> `out_proj` (-> `resid_dropout`), returning
#: (output, weights), with nothing else acting on V or z.
PLAIN_HF = ("OPTAttention", "GPTJAttention")


def _attention_ok(model: Model, name: str, kept: set[str]) -> bool:
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    from transformer_lens.model_bridge.generalized_components.bloom_attention import BloomAttentionBridge
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
        JointQKVAttentionBridge,
    )
    from transformer_lens.model_bridge.generalized_components.joint_qkv_position_embeddings_attention import (
        JointQKVPositionEmbeddingsAttentionBridge as NeoX,
    )
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge as Rotary,
    )

    module = model.get_submodule(name)
    cfg = module.config
    known = (JointQKVAttentionBridge, NeoX, Rotary, AttentionBridge, BloomAttentionBridge)
    if type(module) not in known or cfg is None or (type(module) is BloomAttentionBridge and module.training):
        return False
    if type(module) is AttentionBridge:  # opaque: only Hugging Face classes read here
        hf = module.original_component
        if (type(hf).__name__ not in PLAIN_HF or getattr(hf, "v_proj", None) is not module._modules.get("v")
                or getattr(hf, "out_proj", None) is not module._modules.get("o")):
            return False
    if type(module) is Rotary:  # nothing between V and the pattern, nor between z and O
        hf = module.original_component
        if (getattr(cfg, "gated_q_proj", False) or module._modules.get("gate") is not None
                or getattr(hf, "key_multiplier", None) is not None or getattr(hf, "sinks", None) is not None
                or getattr(getattr(hf, "config", None), "clip_qkv", None) is not None
                or getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False)
                or type(module)._pre_output_projection is not Rotary._pre_output_projection
                or not isinstance(getattr(hf, "head_dim", None), int)):
            return False
    points = [getattr(module._modules.get(p.split(".")[0]), p.split(".")[1], None) if "." in p
              else getattr(module, p, None) for p in SKIPPED_ATTN]
    split = getattr(module, "_is_split_qkv_fork_active", lambda: False)()
    return (not (split or getattr(cfg, "use_attn_result", False))
            and module._modules.get("o") is not None
            and all(p is None or (unhooked(p) and not p.bwd_hooks) for p in points)
            and not kept & {f"{name}.{p}" for p in SKIPPED_ATTN})


def frozen_attention(model: Model, attn: list[str], keep: list[str]) -> set[str]:
    """The attention modules (names) that compute only V, the frozen pattern and the output
    projection: GPT-2-like (`JointQKVAttentionBridge`), GPT-NeoX and Bloom (its subclasses; Bloom
    in eval mode), Llama-like (`PositionEmbeddingsAttentionBridge` without gates, sinks, clipping
    or a K multiplier), OPT and GPT-J (`PLAIN_HF`), without hooks on what they skip."""
    if not is_bridge(model):
        return set()
    return {a for a in attn if _attention_ok(model, a, set(keep))}


def replays_in_full(model: Model) -> bool:
    """Whether a Bridge's folded forward runs every op of the model (`footprint.terms`'
    `full_replay`): not where every block's attention is fast and every MLP's activation frozen
    (without user hooks; every tested family)."""
    if not is_bridge(model):
        return False
    n = model.cfg.n_layers
    try:
        attn = frozen_attention(model, [f"blocks.{i}.attn" for i in range(n)], [])
        acts = [] if model.cfg.attn_only else frozen_activations(
            model, [(f"blocks.{i}.mlp", f"blocks.{i}.mlp.hook_post") for i in range(n)])
    except AttributeError:  # a block without `attn` or `mlp`
        return True
    return len(attn) < n or (not model.cfg.attn_only and len(acts) < n)


def attention_forward(module: nn.Module, attend: Callable[[Tensor], Tensor]) -> Callable:
    """Input hook -> V (hook_v fires) -> `attend` (the frozen pattern) -> the output projection
    (hook_z fires with its input) -> hook_out, as `JointQKVAttentionBridge` and
    `PositionEmbeddingsAttentionBridge` (Llama-like) do."""
    heads = module.config.n_heads
    kv_heads = getattr(module.config, "n_key_value_heads", None) or heads
    if type(module).__name__ in ("PositionEmbeddingsAttentionBridge", "AttentionBridge"):
        return hf_attention_forward(module, attend)

    bloom = type(module).__name__ == "BloomAttentionBridge"  # adds the residual (args[1]) itself

    def forward(*args, **kwargs):
        if bloom:
            x = module.hook_in(args[0] if args and isinstance(args[0], Tensor) else kwargs["hidden_states"])
        else:
            x = module._apply_attention_input_hook(*args, **kwargs)
        v = module.v(x)
        z = attend(v.unflatten(-1, (kv_heads, -1)))  # [batch, query_pos, head_index, d_head]
        z = z.reshape(z.shape[0], z.shape[1], -1)
        out = module._apply_output_projection(z)
        if bloom and len(args) > 1 and isinstance(args[1], Tensor):
            out = out + args[1]
        return module._process_output((out, None))
    return forward


def hf_attention_forward(module: nn.Module, attend: Callable[[Tensor], Tensor]) -> Callable:
    """`PositionEmbeddingsAttentionBridge.forward` (Llama-like) and `AttentionBridge.forward` over
    `PLAIN_HF` without Q, K, RoPE, the scores and softmax."""
    head_dim = module.original_component.head_dim
    dropout = getattr(module.original_component, "resid_dropout", None) or nn.Identity()  # GPT-J

    def forward(*args, **kwargs):
        x = module.hook_in(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        v = module.v(x)
        z = attend(v.unflatten(-1, (-1, head_dim)))  # [batch, query_pos, head_index, d_head]
        z = z.reshape(*x.shape[:-1], -1)
        weight = getattr(getattr(module.o, "original_component", None), "weight", None)
        if isinstance(weight, Tensor) and weight.dtype.is_floating_point and z.dtype != weight.dtype:
            z = z.to(weight.dtype)
        return module.hook_out(dropout(module.o(z))), None
    return forward


def skipping_frozen_bridge(model: Model, mlps: list[tuple[str, str]], norms: list[str],
                           attn: set[str] = frozenset(), attend: Callable | None = None,
                           keep: list[str] = ()) -> AbstractContextManager:
    """Inside: the activation modules of `mlps` ((prefix, act_hook), whose `act_hook` the pass
    overrides) pass their input through and gated MLPs skip their up projection, the `norms` skip
    their statistics, where they may (`frozen_activations`, `frozen_ups`, `frozen_norms`; decided
    now, so call it before the pass's hooks), and the attention modules `attn`
    (`frozen_attention`) compute z from V with `attend(name)`."""
    acts = frozen_activations(model, mlps)
    forwards = [(act, _identity) for act in acts]
    forwards += [(up, ones_forward(up)) for up in frozen_ups(model, mlps, list(keep), acts)]
    forwards += [(m, norm_forward(m)) for m in frozen_norms(model, norms)]
    forwards += [(model.get_submodule(a), attention_forward(model.get_submodule(a), attend(a)))
                 for a in attn]
    return instance_forwards(forwards)
