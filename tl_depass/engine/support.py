"""Which TransformerLens configurations DePass decomposes exactly, as data."""

from collections.abc import Callable

from tl_depass.errors import UnsupportedModelError

SUPPORTED = (
    "normalization: LN, LNPre, RMS, RMSPre or none (also pre+post RMS norms, solu_ln); "
    "positions: standard, rotary, shortformer, alibi; attention: MHA or GQA, local, softcapped, "
    "QK-norm, sinks; MLP: plain or gated with any elementwise activation, parallel attn+MLP, "
    "attn_only; final logit softcap; processed weights (fold_ln, centering, folded value biases)"
)

# (what is unsupported, test on the config, why)
UNSUPPORTED: list[tuple[str, Callable, str]] = [
    ("num_experts", lambda c: bool(getattr(c, "num_experts", None)),
     "mixture-of-experts routing is not frozen"),
    ("clip_qkv", lambda c: getattr(c, "clip_qkv", None) is not None,
     "clamping v after hook_v is a nonlinearity DePass does not replay"),
    ("load_in_4bit", lambda c: bool(getattr(c, "load_in_4bit", False)),
     "4-bit quantised weights"),
    ("original_architecture in (Olmo2ForCausalLM, Olmo3ForCausalLM)",
     lambda c: getattr(c, "original_architecture", None) in ("Olmo2ForCausalLM", "Olmo3ForCausalLM"),
     "OLMo 2/3 post-norm blocks are untested"),
    ("positional_embedding_type not in (standard, rotary, shortformer, alibi)",
     lambda c: c.positional_embedding_type not in ("standard", "rotary", "shortformer", "alibi"),
     "relative position biases are untested"),
]


def check_supported(cfg) -> None:
    """Raise one UnsupportedModelError listing every unsupported setting of `cfg`."""
    problems = [f"{name} ({why})" for name, test, why in UNSUPPORTED if test(cfg)]
    if problems:
        raise UnsupportedModelError(
            "DePass cannot decompose this model exactly: " + "; ".join(problems)
            + f". Supported: {SUPPORTED}."
        )
