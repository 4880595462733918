"""What `tl_depass.app.explain` computes and `tl_depass.app.html` renders: the prompt explained
(`Prompt`), each level's DePass scores, patching effects and their agreement (`LevelScores`), and the
whole explanation (`Explanation`). Plain data: an Explanation saved with `torch.save` renders again
without the model."""

from dataclasses import dataclass, field

from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.validate import public_fields
from tl_depass.errors import DepassError
from tl_depass.levels.label import Label


@dataclass
class LevelScores:
    """DePass scores (each component's share of the metric) at one level, and, when a corrupted
    prompt was given, the activation patching effect of each component (metric with that clean
    activation restored in the corrupted run, minus the corrupted metric)."""

    labels: list[str]
    depass: Float[Tensor, " component"]
    patching: Float[Tensor, " component"] | None = None
    pearson: float = float("nan")
    spearman: float = float("nan")
    completeness: dict[str, float] = field(default_factory=dict)  # hook -> worst relative error
    note: str = ""  # what to keep in mind when reading the agreement
    components: list[Label] = field(default_factory=list)  # the structured labels of `labels`
    corrupted_metric: float | None = None  # the corrupted run's metric, nothing restored
    #: label -> (tokens pushed up most, pushed down most) by the top components' logits at the
    #: last position, relative to their mean over the vocabulary: [(token, value), ...]
    vocab: dict[str, tuple[list[tuple[str, float]], list[tuple[str, float]]]] | None = None

    @property
    def patched(self) -> Float[Tensor, " component"] | None:
        """The raw patched metric (what `transformer_lens.patching` returns): `patching` (the
        restoration effect) plus the corrupted metric."""
        if self.patching is None or self.corrupted_metric is None:
            return None
        return self.patching + self.corrupted_metric

    def agreement(self, note: bool = True) -> str:
        if self.patching is None:
            return "no activation patching (no corrupted prompt)"
        if self.pearson != self.pearson:
            return "n/a (fewer than 3 components)"
        return f"Pearson {self.pearson:.2f}, Spearman {self.spearman:.2f}" + (self.note if note else "")


@dataclass
class Explanation:
    """One prediction explained at each computed level (`levels`: "tokens", "heads", "modules",
    "neurons"), with the prompt, target and metric as text, ready to render."""

    model_name: str
    str_tokens: list[str]
    target: str
    wrong: str | None
    metric: float  # the clean metric: logit(target) [- logit(wrong)] at the last position
    rule: str
    tolerance: float
    corrupted: list[str] | None
    neuron_layer: int | None
    levels: dict[str, LevelScores]
    tokens_by_layer: Float[Tensor, "layer pos"] | None  # each position's share entering each layer
    tokens_patching: Float[Tensor, "layer pos"] | None  # patching each position's resid_pre
    corrupted_metric: float | None = None  # the metric on the corrupted prompt
    #: the clean attention pattern of the top heads (by |DePass share|), label -> [query, key]
    patterns: dict[str, Float[Tensor, "query_pos key_pos"]] | None = None
    head_tokens: "Breakdown | None" = None  # top heads x source tokens (direct shares)
    buildup: "Breakdown | None" = None  # source tokens' shares in the residual stream, by layer

    @property
    def metric_name(self) -> str:
        return f"logit({self.target!r})" + ("" if self.wrong is None else f" - logit({self.wrong!r})")


@dataclass
class Breakdown:
    """A table of shares of the metric: `shares[row, column]`, columns the prompt's source
    tokens, then "bias" (see `tl_depass.app.paths`)."""

    rows: list[str]
    columns: list[str]
    shares: Float[Tensor, "row column"]


@public_fields
@dataclass(frozen=True)
class Prompt:
    """What to explain: `target` (minus `wrong`) at the last position of `tokens`; `corrupted`
    (same length) turns on the activation patching comparison."""

    tokens: Int[Tensor, "1 pos"]
    target: int
    wrong: int | None = None
    corrupted: Int[Tensor, "1 corrupted_pos"] | None = None  # == pos: checked below, with the fix

    def __post_init__(self):
        if self.corrupted is not None and self.corrupted.shape != self.tokens.shape:
            raise DepassError(f"the corrupted prompt has {self.corrupted.shape[1]} tokens and the "
                              f"prompt {self.tokens.shape[1]}: activation patching needs the same "
                              "length; pad or shorten one of them, or pass corrupted=None")


def top_table(level: LevelScores, k: int = 10) -> list[tuple[str, float, float | None]]:
    """The `k` components with the largest |DePass| share: (label, share, patching effect or None)."""
    order = level.depass.abs().argsort(descending=True)[:k].tolist()
    out = []
    for i in order:
        p = None if level.patching is None else level.patching[i].item()
        out.append((level.labels[i], level.depass[i].item(), None if p != p else p))  # NaN: not patched
    return out
