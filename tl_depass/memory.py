"""How much memory a `decompose` call needs, counted from its arguments before anything is
allocated, and what is available (free RAM within the container's cgroup limit, or free device
memory).

The terms (in the model's dtype; rows = the slots of one folded forward x batch):
- results: every kept hook's [component, batch, pos, ...] and the logits [component, batch, pos,
  d_vocab] (at the kept positions only: decompose's `logits=`);
- clean: what the clean run records (frozen patterns, MLP facts, residuals, logits), held
  through the call;
- transient: the peak of the folded forward(s) on top, which comes in phases: one forward's kept
  values next to the larger of its working set (one layer's temporaries, or the raw logits) and
  their copy into the results; chunked, the results next to a forward and two chunks' kept values.
The constants were fitted to the peak resident memory (VmHWM) of calls on CPU, float32 and
float64: the estimate is 0.7x-1.4x of it (docs/benchmarks.md, "Memory"; tests/test_memory.py).
"""

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tl_depass.engine.arguments import check_call
from tl_depass.engine.backends import canonical_names
from tl_depass.engine.validate import NOT_DECOMPOSABLE, RESIDUAL, check_layers
from tl_depass.errors import DepassError
from tl_depass.levels import Heads, Modules, Neurons, SAEFeatures, Subspace
from tl_depass.levels.components import Split, TokensAt

# Per row and position, in units of the model's dtype: the MLP's working set (pre-activation,
# its corrected copy, the activation, the rule's temporaries), the attention's (scores, masked
# scores, pattern), and the residual stream's (a few copies alive around each hook); at the end
# the raw logits (before and after b_U) next to the corrected ones.
MLP_TEMPS, ATTN_TEMPS, RESID_TEMPS = 10, 4, 6
# What autograd keeps per layer and position on attribute's backward path (model's dtype).
GRAPH_RESID, GRAPH_MLP = 12, 4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a `decompose` call needs (`total`), and its parts."""

    total: int
    results: int  # the returned per-component tensors
    clean: int  # the clean run's recorded values, held through the call
    transient: int  # the largest folded forward (one chunk), its copy into the results included
    components: int  # rows of the component axis (all groups, biases included)
    chunk_size: int | None  # components per forward (None: all in one)
    available: int | None = None  # what the check compared `total` with (None: not checked)

    def __str__(self) -> str:
        chunk = "one forward" if self.chunk_size is None else f"chunk_size={self.chunk_size}"
        text = (f"{size(self.total)} ({size(self.results)} results, {size(self.clean)} clean run, "
                f"{size(self.transient)} peak of a forward; {self.components} components, {chunk})")
        return text if self.available is None else f"{text}; {size(self.available)} available"


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def count_components(spec, model, pos: int, pos_embed: str) -> tuple[int, int, bool]:
    """(groups, components per group without the bias, exact?) from the spec alone. Where the
    clean run decides the count (SAEFeatures(features=None), a user's level), a lower bound."""
    if isinstance(spec, TokensAt):
        return 1, pos + (pos_embed == "separate"), True
    if isinstance(spec, Split):
        return 1, spec.tensor.shape[0], True
    if isinstance(spec, Heads):
        return len(check_layers(model, spec.layers, "Heads")), model.cfg.n_heads + 1, True
    if isinstance(spec, Modules):
        return len(check_layers(model, spec.layers, "Modules")), 2 + (not model.cfg.attn_only), True
    if isinstance(spec, Neurons):
        return 1, 1 + (model.cfg.d_mlp if spec.neurons is None else len(spec.neurons)), True
    if isinstance(spec, Subspace):
        return 1, 1 + (len(spec.basis) if isinstance(spec.basis, dict) else 1), True
    if isinstance(spec, SAEFeatures):
        known = spec.features is not None
        return 1, 3 + (len(spec.features) if known else 0), known
    return 1, 1, False


def entry_hook(spec) -> str:
    """The first hook where the components enter (what DePass keeps from)."""
    if isinstance(spec, (Heads, Modules, Neurons)):
        layers = [spec.layer] if isinstance(spec, Neurons) else spec.layers
        return f"blocks.{min(layers) if layers else 0}.hook_resid_pre"
    return getattr(spec, "hook", "blocks.0.hook_resid_pre")


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


def estimate(model, batch: int, pos: int, groups: int, per_group: int, kept: list[str],
             chunk_size: int | None, itemsize: int, padded: bool,
             n_logits: int | None = None) -> MemoryEstimate:
    """The estimate for `groups` groups of `per_group` components (and a bias each), with the
    logits of `n_logits` positions per row (None: all)."""
    cfg = model.cfg
    d_mlp, d_vocab = mlp_and_vocab(cfg)
    n_logits = pos if n_logits is None else n_logits
    # per component and batch row: every position's kept hooks, the kept positions' logits
    width = sum(hook_width(cfg, n) for n in kept) * pos + n_logits * d_vocab
    results = groups * (per_group + 1) * batch * width
    clean = clean_run(cfg, batch, pos)
    k = per_group if chunk_size is None else max(1, min(per_group, chunk_size // groups))
    rows = groups * (k + 2) * batch
    working = max(2 * d_vocab * n_logits, pos * (MLP_TEMPS * d_mlp + RESID_TEMPS * cfg.d_model),
                  pos * (ATTN_TEMPS * cfg.n_heads * pos + RESID_TEMPS * cfg.d_model))
    facts = 3 * cfg.n_layers * groups * batch * pos * d_mlp if groups > 1 else 0
    kept_rows = rows * width  # what one forward keeps
    if k < per_group:  # the results exist during later chunks, next to the previous chunk's
        # kept values and the allocator's freed chunk-sized blocks (measured: about one more)
        transient = 3 * kept_rows + rows * working + facts
    else:  # the working set is gone before the results are allocated and copied into
        transient = kept_rows + max(rows * working, results) + facts - results
    if padded:  # padded positions are zeroed into a copy of every result
        transient = max(transient, results)
    chunk = None if k >= per_group else k * groups
    return MemoryEstimate(itemsize * (results + clean + transient), itemsize * results,
                          itemsize * clean, itemsize * transient, groups * (per_group + 1), chunk)


def plan(model, batch: int, pos: int, counts: tuple[int, int], kept: list[str],
         chunk_size: int | None, available: int | None, padded: bool,
         n_logits: int | None = None) -> MemoryEstimate:
    """The estimate for `chunk_size`; when None and one forward would not fit in `available`,
    for the largest chunk that does (the results are the same for every chunk size), or for
    the smallest one if none does."""
    itemsize = next(model.parameters()).element_size()

    def at(chunk):
        e = estimate(model, batch, pos, *counts, kept, chunk, itemsize, padded, n_logits)
        return MemoryEstimate(**{**e.__dict__, "available": available})

    full = at(chunk_size)
    if chunk_size is not None or available is None or full.total <= available:
        return full
    groups, per_group = counts
    lo, hi, best = 1, per_group - 1, at(groups)  # the largest k per group that fits
    while lo <= hi:
        mid = (lo + hi) // 2
        e = at(mid * groups)
        if e.total <= available:
            best, lo = e, mid + 1
        else:
            hi = mid - 1
    return best


def check_backward(model, tokens, max_memory: int | None) -> None:
    """attribute's backward path needs the clean run, one forward whose activations autograd
    keeps (per layer a few residual- and MLP-wide tensors; the patterns are the clean ones), and
    the logits three times (output, capture, gradient). Refuse it when that does not fit."""
    cfg, (batch, pos) = model.cfg, tokens.shape
    d_mlp, d_vocab = mlp_and_vocab(cfg)
    graph = batch * pos * (cfg.n_layers * (GRAPH_RESID * cfg.d_model + GRAPH_MLP * d_mlp) + 3 * d_vocab)
    need = next(model.parameters()).element_size() * (clean_run(cfg, batch, pos) + graph)
    available = max_memory if max_memory is not None else available_memory(tokens.device)
    if available is not None and need > available:
        raise DepassError(f"attribute's backward pass would need about {size(need)} but "
                          f"{size(available)} is available; lower it with fewer positions (a shorter "
                          "prompt) or a smaller batch, or pass max_memory= (bytes) if you know more "
                          "is available")


def available_memory(device: torch.device) -> int | None:
    """Free memory on `device`: on CUDA, the driver's free memory plus what torch has cached;
    elsewhere MemAvailable, capped by the cgroup's limit less its usage (page cache excluded)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    found = [v for v in (meminfo("MemAvailable"), cgroup_free()) if v is not None]
    return min(found) if found else None


def meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def read_number(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_free() -> int | None:
    """The cgroup's limit less its usage, page cache that can be reclaimed not counted as used
    (v2: memory.max / memory.current; v1: memory.limit_in_bytes / memory.usage_in_bytes)."""
    for root, limit, usage, cache in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
             "total_inactive_file")):
        cap, used = read_number(os.path.join(root, limit)), read_number(os.path.join(root, usage))
        if cap is None or used is None or cap >= 2**60:  # v1 writes "no limit" as a huge number
            continue
        try:
            with open(os.path.join(root, "memory.stat")) as f:
                stat = dict(line.split() for line in f)
            used -= int(stat.get(cache, 0))
        except (OSError, ValueError):
            pass
        return max(0, cap - used)
    return None


def check_fits(est: MemoryEstimate, chunk_given: bool, keeps_hooks: bool) -> None:
    """Refuse, naming what would lower the estimate, when it exceeds what is available."""
    if est.available is None or est.total <= est.available:
        return
    ways = ["keep=[] (the logits only)"] if keeps_hooks else []
    if chunk_given:
        ways.append("a smaller chunk_size= (or none: the largest that fits is chosen)")
    ways += ["fewer positions (a shorter prompt) or a smaller batch", "fewer components",
             "max_memory= (bytes) if you know more is available"]
    chunk = "" if chunk_given or est.chunk_size is None else f" even with chunk_size={est.chunk_size}"
    raise DepassError(f"decompose would need about {size(est.total)}{chunk} ({size(est.results)} "
                      f"results, {size(est.clean)} clean run, {size(est.transient)} for a forward) "
                      f"but {size(est.available)} is available; lower it with {', '.join(ways)}. "
                      "With logits='all' (the default) the logits are returned for every position: "
                      "[component, batch, pos, d_vocab]; logits='last' keeps one per row")


def planned(model, tokens, mask, spec, keep, pos_embed: str, chunk_size: int | None,
            max_memory: int | None, counts: tuple[int, int] | None = None,
            n_logits: int | None = None) -> MemoryEstimate:
    """The estimate for a `decompose` call whose arguments are checked (`keep` as keep_names
    returns it); `counts` (groups, components per group) once the clean run has fixed them;
    `n_logits` positions per row whose logits are kept (None: all)."""
    if max_memory is not None and max_memory < 1:
        raise DepassError(f"max_memory must be a positive number of bytes, got {max_memory}")
    counts = counts or count_components(spec, model, tokens.shape[1], pos_embed)[:2]
    kept = kept_hooks(list(dict.fromkeys(canonical_names(model).values())), spec, keep)
    available = max_memory if max_memory is not None else available_memory(tokens.device)
    return plan(model, *tokens.shape, counts, kept, chunk_size, available, mask is not None,
                n_logits)


def fitted(model, tokens, mask, spec, keep, pos_embed: str, chunk_size: int | None,
           max_memory: int | None, counts: tuple[int, int] | None = None,
           n_logits: int | None = None) -> int | None:
    """The chunk size `decompose` runs with: `chunk_size`, or when None the largest that fits
    (None: one forward). Raises DepassError when the call would not fit."""
    est = planned(model, tokens, mask, spec, keep, pos_embed, chunk_size, max_memory, counts,
                  n_logits)
    check_fits(est, chunk_size is not None, callable(keep) or bool(keep))
    return chunk_size if chunk_size is not None else est.chunk_size


def estimate_memory(model, tokens, components: object = "tokens", **options) -> MemoryEstimate:
    """The bytes `decompose(model, tokens, components, **options)` needs, without running the
    model, for the chunk size decompose would run with (given, or the largest that fits in the
    available memory or `max_memory`). For SAEFeatures(features=None) and levels of your own,
    whose counts only the clean run knows, the fewest components they can have."""
    names = set(inspect.signature(check_call).parameters) - {"model", "tokens", "components"}
    unknown = sorted(set(options) - names - {"max_memory"})
    if unknown:
        raise DepassError(f"estimate_memory: unknown options {unknown}; it takes decompose's "
                          f"options {sorted(names | {'max_memory'})}")
    max_memory = options.pop("max_memory", None)
    call = check_call(model, tokens, components, **options)
    return planned(model, call.tokens, call.mask, call.spec, call.keep,
                   options.get("pos_embed", "with_token"), options.get("chunk_size"), max_memory,
                   n_logits=call.n_logits)
