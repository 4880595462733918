"""Small trained TransformerLens models with known mechanisms, shipped inside the package.

    model = tl_depass.models.load("induction")       # HookedTransformer on TL 3.x
    model = tl_depass.models.load("pystdlib")        # a small model of real Python source
    model = tl_depass.models.load_any("gpt2")        # or a pretrained model (models.pretrained)
    batch = tl_depass.models.tasks.generate("induction", 32)
    model.to_str_tokens(batch.tokens[0])

Each model is a `<name>.safetensors` (HookedTransformer state dict, parameters only) and a
`<name>.json` (config fields, vocabulary, task, training settings, measured held-out accuracy).
`python -m tl_depass.models.train` rebuilds them. The text model `pystdlib` (trained on the
Python standard library by `python -m tl_depass.models.text`) has a byte-level BPE tokenizer
instead of a vocabulary: a `tokenizers` JSON file beside it, named in its JSON (TOKENIZER_KEYS).
Loading runs no code from any of these files: only allow-listed config fields reach
TransformerLens (CONFIG_FIELDS; see docs/trusted_files.md).
"""

import math
from pathlib import Path
from typing import Literal

import torch

from tl_depass.engine.backends import Model, hooked_class, native_bridge
from tl_depass.engine.files import check_tensors, read_json, read_safetensors, require_keys
from tl_depass.errors import DepassError
from tl_depass.models.pretrained import load_any, load_pretrained, pretrained_name
from tl_depass.models.tokenizing import TOKENIZER_KEYS as TOKENIZER_KEYS  # re-exported
from tl_depass.models.tokenizing import bpe_tokenizer, checked_tokenizer, tokenizer

HERE = Path(__file__).parent
TASK_MODELS = ("induction", "recall", "ioi")  # each named after its task (tl_depass.models.tasks)
TEXT_MODELS = ("pystdlib",)  # next-token models of real text (docs/models.md)
BUNDLED = TASK_MODELS + TEXT_MODELS
Backend = Literal["auto", "hooked", "bridge"]


def names(kind: Literal["task", "text", "all"] = "task") -> list[str]:
    """The bundled models: "task" (default) those trained on a task of `tl_depass.models.tasks`
    and named after it, "text" those trained on real text (`pystdlib`), "all" both."""
    if kind not in ("task", "text", "all"):
        raise DepassError(f"kind must be 'task', 'text' or 'all', got {kind!r}")
    chosen = {"task": TASK_MODELS, "text": TEXT_MODELS, "all": BUNDLED}[kind]
    return [n for n in chosen if (HERE / f"{n}.json").exists()]


def find(name_or_path: str | Path) -> tuple[Path, Path]:
    """The (.json, .safetensors) pair for a bundled name or a path to either file."""
    if str(name_or_path) in BUNDLED:
        base = HERE / str(name_or_path)
    else:
        path = Path(name_or_path)
        if path.suffix not in (".json", ".safetensors"):
            raise DepassError(f"unknown model {str(name_or_path)!r}: bundled models are {names('all')}; "
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
    return read_json(find(name_or_path)[0], "model config")


# The config fields a model JSON may set (the architecture of a small GPT-2/Llama-style model)
# and the values each takes. Nothing else reaches TransformerLens: a config is data, and fields
# such as tokenizer_name with trust_remote_code would make TransformerLens download and run a
# tokenizer's code. Absent fields take HookedTransformerConfig's defaults (DEFAULTS), on both
# backends.
COUNT, OPTIONAL_COUNT, SEED, FLAG, POSITIVE = "count", "count or null", "seed", "flag", "positive"
KINDS = {COUNT: "a positive integer", OPTIONAL_COUNT: "a positive integer or null",
         SEED: "a non-negative integer or null", FLAG: "true or false", POSITIVE: "a positive number"}
CONFIG_FIELDS: dict[str, str | tuple[str | None, ...]] = {
    "n_layers": COUNT, "d_model": COUNT, "n_heads": COUNT, "d_head": COUNT, "d_vocab": COUNT,
    "n_ctx": COUNT, "d_mlp": OPTIONAL_COUNT, "d_vocab_out": COUNT, "attn_only": FLAG,
    "act_fn": ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu"),
    "gated_mlp": FLAG, "normalization_type": ("LN", "LNPre", "RMS", "RMSPre", None),
    "final_rms": FLAG, "eps": POSITIVE,
    "positional_embedding_type": ("standard", "rotary", "shortformer", "alibi"),
    "rotary_dim": OPTIONAL_COUNT, "rotary_base": POSITIVE, "n_key_value_heads": OPTIONAL_COUNT,
    "seed": SEED,
}
REQUIRED = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx")
DEFAULTS = {"attn_only": False, "act_fn": "relu", "gated_mlp": False, "normalization_type": "LN",
            "final_rms": False, "eps": 1e-5, "positional_embedding_type": "standard"}


def _valid(kind: str | tuple, value) -> bool:
    integer = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(kind, tuple):
        return (value is None or isinstance(value, str)) and value in kind
    if kind == COUNT:
        return integer and value > 0
    if kind == OPTIONAL_COUNT:
        return value is None or (integer and value > 0)
    if kind == SEED:
        return value is None or (integer and value >= 0)
    if kind == FLAG:
        return isinstance(value, bool)
    return (integer or (isinstance(value, float) and math.isfinite(value))) and value > 0


def checked_config(meta: dict, path: Path) -> tuple[dict, list[str] | None]:
    """(config with defaults filled in, vocabulary) of a model JSON read from `path`, after
    checking every config key against CONFIG_FIELDS and the vocabulary against d_vocab. The
    vocabulary is None for a model with a BPE tokenizer file (`checked_tokenizer`), which `load`
    checks against d_vocab when it reads it."""
    bpe = checked_tokenizer(meta, path)
    require_keys(meta, ("config",) if bpe else ("config", "vocab"), path, "model config")
    config, vocab = meta["config"], meta.get("vocab")
    if not isinstance(config, dict):
        raise DepassError(f"{path}: 'config' must be a JSON object of TransformerLens config "
                          f"fields, got {type(config).__name__}")
    unknown = [k for k in config if k not in CONFIG_FIELDS]
    if unknown:
        raise DepassError(f"{path}: config keys {unknown} are not allowed; a model config may set "
                          f"only {sorted(CONFIG_FIELDS)}. Remove them (tl_depass never passes "
                          "other settings, such as tokenizer_name or trust_remote_code, to "
                          "TransformerLens)")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise DepassError(f"{path}: config lacks {missing}; a model config needs {list(REQUIRED)}")
    for key, value in config.items():
        kind = CONFIG_FIELDS[key]
        if not _valid(kind, value):
            allowed = f"one of {list(kind)}" if isinstance(kind, tuple) else KINDS[kind]
            raise DepassError(f"{path}: config {key!r} must be {allowed}, got {value!r}")
    if bpe and vocab is None:
        return {**DEFAULTS, **config}, None
    if not (isinstance(vocab, list) and all(isinstance(w, str) for w in vocab)):
        raise DepassError(f"{path}: 'vocab' must be a list of strings (one per token id)")
    if len(vocab) != config["d_vocab"]:
        raise DepassError(f"{path}: 'vocab' has {len(vocab)} words but config d_vocab is "
                          f"{config['d_vocab']}; they must agree")
    return {**DEFAULTS, **config}, vocab


def describe(name: str) -> str:
    """One paragraph: architecture, task, mechanism, held-out accuracy."""
    meta = info(name)
    c = meta["config"]
    blocks = "attention-only" if c.get("attn_only") else f"d_mlp {c['d_mlp']} ({c['act_fn']})"
    norm = c.get("normalization_type") or "no norm"
    positions = {"standard": "learned positions", "rotary": "rotary positions"}.get(
        c.get("positional_embedding_type", "standard"), f"{c.get('positional_embedding_type')} positions")
    if meta.get("task") == "text":
        held, train = meta["held_out"], meta["train"]
        return (f"{name}: {c['n_layers']}-layer {blocks} transformer, d_model {c['d_model']}, "
                f"{c['n_heads']} heads of d_head {c['d_head']}, {norm}, {positions}, context "
                f"{c['n_ctx']}, byte-level BPE vocabulary of {c['d_vocab']} tokens. Trained on "
                f"real text: {meta['corpus']['source']} (Python {meta['corpus']['python']}, "
                f"{meta['corpus']['n_files']} files; {len(meta['corpus']['held_out'])} held out). "
                f"Mechanism: {meta['mechanism']} Held-out loss {held['loss']:.3f} nats/token "
                f"(unigram baseline {held['unigram_loss']:.3f}; trained {train['steps']} steps, "
                f"seed {train['seed']}).")
    acc = meta["accuracy"]
    from tl_depass.models.tasks import TASKS

    task = TASKS.get(meta["task"], meta["task"])
    return (f"{name}: {c['n_layers']}-layer {blocks} transformer, d_model {c['d_model']}, "
            f"{c['n_heads']} heads of d_head {c['d_head']}, {norm}, {positions}, "
            f"vocabulary of {c['d_vocab']} words. Task ({meta['task']}): {task}. Mechanism: "
            f"{meta['mechanism']} Held-out accuracy {acc['held_out']:.1%} on {acc['n']} prompts "
            f"(tasks.generate seed {acc['seed']}; trained {meta['train']['steps']} steps, seed "
            f"{meta['train']['seed']}).")


def load(name_or_path: str | Path, *, backend: Backend = "auto",
         dtype: torch.dtype = torch.float32) -> Model:
    """A bundled model by name (see `names("all")`), or a model from a path to its
    .json/.safetensors pair, with its tokenizer attached: word-level for the task models
    (`model.to_tokens("t1 t2")` prepends "<bos>"), byte-level BPE for `pystdlib`
    (`model.to_tokens("def f(self):")` prepends "<|endoftext|>").

    backend: "hooked" (HookedTransformer, TransformerLens 3.x), "bridge" (a TL-native
    TransformerBridge), "auto" (hooked where TransformerLens has it, else bridge)."""
    if backend not in ("auto", "hooked", "bridge"):
        raise DepassError(f"backend must be 'auto', 'hooked' or 'bridge', got {backend!r}")
    meta_path, weights_path = find(name_or_path)
    meta = info(meta_path)
    config, vocab = checked_config(meta, meta_path)
    bpe = checked_tokenizer(meta, meta_path)
    tok = tokenizer(vocab) if bpe is None else bpe_tokenizer(*bpe, config["d_vocab"])
    state = {k: v.to(dtype) for k, v in read_safetensors(weights_path, "model weights").items()}
    if backend == "auto":
        backend = "hooked" if hooked_class() is not None else "bridge"
    if backend == "hooked":
        if hooked_class() is None:
            raise DepassError("backend='hooked' needs TransformerLens 3.x (HookedTransformer was "
                              "removed in 4.0); use backend='bridge'")
        model = load_hooked(config, tok, state, dtype, (meta_path, weights_path))
    else:
        model = load_bridge(config, tok, state, dtype, (meta_path, weights_path))
    return model.eval()


def load_hooked(config: dict, tok, state: dict, dtype: torch.dtype,
                paths: tuple[Path, Path]) -> Model:
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():  # TL 3.x announces HookedTransformer's removal in 4.0
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        try:
            model = HookedTransformer(HookedTransformerConfig(**config, dtype=dtype))
        except (AssertionError, ValueError) as e:
            raise DepassError(f"TransformerLens rejects the config in {paths[0]}: {e}") from None
    expected = {k: tuple(p.shape) for k, p in model.named_parameters()}
    check_tensors(expected, state, paths[1], f"the config in {paths[0].name}")
    model.load_state_dict(state, strict=False)  # strict would ask for the buffers (masks) too
    model.set_tokenizer(tok, default_padding_side="right")
    return model


def load_bridge(config: dict, tok, state: dict, dtype: torch.dtype,
                paths: tuple[Path, Path]) -> Model:
    native = native_bridge()
    if native is None:
        raise DepassError("backend='bridge' needs a TransformerLens with TL-native bridges and "
                          "convert_tl_checkpoint (4.x); this one lacks them. Use backend='hooked'")
    TransformerBridgeConfig, boot_native, convert_tl_checkpoint = native
    if config["positional_embedding_type"] not in ("standard", "rotary"):
        raise DepassError(f"{paths[0]}: the TL-native bridge has standard and rotary positions, not "
                          f"{config['positional_embedding_type']!r}; use backend='hooked' "
                          "(TransformerLens 3.x)")
    try:
        cfg = TransformerBridgeConfig(**{**config, "d_mlp": config.get("d_mlp") or 4 * config["d_model"]},
                                      architecture="TransformerLensNative")
        bridge = boot_native(cfg, tokenizer=tok, dtype=dtype)
        converted = convert_tl_checkpoint(state, cfg)
    except (AssertionError, ValueError) as e:  # convert_tl_checkpoint checks per-head shapes
        raise DepassError(f"TransformerLens cannot build the model of {paths[0]} with the weights "
                          f"in {paths[1]}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in bridge.state_dict().items()}
    check_tensors(expected, converted, paths[1], f"the config in {paths[0].name} (bridge names)")
    bridge.load_state_dict(converted, strict=True)
    return bridge


__all__ = ["describe", "info", "load", "load_any", "load_pretrained", "names", "pretrained_name"]
