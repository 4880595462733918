"""tl_depass: decomposed forward pass (DePass) for TransformerLens models."""
