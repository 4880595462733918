"""The papers' experiments: `presets` (every hyperparameter), `plots` (their figures), `summary`
(their results as one table). `python -m tl_depass.apd.reproduce` runs one."""
