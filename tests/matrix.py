"""The architecture matrix: every TransformerLens setting DePass supports, as config overrides."""

MATRIX = {
    "gpt2_ln": {},
    "ln_pre": dict(normalization_type="LNPre"),
    "rms": dict(normalization_type="RMS"),
    "rms_pre": dict(normalization_type="RMSPre"),
    "no_norm": dict(normalization_type=None),
    "rotary": dict(positional_embedding_type="rotary", rotary_dim=4),
    "shortformer": dict(positional_embedding_type="shortformer"),
    "alibi": dict(positional_embedding_type="alibi"),
    "llama_gqa": dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4,
                      gated_mlp=True, act_fn="silu", n_key_value_heads=2, final_rms=True),
    "qwen3_qk_norm": dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4,
                          gated_mlp=True, act_fn="silu", n_key_value_heads=2, use_qk_norm=True),
    "gated_gelu": dict(gated_mlp=True, act_fn="gelu"),
    "parallel": dict(parallel_attn_mlp=True),
    "attn_only": dict(attn_only=True),
    "gemma2": dict(normalization_type="RMS", use_normalization_before_and_after=True,
                   attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0, gated_mlp=True,
                   act_fn="gelu_pytorch_tanh", positional_embedding_type="rotary", rotary_dim=4,
                   n_key_value_heads=2),
    "solu_ln": dict(act_fn="solu_ln"),
    "relu": dict(act_fn="relu"),
    "gelu": dict(act_fn="gelu"),
    "silu": dict(act_fn="silu"),
    "attn_result_split_qkv_mlp_in": dict(use_attn_result=True, use_split_qkv_input=True,
                                         use_hook_mlp_in=True),
    "local_attn": dict(use_local_attn=True, attn_types=["global", "local"], window_size=3),
}

# Weight processing TransformerLens applies to pretrained models (process_weights_ also folds
# the value biases into b_O), applied after randomising.
PROCESSED = dict(fold_ln=True, center_writing_weights=True, center_unembed=True)
