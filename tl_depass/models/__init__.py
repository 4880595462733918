"""Small trained TransformerLens models with known mechanisms, shipped inside the package.

    model = tl_depass.models.load("induction")       # HookedTransformer on TL 3.x
    batch = tl_depass.tasks.generate("induction", 32)
    model.to_str_tokens(batch.tokens[0])

Each model is a `<name>.safetensors` (HookedTransformer state dict, parameters only) and a
`<name>.json` (config fields, vocabulary, task, training settings, measured held-out accuracy).
`python -m tl_depass.models.train` rebuilds them.
"""

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from tl_depass.errors import DepassError

HERE = Path(__file__).parent
BUNDLED = ("induction", "recall", "ioi")
Backend = Literal["auto", "hooked", "bridge"]


def names() -> list[str]:
    """The bundled models (each named after the task it solves, see `tl_depass.tasks`)."""
    return [n for n in BUNDLED if (HERE / f"{n}.json").exists()]


def find(name_or_path: str | Path) -> tuple[Path, Path]:
    """The (.json, .safetensors) pair for a bundled name or a path to either file."""
    if str(name_or_path) in BUNDLED:
        base = HERE / str(name_or_path)
    else:
        path = Path(name_or_path)
        if path.suffix not in (".json", ".safetensors"):
            raise DepassError(f"unknown model {str(name_or_path)!r}: bundled models are {names()}; "
                              "or pass the path of a .json or .safetensors file written by "
                              "`python -m tl_depass.models.train`")
        base = path.with_suffix("")
    pair = base.with_suffix(".json"), base.with_suffix(".safetensors")
    missing = [str(p) for p in pair if not p.exists()]
    if missing:
        raise DepassError(f"model {str(name_or_path)!r}: expected a config and weights side by "
                          f"side, {pair[0].name} and {pair[1].name}; missing: {missing}")
    return pair


def info(name_or_path: str | Path) -> dict:
    """The model's JSON record: config, vocab, task, training, accuracy, mechanism."""
    with open(find(name_or_path)[0]) as f:
        return json.load(f)


def describe(name: str) -> str:
    """One paragraph: architecture, task, mechanism, held-out accuracy."""
    meta = info(name)
    c = meta["config"]
    blocks = "attention-only" if c.get("attn_only") else f"d_mlp {c['d_mlp']} ({c['act_fn']})"
    norm = c.get("normalization_type") or "no norm"
    acc = meta["accuracy"]
    from tl_depass.tasks import TASKS

    task = TASKS.get(meta["task"], meta["task"])
    return (f"{name}: {c['n_layers']}-layer {blocks} transformer, d_model {c['d_model']}, "
            f"{c['n_heads']} heads of d_head {c['d_head']}, {norm}, learned positions, "
            f"vocabulary of {c['d_vocab']} words. Task ({meta['task']}): {task}. Mechanism: "
            f"{meta['mechanism']} Held-out accuracy {acc['held_out']:.1%} on {acc['n']} prompts "
            f"(tasks.generate seed {acc['seed']}; trained {meta['train']['steps']} steps, seed "
            f"{meta['train']['seed']}).")


@functools.cache
def tokenizer_dir(vocab: tuple[str, ...]) -> str:
    """A word-level tokenizer for `vocab`, saved to a temporary folder (TransformerLens reloads
    tokenizers by path to add BOS handling)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<pad>", eos_token="<bos>")
    path = tempfile.mkdtemp(prefix="tl_depass_tokenizer_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    fast.save_pretrained(path)
    return path


def tokenizer(vocab: list[str]):
    """An offline word-level tokenizer: one token per whitespace-separated word."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(tuple(vocab)))


def has_hooked() -> bool:
    try:  # TL 4.x raises ImportError on the attribute itself
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def load(name_or_path: str | Path, *, backend: Backend = "auto", dtype: torch.dtype = torch.float32):
    """A bundled model by name (see `names()`), or a model from a path to its .json/.safetensors
    pair, with its word-level tokenizer attached (`model.to_tokens("t1 t2")` prepends "<bos>").

    backend: "hooked" (HookedTransformer, TransformerLens 3.x), "bridge" (a TL-native
    TransformerBridge), "auto" (hooked where TransformerLens has it, else bridge)."""
    if backend not in ("auto", "hooked", "bridge"):
        raise DepassError(f"backend must be 'auto', 'hooked' or 'bridge', got {backend!r}")
    meta_path, weights_path = find(name_or_path)
    meta = info(meta_path)
    state = {k: v.to(dtype) for k, v in load_file(str(weights_path)).items()}
    if backend == "auto":
        backend = "hooked" if has_hooked() else "bridge"
    if backend == "hooked":
        if not has_hooked():
            raise DepassError("backend='hooked' needs TransformerLens 3.x (HookedTransformer was "
                              "removed in 4.0); use backend='bridge'")
        model = load_hooked(meta, state, dtype)
    else:
        model = load_bridge(meta, state, dtype)
    return model.eval()


def load_hooked(meta: dict, state: dict, dtype: torch.dtype):
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**meta["config"], dtype=dtype)
    with warnings.catch_warnings():  # TL 3.x announces HookedTransformer's removal in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    result = model.load_state_dict(state, strict=False)
    buffers = [k for k in result.missing_keys if not k.endswith((".mask", ".IGNORE"))]
    if buffers or result.unexpected_keys:
        raise DepassError(f"weights do not match the config: missing {buffers}, unexpected "
                          f"{result.unexpected_keys}")
    model.set_tokenizer(tokenizer(meta["vocab"]), default_padding_side="right")
    return model


def load_bridge(meta: dict, state: dict, dtype: torch.dtype):
    try:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge.sources import boot_native
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    except ImportError as e:
        raise DepassError(f"backend='bridge' needs a TransformerLens with TL-native bridges and "
                          f"convert_tl_checkpoint (4.x); this one lacks them ({e}). Use "
                          "backend='hooked'") from None
    c = meta["config"]
    cfg = TransformerBridgeConfig(
        d_model=c["d_model"], n_layers=c["n_layers"], d_mlp=c.get("d_mlp") or 4 * c["d_model"],
        d_head=c["d_head"], n_heads=c["n_heads"], n_ctx=c["n_ctx"], d_vocab=c["d_vocab"],
        act_fn=c.get("act_fn") or "relu", attn_only=c.get("attn_only", False),
        normalization_type=c.get("normalization_type"), positional_embedding_type="standard",
        architecture="TransformerLensNative")
    bridge = boot_native(cfg, tokenizer=tokenizer(meta["vocab"]), dtype=dtype)
    converted = convert_tl_checkpoint(state, cfg)
    result = bridge.load_state_dict(converted, strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise DepassError(f"bridge weights do not match: missing {result.missing_keys}, "
                          f"unexpected {result.unexpected_keys}")
    return bridge


__all__ = ["describe", "info", "load", "names"]
