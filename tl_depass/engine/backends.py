"""HookedTransformer and TransformerBridge differences, in one place.

The engine speaks HookedTransformer hook names. A TransformerBridge (TL 3.9, and the only model
class of TL 4.x) exposes the same points under those names as aliases of its raw names
(`blocks.0.hook_resid_pre` is `blocks.0.hook_in`); every hook point here gets ONE canonical
name, the HookedTransformer one where it has one, so nothing is recorded or overridden twice.
"""

import re
import warnings
from contextlib import contextmanager

import torch

from tl_depass.errors import DepassError, UnsupportedModelError

# The names a HookedTransformer gives its hook points; on a Bridge, the aliases we prefer.
HT_NAME = re.compile(
    r"(hook_embed|hook_pos_embed|hook_tokens|unembed\.hook_out|(embed\.ln|ln_final)\.hook_(scale|normalized)"
    r"|blocks\.\d+\.(hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out|attn_in|mlp_in"
    r"|q_input|k_input|v_input)|(ln\d(_post)?|mlp\.ln)\.hook_(scale|normalized)|attn\.hook_(q|k|v|z"
    r"|attn_scores|pattern|result|rot_q|rot_k)|mlp\.hook_(pre|pre_linear|post|mid)))"
)


def bridge_class():
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


def hooked_class():
    try:  # TL 4 removed it; there even hasattr(transformer_lens, "HookedTransformer") raises
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


class _AnyModel(type):
    def __instancecheck__(cls, obj) -> bool:
        # Not a TransformerLens class anywhere in its MRO: no model, and no need to import the
        # Bridge (beartype asks isinstance(None, Model) when it decorates, at import time).
        if not any(c.__module__.startswith("transformer_lens.") for c in type(obj).__mro__):
            return False
        return isinstance(obj, model_classes())


class Model(metaclass=_AnyModel):
    """A TransformerLens model: a HookedTransformer (TL 3.x) or a TransformerBridge (TL 3.9+,
    the only class of TL 4.x), whichever the installed version has. Use it in annotations:
    `isinstance(x, Model)` (and so beartype) checks against the installed classes, imported only
    when a check runs, so that `import tl_depass` does not import the Bridge."""


def model_classes() -> tuple[type, ...]:
    return tuple(c for c in (hooked_class(), bridge_class()) if c is not None)


# --- pretrained models: what each TransformerLens's registry knows and how it loads ----------------
# (tl_depass.models.pretrained builds the loading on these; the names below it moved there)


def registry_name(name: str) -> str | None:
    """`name` as this TransformerLens's table of pretrained models spells it, or None if the table
    lacks it (offline). 3.x: official names and their aliases (`gpt2-small`), with Hugging Face's
    old root-level ids (`gpt2`); 4.x: Hugging Face ids (`openai-community/gpt2`)."""
    if hooked_class() is not None:
        from transformer_lens.loading_from_pretrained import get_official_model_name

        try:
            return get_official_model_name(name)
        except ValueError:
            return None
    from transformer_lens.tools.model_registry import api

    return name if api.is_model_supported(name) else None


def registry_aliases() -> dict[str, str]:
    """Lower-cased alias -> official name, for a registry whose `registry_name` takes official
    names only (4.x); empty on 3.x, whose lookup reads aliases itself."""
    if hooked_class() is not None:
        return {}
    from transformer_lens.tools.model_registry.registry_io import load_model_aliases

    return {a.lower(): official for official, names in load_model_aliases().items() for a in names}


def registry_has_root_ids() -> bool:
    """Whether the registry knows Hugging Face's old root-level ids (`gpt2`; 3.x) rather than
    the organisations' ids they moved to (`openai-community/gpt2`; 4.x)."""
    return hooked_class() is not None


def remote_code_prefixes() -> tuple[str, ...]:
    """Names this TransformerLens loads with trust_remote_code=True by itself (3.x, for some
    official names); none on 4.x, which never turns it on unasked."""
    if hooked_class() is None:
        return ()
    from transformer_lens.loading_from_pretrained import NEED_REMOTE_CODE_MODELS

    return tuple(NEED_REMOTE_CODE_MODELS)


def from_pretrained(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """HookedTransformer.from_pretrained on TransformerLens 3.x (its notice that HookedTransformer
    goes away in 4.0 silenced, here only), TransformerBridge.boot_transformers on 4.x."""
    hooked = hooked_class()
    if hooked is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "HookedTransformer.* is deprecated", DeprecationWarning)
            return hooked.from_pretrained(name, device=device, dtype=dtype)
    return bridge_class().boot_transformers(name, device=device, dtype=dtype)


#: Moved to tl_depass.models.pretrained; the old names still work here, with a DeprecationWarning.
MOVED_TO_MODELS = ("HUB_MOVED", "pretrained_name", "check_no_remote_code", "load_pretrained")


def __getattr__(name: str):
    if name in MOVED_TO_MODELS:
        from tl_depass.models import pretrained

        warnings.warn(f"tl_depass.engine.backends.{name} moved to tl_depass.models.pretrained."
                      f"{name}; import it from there", DeprecationWarning, stacklevel=2)
        return getattr(pretrained, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attention_mask(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask of the padding that `model.to_tokens` added to a batch of strings."""
    from transformer_lens.utilities import get_attention_mask  # 3.9 and 4.x alike

    return get_attention_mask(model.tokenizer, tokens, model.cfg.default_prepend_bos)


def native_bridge():
    """TransformerLens 4's TL-native Bridge as (TransformerBridgeConfig, boot_native,
    convert_tl_checkpoint), or None where this TransformerLens lacks it (3.x)."""
    try:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge.sources import boot_native
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    except ImportError:
        return None
    return TransformerBridgeConfig, boot_native, convert_tl_checkpoint


def is_bridge(model: object) -> bool:
    bridge = bridge_class()
    return bridge is not None and isinstance(model, bridge)


def check_model(model: object) -> None:
    classes = [c for c in (hooked_class(), bridge_class()) if c is not None]
    if not isinstance(model, tuple(classes)):
        raise DepassError(
            f"decompose needs a {' or '.join(c.__name__ for c in classes)} from transformer_lens, "
            f"got {type(model).__name__}: wrap Hugging Face models with "
            "TransformerBridge.boot_transformers(...)"
        )


def canonical_names(model: Model) -> dict[str, str]:
    """Every hook name the model answers to -> the one name DePass uses for that hook point.
    Hook points the Bridge refuses to hook (use_attn_result off, ...) are left out."""
    gated = getattr(model, "_gated_hook_reason", None) if is_bridge(model) else None
    by_point: dict[int, list[str]] = {}
    for name, point in model.hook_dict.items():
        if gated is not None and gated(point.name or name) is not None:
            continue
        by_point.setdefault(id(point), []).append(name)
    out = {}
    for names in by_point.values():
        best = next((n for n in names if HT_NAME.fullmatch(n)), names[0])
        out |= dict.fromkeys(names, best)
    return out


def act_fn(model: Model, prefix: str):
    """The elementwise activation of the MLP at `prefix`."""
    module = model.get_submodule(prefix)
    if hasattr(module, "act_fn") and not is_bridge(model):
        return module.act_fn
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    name = model.cfg.act_fn
    if name not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"the MLP activation {name!r} of this model is not one TransformerLens knows "
            f"({sorted(SUPPORTED_ACTIVATIONS)}); DePass needs it for the MLP rules"
        )
    return SUPPORTED_ACTIVATIONS[name]


def clean_hook_value(name: str, x: torch.Tensor) -> torch.Tensor | None:
    """What a recording hook returns in the clean run. A Bridge norm whose `hook_scale` is hooked
    computes the norm itself (TL's path) instead of delegating to Hugging Face (whose RMSNorm
    runs in float32): the decomposed pass replays scales through that same path, so the clean
    run must take it too. On a HookedTransformer the clone changes nothing."""
    return x.clone() if name.endswith("hook_scale") else None


@contextmanager
def forward_as_recorded(model: Model):
    """Inside: a Bridge over a Hugging Face model computes attention eagerly, so that adapters
    that delegate attention to HF (OPT) fire `hook_pattern`; the Bridge's notice that hooked norm
    scales take TL's norm path (which DePass wants, see clean_hook_value) is silenced; norms
    without a weight or bias (OLMo's LayerNorm) apply none on that path (`weightless_norms`)."""
    hf = getattr(model, "original_model", None) if is_bridge(model) else None
    before = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(hf, "set_attn_implementation")
    norms = weightless_norms(model) if hf is not None else []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "A forward hook edited hook_scale")
        if switch:
            hf.set_attn_implementation("eager")
        try:
            for norm in norms:
                norm.__dict__["_apply_weight_and_bias"] = _no_weight_or_bias
            yield
        finally:
            for norm in norms:
                norm.__dict__.pop("_apply_weight_and_bias", None)
            if switch:
                hf.set_attn_implementation(before)


def _no_weight_or_bias(hidden_states: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    return hidden_states.to(input_dtype)  # as TransformerLens's own LayerNormPreBridge


def weightless_norms(model: Model) -> list[torch.nn.Module]:
    """A Bridge's norms over a Hugging Face norm with neither weight nor bias (OLMo's LayerNorm).
    With `hook_scale` hooked, TransformerLens (3.9, 4.3) computes the norm itself and then reads a
    `weight` they lack (AttributeError); the Hugging Face module applies none."""
    try:
        from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
    except ImportError:
        return []
    return [m for m in model.modules() if type(m) is NormalizationBridge
            and (original := m._modules.get("_original_component")) is not None
            and getattr(original, "weight", None) is None and getattr(original, "bias", None) is None
            and "_apply_weight_and_bias" not in m.__dict__]
