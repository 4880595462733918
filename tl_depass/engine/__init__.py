"""The engine: everything between a model and its decomposed forward pass.

`backends` (TransformerLens 3 and 4, HookedTransformer and TransformerBridge), `support` (which
architectures), `arguments` and `validate` (checks at the boundary), `clean_run` (the recorded
pass), `rules` (the nonlinearity rules), `replay` (the folded decomposed forward), `frozen` (the
frozen model for the backward path), `guard` (hooks, locks), `files` (safe readers). Nothing here
imports from the levels, results or applications above it.
"""
