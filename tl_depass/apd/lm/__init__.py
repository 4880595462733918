"""SPD of TransformerLens models: `transformer` (the decomposition of a model's weights) and `train`
(training it), whose subcomponents `tl_depass.ParamComponents` turns into DePass components."""
