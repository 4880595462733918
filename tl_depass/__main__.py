"""`python -m tl_depass`: a short DePass run on a small model built in code.

The bundled trained models and the `tl-depass` command come later; until then this shows the
mechanics on a random 2-layer GPT-2-shaped model (random weights: no mechanism to find).
"""

import warnings

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_depass


def small_model(seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256,
                                  d_vocab=50, n_ctx=32, act_fn="gelu_new", normalization_type="LN",
                                  seed=seed)
    with warnings.catch_warnings():  # TL 3.x announces HookedTransformer's removal in 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg).eval()
    with torch.no_grad():  # TL initialises biases to 0 and norm weights to 1: randomise them
        for name, p in model.named_parameters():
            if name.endswith((".b", "b_in", "b_out", "b_O", "b_Q", "b_K", "b_V", "b_U")):
                p.normal_(0, 0.1)
            elif name.endswith(".w"):
                p.normal_(1, 0.1)
    return model


def main() -> None:
    torch.manual_seed(0)
    model = small_model()
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 12))
    for rule in ("softmax", "ratio"):
        dec = tl_depass.decompose(model, tokens, mlp_rule=rule)
        answer = int(dec.clean["logits"][0, -1].argmax())
        scores = dec.logit_attribution(answer)[:, 0]
        print(f"\nmlp_rule={rule!r}: contributions to the top logit (token {answer}) at the last "
              f"position, {len(dec.labels)} components")
        for i in scores.abs().argsort(descending=True)[:5].tolist():
            print(f"  {dec.labels[i]:>14}  {scores[i].item():+.4f}")
        print(f"  sum of all components {scores.sum().item():+.6f} = clean logit "
              f"{dec.clean['logits'][0, -1, answer].item():+.6f}")
        worst = max(dec.completeness_error().items(), key=lambda kv: kv[1])
        print(f"  completeness: worst relative error {worst[1]:.1e} at {worst[0]} "
              f"(tolerance {tl_depass.completeness_rtol(torch.float32):.0e})")


if __name__ == "__main__":
    main()
