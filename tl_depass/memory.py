"""How much memory a `decompose` call needs (`estimate_memory`), counted from its arguments
before anything is allocated, what is available (free RAM within the container's cgroup limit,
or free device memory), and the chunk size decompose runs with so that it fits.

The terms themselves (results, clean run, transient peak) are counted in
`tl_depass.footprint`; this module turns them into bytes and decides.
"""

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from beartype import beartype
from jaxtyping import Integer, jaxtyped
from torch import Tensor

from tl_depass import footprint
from tl_depass.arguments import Tokens, check_call
from tl_depass.engine.backends import Model, canonical_names
from tl_depass.engine.fast_bridge import replays_in_full
from tl_depass.engine.validate import public
from tl_depass.errors import DepassError
from tl_depass.footprint import count_components  # decompose calls memory.count_components


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


def estimate(model: Model, batch: int, pos: int, groups: int, per_group: int, kept: list[str],
             chunk_size: int | None, itemsize: int, padded: bool,
             n_logits: int | None = None, one_part: bool = False) -> MemoryEstimate:
    """The estimate for `groups` groups of `per_group` components (and a bias each), with the
    logits of `n_logits` positions per row (None: all); `one_part`: every group enters in one
    block (`footprint.one_part`)."""
    t = footprint.terms(model.cfg, batch, pos, groups, per_group, kept, chunk_size, padded, n_logits,
                        full_replay=replays_in_full(model), one_part=one_part)
    return MemoryEstimate(itemsize * (t.results + t.clean + t.transient), itemsize * t.results,
                          itemsize * t.clean, itemsize * t.transient, t.components, t.chunk_size)


#: With neither `chunk_size` nor `max_memory`, a forward's transient memory is kept within the
#: results' size or this fraction of the free memory, whichever is larger (docs/benchmarks.md,
#: "Memory"): one forward over every component is fastest only until its working set (the MLP's
#: [component, pos, d_mlp] temporaries) dwarfs what it returns.
TRANSIENT_SHARE = 1 / 8


def plan(model: Model, batch: int, pos: int, counts: tuple[int, int], kept: list[str],
         chunk_size: int | None, available: int | None, padded: bool,
         n_logits: int | None = None, transient: int | None = None,
         one_part: bool = False) -> MemoryEstimate:
    """The estimate for `chunk_size`; when None and one forward would not fit in `available`
    or its transient memory exceed `transient` bytes (None: no bound), for the largest chunk
    within both (the results are the same for every chunk size), or for the smallest one if
    none is."""
    itemsize = next(model.parameters()).element_size()

    def at(chunk):
        e = estimate(model, batch, pos, *counts, kept, chunk, itemsize, padded, n_logits, one_part)
        return MemoryEstimate(**{**e.__dict__, "available": available})

    def within(e: MemoryEstimate) -> bool:
        return ((available is None or e.total <= available)
                and (transient is None or e.transient <= max(transient, e.results)))

    full = at(chunk_size)
    if chunk_size is not None or within(full):
        return full
    groups, per_group = counts
    lo, hi, best = 1, per_group - 1, at(groups)  # the largest k per group within both
    while lo <= hi:
        mid = (lo + hi) // 2
        e = at(mid * groups)
        if within(e):
            best, lo = e, mid + 1
        else:
            hi = mid - 1
    return best


def check_backward(model: Model, tokens: Integer[Tensor, "batch pos"], max_memory: int | None) -> None:
    """attribute's backward path needs one forward whose activations autograd keeps
    (`footprint.backward_graph`) and what it records as the clean run would (counted as a clean
    run: an upper bound). Refuse it when that does not fit."""
    cfg, (batch, pos) = model.cfg, tokens.shape
    elements = footprint.clean_run(cfg, batch, pos) + footprint.backward_graph(cfg, batch, pos)
    need = next(model.parameters()).element_size() * elements
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
                      "With logits='all' the logits are returned for every position: "
                      "[component, batch, pos, d_vocab]; logits='last' (the default) keeps one per row")


def planned(model: Model, tokens: Integer[Tensor, "batch pos"], mask: Integer[Tensor, "batch pos"] | None,
            spec, keep: list[str] | Callable[[str], bool], chunk_size: int | None,
            max_memory: int | None, counts: tuple[int, int] | None = None,
            n_logits: int | None = None) -> MemoryEstimate:
    """The estimate for a `decompose` call whose arguments are checked (`keep` as keep_names
    returns it); `counts` (groups, components per group) once the clean run has fixed them;
    `n_logits` positions per row whose logits are kept (None: all)."""
    if max_memory is not None and max_memory < 1:
        raise DepassError(f"max_memory must be a positive number of bytes, got {max_memory}")
    counts = counts or count_components(spec, model, tokens.shape[1])[:2]
    kept = footprint.distinct_hooks(model, spec, footprint.kept_hooks(
        list(dict.fromkeys(canonical_names(model).values())), spec, keep))
    available = max_memory if max_memory is not None else available_memory(tokens.device)
    # a budget given is the bound; otherwise a forward's transient within TRANSIENT_SHARE of it
    transient = None if max_memory is not None or available is None else int(available * TRANSIENT_SHARE)
    return plan(model, *tokens.shape, counts, kept, chunk_size, available, mask is not None,
                n_logits, transient, footprint.one_part(model, spec))


def fitted(model: Model, tokens: Integer[Tensor, "batch pos"], mask: Integer[Tensor, "batch pos"] | None,
           spec, keep: list[str] | Callable[[str], bool], chunk_size: int | None,
           max_memory: int | None, counts: tuple[int, int] | None = None,
           n_logits: int | None = None) -> int | None:
    """The chunk size `decompose` runs with: `chunk_size`, or when None the largest that fits
    (None: one forward). Raises DepassError when the call would not fit."""
    est = planned(model, tokens, mask, spec, keep, chunk_size, max_memory, counts,
                  n_logits)
    check_fits(est, chunk_size is not None, callable(keep) or bool(keep))
    return chunk_size if chunk_size is not None else est.chunk_size


@public
@jaxtyped(typechecker=beartype)
def estimate_memory(model: Model, tokens: Tokens, components: object = "tokens",
                    **options) -> MemoryEstimate:
    """The bytes `decompose(model, tokens, components, **options)` needs, without running the
    model, for the chunk size decompose would run with (given, or the largest that fits in the
    available memory or `max_memory`, and without `max_memory` keeps a forward's transient
    memory within the results' size or `TRANSIENT_SHARE` of the free memory). For
    SAEFeatures(features=None) and levels of your own, whose counts only the clean run knows,
    the fewest components they can have. `tokens` as decompose takes them: ids [batch, pos]
    (or [pos]), or text."""
    names = set(inspect.signature(check_call).parameters) - {"model", "tokens", "components"}
    unknown = sorted(set(options) - names - {"max_memory"})
    if unknown:
        raise DepassError(f"estimate_memory: unknown options {unknown}; it takes decompose's "
                          f"options {sorted(names | {'max_memory'})}")
    max_memory = options.pop("max_memory", None)
    call = check_call(model, tokens, components, **options)
    return planned(model, call.tokens, call.mask, call.spec, call.keep, options.get("chunk_size"),
                   max_memory, n_logits=call.n_logits)
