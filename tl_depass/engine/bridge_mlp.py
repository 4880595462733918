"""The TransformerBridge's MLP fast paths (engine/fast_bridge.py's other half): which activation
modules and gated up projections a folded forward may skip, and where a neuron group may start
after its block (`output_half`, for `through.after_mlp`)."""

from collections.abc import Callable

from torch import Tensor, nn

from tl_depass.engine.backends import Model, is_bridge

#: Hugging Face MLPs that call their activation module once, on the (gate) projection, and feed
#: the result (times the up projection, gated) straight to the out projection.
ACTIVATED = {"GPT2MLP": "act", "GPTJMLP": "act", "GPTNeoXMLP": "act", "PhiMLP": "activation_fn",
             "LlamaMLP": "act_fn", "MistralMLP": "act_fn", "Qwen2MLP": "act_fn", "Qwen3MLP": "act_fn",
             "Gemma2MLP": "act_fn", "OlmoMLP": "act_fn", "BloomMLP": "gelu_impl"}


def unhooked(point: nn.Module) -> bool:
    return not (point._forward_hooks or point._forward_pre_hooks)


def _activation(bridge_mlp: nn.Module) -> nn.Module | None:
    hf = bridge_mlp._modules.get("_original_component")
    name = ACTIVATED.get(type(hf).__name__)
    act = None if name is None else hf._modules.get(name)
    if getattr(hf, "pretraining_tp", 1) > 1 and getattr(hf, "slow_but_exact", False):
        return None  # Bloom's sliced out projection bypasses the module (and hook_post)
    return act if act is not None and not list(act.parameters()) and not act._modules else None


#: Sequential blocks (attention, then the MLP, each added to the residual stream, nothing after
#: the MLP's out projection) and parallel ones (attention and MLP both read resid_pre, and both
#: are added to it; with `cfg.parallel_attn_mlp`): `output_half` applies (checked in transformers
#: 5.24).
SEQUENTIAL = frozenset({"GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM",
                        "Qwen2ForCausalLM", "Qwen3ForCausalLM", "OlmoForCausalLM"})
PARALLEL = frozenset({"GPTNeoXForCausalLM", "GPTJForCausalLM", "PhiForCausalLM"})


def output_half(model: Model, layer: int, names: list[str]) -> bool:
    """Whether block `layer`'s MLP output half can be computed apart from the block
    (`through.after_mlp`): a sequential or parallel architecture (all in `fast_bridge.STARTS`),
    whose hooks after `hook_post` (the out projection's input; `names`: the block's hooks in firing
    order) are the out projection's, `hook_mlp_out` and `hook_resid_post`, with no user hook in the
    block; a parallel block has no resid_mid (`plan.mlp_output_entry` checks the hooks that
    `plan.before_mlp` adds the MLP's output to)."""
    arch = getattr(model.cfg, "architecture", None)
    parallel = arch in PARALLEL and getattr(model.cfg, "parallel_attn_mlp", False)
    blocks = getattr(model, "blocks", None)
    if (arch not in SEQUENTIAL and not parallel) or not isinstance(blocks, nn.ModuleList):
        return False
    prefix, out = f"blocks.{layer}.", blocks[layer].mlp._modules.get("out")
    act, tail = f"{prefix}mlp.hook_post", ["mlp.out.hook_out", "hook_mlp_out", "hook_resid_post"]
    return (act in names and (f"{prefix}hook_resid_mid" in names) != parallel  # plan.before_mlp
            and names[names.index(act):] == [act, *(prefix + n for n in tail)]
            and out is not None and model.hook_dict.get(act) is getattr(out, "hook_in", None)
            and all(unhooked(p) for n, p in model.hook_dict.items() if n.startswith(prefix)))


def mlp_output(bridge_mlp: nn.Module, post: Tensor) -> Tensor:
    """The out projection on the activations `post`, with the kernel of the Bridge's forward."""
    return bridge_mlp.out.original_component(post)


def frozen_activations(model: Model, mlps: list[tuple[str, str]]) -> list[nn.Module]:
    """The activation modules of the MLPs `mlps` ((prefix, act_hook)) that a folded forward may
    skip. Call it before the pass adds its hooks: a hook found on `hook_post` is the user's."""
    if not is_bridge(model) or not hasattr(model, "blocks"):
        return []
    every = [id(a) for a in (_activation(m) for m in model.modules() if "_original_component"
                             in m._modules) if a is not None]
    acts = []
    for prefix, act_hook in mlps:
        bridge_mlp = model.get_submodule(prefix)
        out, act = bridge_mlp._modules.get("out"), _activation(bridge_mlp)
        point = model.hook_dict.get(act_hook)
        if (act is not None and out is not None and point is getattr(out, "hook_in", None)
                and unhooked(point) and every.count(id(act)) == 1):
            acts.append(act)
    return acts


def frozen_ups(model: Model, mlps: list[tuple[str, str]], keep: list[str],
               acts: list[nn.Module]) -> list[nn.Module]:
    """The up projections (a gated MLP's `in`) of the MLPs `mlps` whose activation module is
    among the frozen `acts` (`frozen_activations`): the rules read the clean run's, so a folded
    forward's is never used. Not where the projection's hooks have a user's hook or are kept."""
    acts = set(map(id, acts))
    ups = []
    for prefix, _ in mlps:
        bridge_mlp = model.get_submodule(prefix)
        up = bridge_mlp._modules.get("in")
        points = [getattr(up, p, None) for p in ("hook_in", "hook_out")]
        names = {f"{prefix}.in.hook_in", f"{prefix}.in.hook_out", f"{prefix}.hook_pre_linear"}
        if (up is not None and "gate" in bridge_mlp._modules and id(_activation(bridge_mlp)) in acts
                and isinstance(getattr(up.original_component, "out_features", None), int)
                and all(p is not None and unhooked(p) for p in points) and not names & set(keep)):
            ups.append(up)
    return ups


def ones_forward(up: nn.Module) -> Callable:
    """The up projection as a placeholder of ones: the product act(gate) * up that feeds
    `hook_post` (overridden by the pass) is then the gate's activation."""
    width = up.original_component.out_features

    def forward(x, *args, **kwargs):
        return x.new_ones(()).expand(*x.shape[:-1], width)
    return forward
