"""TransformerLens hook names, built in one place (HookedTransformer spelling; `backends` maps a
TransformerBridge's names onto it)."""


def block_hook(layer: int, name: str) -> str:
    """The hook `name` of block `layer`: `block_hook(3, "attn.hook_z")` is `blocks.3.attn.hook_z`."""
    return f"blocks.{layer}.{name}"


def resid_pre(layer: int) -> str:
    return block_hook(layer, "hook_resid_pre")


def resid_post(layer: int) -> str:
    return block_hook(layer, "hook_resid_post")


def attn_z(layer: int) -> str:
    return block_hook(layer, "attn.hook_z")


def mlp_out(layer: int) -> str:
    return block_hook(layer, "hook_mlp_out")


def attn_out(layer: int) -> str:
    return block_hook(layer, "hook_attn_out")
