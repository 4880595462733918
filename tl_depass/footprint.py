"""What a `decompose` call (or `attribute`'s backward path) holds, counted from its arguments
before anything is allocated, in elements of the model's dtype (`tl_depass.memory` turns them
into bytes, compares them with what is free and chooses the chunk size).

The terms (rows = the slots of one folded forward x batch):
- results: every kept hook's [component, batch, pos, ...] and the logits [component, batch, pos,
  d_vocab] (at the kept positions only: decompose's `logits=`);
- clean: what the clean run records (frozen patterns, MLP facts, residuals, logits), held
  through the call;
- transient: the peak of the folded forward(s) on top. One forward of one part: its kept values
  are the results (no copy), next to its working set (one layer's temporaries). Several parts:
  one forward's kept values next to the larger of its working set (or the raw logits) and their
  copy into the results. Chunked: the results next to a forward and two chunks' kept values.
The constants were fitted to the peak resident memory (VmHWM) of calls on CPU, float32 and
float64: the estimate was 0.7x-1.4x of it (docs/benchmarks.md, "Memory"); with the fast
HookedTransformer replay (no activation function, no attention scores for folded rows) 1.0x-1.8x
with FAST_MLP_TEMPS = 8, and 2.1x at N = 512, where the softmax rule's working set at an MLP was
measured at ~3.8 [rows, pos, d_mlp] tensors (the corrected pre-activation, its scaled copy, the
mask, the softmax, and the residual-wide norm output): with 5, 0.84x-1.37x on the small cases and
1.22x at N = 512 (tests/test_memory.py keeps every case within 0.5x-2x). A TransformerBridge whose
fast paths apply (every tested family since 30 Nov) was still counted as a full replay, 1.2x-2.1x
of its peak (a CI run failed at 2.08x); counted as the fast replay, 0.78x-1.31x (GPT-2-style,
tests/test_memory.py's five cases, three measurements each).
"""

from collections.abc import Callable
from typing import NamedTuple

from tl_depass.engine.backends import Model, is_bridge
from tl_depass.engine.hooks import resid_pre
from tl_depass.engine.validate import NOT_DECOMPOSABLE, RESIDUAL
from tl_depass.levels import Heads, Modules, Neurons

# Per row and position, in units of the model's dtype: the MLP's working set (pre-activation,
# its corrected copy, the activation, the rule's temporaries), the attention's (scores, masked
# scores, pattern), and the residual stream's (a few copies alive around each hook); at the end
# the raw logits (before and after b_U) next to the corrected ones. The MLP's count was 10 until
# the softmax rule stopped allocating its softmax output (engine/rules.shares works in place).
MLP_TEMPS, ATTN_TEMPS, RESID_TEMPS = 9, 4, 6
# A HookedTransformer's replay (engine/fast.py) never evaluates the activation function nor
# computes attention scores for the folded rows: no scores, and (measured at N = 512, d_mlp 1024:
# ~3.3 d_mlp-wide tensors at the softmax rule's peak; small models more) five d_mlp temporaries.
FAST_MLP_TEMPS = 5
# What autograd keeps per layer and position on attribute's backward path (model's dtype).
GRAPH_RESID, GRAPH_MLP = 12, 4


class Terms(NamedTuple):
    """Elements (of the model's dtype) a call holds, by term; see the module's docstring."""

    results: int
    clean: int
    transient: int
    components: int  # rows of the component axis (all groups, biases included)
    chunk_size: int | None  # components per forward (None: all in one)


def count_components(spec, model: Model, pos: int) -> tuple[int, int, bool]:
    """(groups, components per group without the bias, exact?) before the clean run: the level's
    own `size`; a level without one is counted from a lower bound (1, 1), checked again once its
    groups are built."""
    size = getattr(spec, "size", None)
    return (1, 1, False) if size is None else size(model, pos)


def entry_hook(spec) -> str:
    """The first hook where the components enter (what DePass keeps from)."""
    if isinstance(spec, (Heads, Modules, Neurons)):
        layers = [spec.layer] if isinstance(spec, Neurons) else spec.layers
        return resid_pre(min(layers) if layers else 0)
    return getattr(spec, "hook", resid_pre(0))


def residual_key(name: str) -> tuple[int, int]:
    layer, kind = name.split(".")[1], name.rsplit("_", 1)[-1]
    return int(layer), ("pre", "mid", "post").index(kind)


def kept_hooks(names: list[str], spec, keep: list[str] | Callable[[str], bool]) -> list[str]:
    """The hooks `decompose` will keep (besides the logits): exact for a list and the default
    (the residual stream from the entry on), an upper bound for a callable filter."""
    if not callable(keep):
        return list(keep)
    entry = entry_hook(spec)
    if RESIDUAL.match(entry) and keep(entry) and all(
            RESIDUAL.match(n) or not keep(n) for n in names):
        return [n for n in names if RESIDUAL.match(n) and keep(n)
                and residual_key(n) >= residual_key(entry)]
    return [n for n in names if keep(n) and not n.endswith(NOT_DECOMPOSABLE)]


def one_part(model: Model, spec) -> bool:
    """Whether every group enters in one block, so that `engine.sweep.run_chunks` runs one part
    (a Bridge always does); levels of your own: not known, False."""
    layers = getattr(spec, "layers", ())
    layers = range(model.cfg.n_layers) if layers is None else layers
    return is_bridge(model) or (type(spec).__module__.startswith("tl_depass.") and len(set(layers)) <= 1)


def distinct_hooks(model: Model, spec, kept: list[str]) -> list[str]:
    """`kept` less the hooks whose results share another's tensor: in a HookedTransformer
    `blocks.L.hook_resid_post` is the tensor `blocks.{L+1}.hook_resid_pre` receives, and when
    every group enters in one block (one part of `engine.sweep.run_chunks`) the two results are
    one tensor. Levels of your own and Bridges: every hook counted."""
    if is_bridge(model) or not one_part(model, spec):
        return kept
    return [n for n in kept if not (n.endswith("hook_resid_post") and resid_pre(
        residual_key(n)[0] + 1) in kept)]


def hook_width(cfg, name: str) -> int:
    """Values per (batch, pos) at hook `name`; unknown hooks get the widest."""
    heads, kv = cfg.n_heads * cfg.d_head, (getattr(cfg, "n_key_value_heads", None)
                                           or cfg.n_heads) * cfg.d_head
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    if name.endswith(("mlp.hook_pre", "mlp.hook_post", "mlp.hook_mid", "mlp.hook_pre_linear")):
        return d_mlp
    if name.endswith(("attn.hook_q", "attn.hook_z", "attn.hook_rot_q")):
        return heads
    if name.endswith(("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")):
        return kv
    if name.endswith("attn.hook_result"):
        return cfg.n_heads * cfg.d_model
    if RESIDUAL.match(name) or name.endswith(("hook_attn_out", "hook_mlp_out", "hook_normalized",
                                              "hook_embed", "hook_pos_embed")):
        return cfg.d_model
    return max(cfg.d_model, d_mlp, heads, cfg.n_heads * cfg.d_model)


def mlp_and_vocab(cfg) -> tuple[int, int]:
    d_mlp = 0 if cfg.attn_only else (cfg.d_mlp or 4 * cfg.d_model)
    d_vocab = getattr(cfg, "d_vocab_out", -1)
    return d_mlp, d_vocab if d_vocab and d_vocab > 0 else cfg.d_vocab


def clean_run(cfg, batch: int, pos: int) -> int:
    """Values the clean run records: per layer the pattern, z, residuals, MLP pre-activation,
    activation and the rules' facts; the logits twice (recorded and returned)."""
    d_mlp, d_vocab = mlp_and_vocab(cfg)
    layer = cfg.n_heads * pos * pos + pos * (3 * cfg.d_model + cfg.n_heads * cfg.d_head + 5 * d_mlp)
    return batch * (cfg.n_layers * layer + 2 * pos * d_vocab)


def terms(cfg, batch: int, pos: int, groups: int, per_group: int, kept: list[str],
          chunk_size: int | None, padded: bool, n_logits: int | None = None,
          full_replay: bool = True, one_part: bool = False) -> Terms:
    """The terms for `groups` groups of `per_group` components (and a bias each), with the
    logits of `n_logits` positions per row (None: all). `full_replay`: the folded rows run every
    op of the model (a TransformerBridge without its fast paths, `fast_bridge.replays_in_full`);
    False: a HookedTransformer's replay (engine/fast.py) or a Bridge's fast one.
    `one_part`: every group enters in one block (`engine.sweep.run_chunks` runs one part)."""
    d_mlp, d_vocab = mlp_and_vocab(cfg)
    n_logits = pos if n_logits is None else n_logits
    # per component and batch row: every position's kept hooks, the kept positions' logits
    width = sum(hook_width(cfg, n) for n in kept) * pos + n_logits * d_vocab
    results = groups * (per_group + 1) * batch * width
    k = per_group if chunk_size is None else max(1, min(per_group, chunk_size // groups))
    rows = groups * (k + 2) * batch
    mlp_temps = MLP_TEMPS if full_replay else FAST_MLP_TEMPS
    working = max(2 * d_vocab * n_logits, pos * (mlp_temps * d_mlp + RESID_TEMPS * cfg.d_model),
                  pos * (ATTN_TEMPS * cfg.n_heads * pos * full_replay + RESID_TEMPS * cfg.d_model))
    facts = 3 * cfg.n_layers * groups * batch * pos * d_mlp if groups > 1 else 0
    kept_rows = rows * width  # what one forward keeps
    if k < per_group:  # the results exist during later chunks, next to the previous chunk's
        # kept values and the allocator's freed chunk-sized blocks (measured: about one more)
        transient = 3 * kept_rows + rows * working + facts
    elif one_part:  # the forward's kept values become the results (no copy): only the probes
        transient = kept_rows - results + rows * working + facts
    else:  # the working set is gone before the results are allocated and copied into
        transient = kept_rows + max(rows * working, results) + facts - results
    if padded:  # padded positions are zeroed into a copy of every result
        transient = max(transient, results)
    chunk = None if k >= per_group else k * groups
    return Terms(results, clean_run(cfg, batch, pos), transient, groups * (per_group + 1), chunk)


def backward_graph(cfg, batch: int, pos: int) -> int:
    """attribute's backward path on top of the clean run: one forward whose activations autograd
    keeps (per layer a few residual- and MLP-wide tensors; the patterns are the clean ones), and
    the logits three times (output, capture, gradient)."""
    d_mlp, d_vocab = mlp_and_vocab(cfg)
    return batch * pos * (cfg.n_layers * (GRAPH_RESID * cfg.d_model + GRAPH_MLP * d_mlp) + 3 * d_vocab)
