"""The machinery of the bad-input probe (tests/engine/test_validate.py): the models the cases use,
short calls into the public API, and how an outcome is classified."""

import copy
import io
import os
import re
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import cached_property

import torch

import tl_depass
from tl_depass import DepassError, Heads, Split, models, tasks
from tl_depass.app import cli
from tl_depass.engine.backends import hooked_class

HOOKED = hooked_class() is not None
LIMIT = 300  # characters: a message longer than this is not a clear one


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


class Env:
    """The models and decompositions the cases use, built on first use. `model`: a tiny float64
    model with every parameter randomised (a HookedTransformer on TransformerLens 3.x, a GPT-2
    TransformerBridge on 4.x); `bundled`: the bundled `recall` model, which has a tokenizer."""

    @cached_property
    def model(self):
        if HOOKED:
            from tiny import make_model

            return make_model()
        from bridges import make_bridge

        bridge = make_bridge("GPT2LMHeadModel")[0]
        with torch.no_grad():  # the Bridge adds its own norm pre-hooks on its first forward
            bridge(torch.zeros(1, 2, dtype=torch.long))
        return bridge

    @cached_property
    def tokens(self):
        g = torch.Generator().manual_seed(1)
        return torch.randint(2, self.model.cfg.d_vocab, (2, 6), generator=g)

    @cached_property
    def dec(self):
        return tl_depass.decompose(self.model, self.tokens)

    @cached_property
    def heads(self):
        return tl_depass.decompose(self.model, self.tokens, Heads(), mlp_rule="ratio")

    @cached_property
    def bundled(self):
        return models.load("recall", dtype=torch.float64)

    @cached_property
    def prompt(self) -> str:
        batch = tasks.generate("recall", 1, seed=0)
        return " ".join(self.bundled.to_str_tokens(batch.tokens[0])[1:])

    @cached_property
    def bdec(self):
        return tl_depass.decompose(self.bundled, self.prompt, Heads(), mlp_rule="ratio")

    def clean(self, hook: str, model=None, tokens=None) -> torch.Tensor:
        """The clean activation at `hook` (any name the model answers to)."""
        model, tokens = model or self.model, self.tokens if tokens is None else tokens
        out = {}

        def grab(x, hook):
            out["x"] = x.detach().clone()

        with torch.no_grad(), model.hooks(fwd_hooks=[(hook, grab)]):
            model(tokens)
        return out["x"]

    def split(self, hook: str, **kw) -> Split:
        """A Split at `hook` into two halves that sum exactly to the clean activation there."""
        x = self.clean(hook)
        return Split(hook, torch.stack([x / 2, x - x / 2]), **kw)

    def broken(self, what: str):
        """A copy of `model` with NaN in `what`: "embed" (the token embedding) or "blocks.L."
        (layer L's first norm weight)."""
        model = copy.deepcopy(self.model)
        if not HOOKED:  # the GPT-2 Bridge's names for the same parameters
            what = "wte" if what == "embed" else f"h.{what.split('.')[1]}._original_component.ln_1"
        name, p = next((n, p) for n, p in model.named_parameters() if what in n)
        with torch.no_grad():
            p.fill_(torch.nan)
        return model


def D(env: Env, *args, **kw):
    return tl_depass.decompose(env.model, env.tokens if not args else args[0], *args[1:], **kw)


def A(env: Env, components="tokens", **kw):
    kw.setdefault("answer", 3)
    return tl_depass.attribute(env.model, kw.pop("tokens", env.tokens), components, **kw)


def R(env: Env, components="tokens", **kw):
    """attribute on the backward path (linear rule)."""
    return A(env, components, mlp_rule="ratio", method="backward", **kw)


def metric(logits):
    return logits[:, -1, 3].sum()


def run_cli(env: Env, *argv: str, tmp: str | None = None) -> None:
    """cli.main; a non-zero exit becomes a DepassError carrying what the command printed."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            code = cli.main(["explain", "--quiet", *argv])
        except SystemExit:  # argparse: its usage, then one line with the error
            raise DepassError(err.getvalue().strip().splitlines()[-1]) from None
    if code != 0:
        raise DepassError(err.getvalue().strip())


def out_dir() -> str:
    import tempfile

    path = os.path.join(tempfile.gettempdir(), "tl_depass_probe")
    os.makedirs(path, exist_ok=True)
    return path


def symlink() -> str:
    """A symlink (to a file elsewhere) as the --out target."""
    d = out_dir()
    link, target = os.path.join(d, "link.html"), os.path.join(d, "target.txt")
    open(target, "w").close()
    if not os.path.islink(link):
        os.symlink(target, link)
    return link


@dataclass
class Case:
    family: str
    what: str
    call: Callable[[Env], object]
    key: str  # a regular expression the message must contain (case-insensitive)
    hooked_only: bool = False  # needs HookedTransformer parameter names or config fields
    limit: int = LIMIT


def eps0_nan(env: Env):
    """A LayerNorm with eps = 0 on a constant residual stream: 0 / 0 in the first norm."""
    from tiny import make_model

    model = make_model(eps=0.0)
    with torch.no_grad():
        model.W_E.zero_()
        model.W_pos.zero_()
    return tl_depass.decompose(model, env.tokens)


def split_with(env: Env, value: float) -> Split:
    """A Split at blocks.0.hook_resid_pre whose halves hold `value` at one entry (twice, with
    opposite signs for finite values, so the sum check alone would not see it)."""
    s = env.split("blocks.0.hook_resid_pre")
    t = s.tensor.clone()
    t[0, 0, 0, 0] = value
    return Split(s.hook, t)


def sae(env: Env, d_sae: int, bad: float | None = None) -> tuple:
    """A ReLU SAE (W_enc, b_enc, W_dec, b_dec) for d_model."""
    g = torch.Generator().manual_seed(3)
    d = env.model.cfg.d_model
    W_enc = torch.randn(d, d_sae, generator=g, dtype=torch.float64)
    W_dec = torch.randn(d_sae, d, generator=g, dtype=torch.float64)
    if bad is not None:
        W_dec[0, 0] = bad
    return W_enc, torch.zeros(d_sae, dtype=torch.float64), W_dec, torch.zeros(d, dtype=torch.float64)


def outcome(case: Case, env: Env) -> tuple[str, str]:
    """("clear" | "silent" | "unclear", what was raised)."""
    try:
        case.call(env)
    except DepassError as e:
        msg = str(e)
        clear = len(msg) <= case.limit and re.search(case.key, msg, re.I) is not None
        return ("clear" if clear else "unclear"), msg
    except Exception as e:  # noqa: BLE001 - the probe reports any other exception as unclear
        lines = str(e).splitlines()
        return "unclear", f"{type(e).__name__} ({len(lines)} lines): {lines[0][:150] if lines else ''}"
    return "silent", ""


def table(cases: list[Case]) -> str:
    env = Env()
    rows: dict[str, list[int]] = {}
    details = []
    for case in cases:
        kind, msg = outcome(case, env)
        counts = rows.setdefault(case.family, [0, 0, 0, 0])
        counts[0] += 1
        counts[1 + ["clear", "silent", "unclear"].index(kind)] += 1
        if kind != "clear":
            details.append(f"  [{kind}] {case.family}: {case.what}: {msg[:160]!r}")
    total = [sum(r[i] for r in rows.values()) for i in range(4)]
    lines = [f"{'family':<16}{'tried':>7}{'clear':>7}{'silent':>8}{'unclear':>9}"]
    lines += [f"{f:<16}{r[0]:>7}{r[1]:>7}{r[2]:>8}{r[3]:>9}" for f, r in rows.items()]
    lines.append(f"{'total':<16}{total[0]:>7}{total[1]:>7}{total[2]:>8}{total[3]:>9}")
    return "\n".join(lines + ["", "not clear:"] + details)
