"""Loading any model the command line can name: a bundled model, a model file, or a
TransformerLens pretrained model from the Hugging Face hub.

    model = tl_depass.models.load_any("ioi")                   # bundled
    model = tl_depass.models.load_any("runs/my_model.json")    # written by models.train
    model = tl_depass.models.load_any("gpt2")                  # downloads (needs network)

Every difference between TransformerLens 3.x and 4.x is asked of `tl_depass.engine.backends`.
Nothing here runs code from the hub (see docs/trusted_files.md).
"""

import os
import socket
from pathlib import Path

import torch

from tl_depass.engine import backends
from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError

#: Hugging Face moved its root-level model ids into organisations (the hub still redirects the old
#: ids). TransformerLens 3 knows the old ids, TransformerLens 4's registry only the new ones.
HUB_MOVED = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
             "distilgpt2": "distilbert/distilgpt2"}


def pretrained_name(name: str) -> str | None:
    """The id this TransformerLens loads the pretrained model `name` under, or None if it knows
    no such model (checked offline). Short names and TransformerLens aliases are accepted on
    every version: `gpt2`, `gpt2-small` and `openai-community/gpt2` are the same model."""
    if backends.registry_has_root_ids():
        moved_back = {new.lower(): old for old, new in HUB_MOVED.items()}
        return backends.registry_name(moved_back.get(name.lower(), name))
    official = backends.registry_aliases().get(name.lower(), name)
    return backends.registry_name(HUB_MOVED.get(official.lower(), official))


def check_no_remote_code(name: str) -> None:
    """Refuse a pretrained model that TransformerLens 3.x would load with trust_remote_code=True
    (it turns that on by itself for some official names), which runs the repository's Python
    code. TransformerLens 4 never turns it on unasked, and tl_depass never asks."""
    if name.startswith(backends.remote_code_prefixes()):
        raise DepassError(
            f"TransformerLens loads {name} with trust_remote_code=True, which runs Python code from "
            "its hub repository; tl_depass never does. If you trust it, load it yourself "
            "(HookedTransformer.from_pretrained(..., trust_remote_code=True)) and pass the model")


def load_pretrained(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """HookedTransformer.from_pretrained on TransformerLens 3.x, TransformerBridge on 4.x; `name`
    as resolved by `pretrained_name`. Downloads from the Hugging Face hub; never runs code from it."""
    check_no_remote_code(name)
    return backends.from_pretrained(name, device=device, dtype=dtype)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (always True with HF_HUB_OFFLINE set: the cache is
    used). Checked first because an unreachable hub costs ~30 s of retries before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return True
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def is_local(spec: str | Path) -> bool:
    """Whether `spec` names a bundled model or a model file (else: a pretrained name)."""
    from tl_depass.models import names

    return str(spec) in names("all") or Path(spec).suffix in (".json", ".safetensors")


def load_any(spec: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """A bundled model (`tl_depass.models.names()`), a model from a path to its .json/.safetensors
    pair, or a TransformerLens pretrained model (a Hugging Face id such as openai-community/gpt2,
    or a short name such as gpt2; downloaded from the hub). Raises a DepassError naming the fix
    when `spec` is none of these or the hub cannot be reached."""
    from tl_depass.models import load, names

    if is_local(spec):
        model = load(spec, dtype=dtype)
        return model if torch.device(device) == torch.device("cpu") else model.to(device)
    name = str(spec)
    bundled = ", ".join(names("all"))
    official = pretrained_name(name)
    if official is None:
        raise DepassError(f"unknown model {name!r}: not a bundled model ({bundled}), not a path "
                          "to a .json/.safetensors model, and not a pretrained model "
                          "TransformerLens knows (a Hugging Face id such as openai-community/gpt2, "
                          "or a TransformerLens short name such as gpt2 or pythia-70m)")
    check_no_remote_code(official)
    if not hub_reachable():
        raise DepassError(f"{name!r} is a TransformerLens pretrained model: its weights come from "
                          "the Hugging Face hub, which this machine cannot reach (no network). Set "
                          "HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache, or use "
                          f"a bundled model: {bundled}")
    try:
        return load_pretrained(official, device=device, dtype=dtype)
    except DepassError:
        raise
    except Exception as e:  # offline: OSError, requests/httpx errors, HF hub errors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DepassError(f"could not load the pretrained model {name!r}: TransformerLens downloads "
                          f"its weights from the Hugging Face hub, which needs network access "
                          f"({type(e).__name__}: {first}). Offline, use a bundled model: "
                          f"{bundled}") from None


__all__ = ["HUB_MOVED", "check_no_remote_code", "hub_reachable", "is_local", "load_any",
           "load_pretrained", "pretrained_name"]
