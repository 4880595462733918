"""Loading files never runs code, and a damaged file raises a DepassError naming it (issue 13).

Model JSONs pass only allow-listed, type-checked config fields to TransformerLens; APD
checkpoints are read with `weights_only=True`; everything else is safetensors or JSON.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_depass import models
from tl_depass.apd.configs import TMSConfig
from tl_depass.apd.experiments.presets import preset, shortened
from tl_depass.apd.lm.transformer import ParamDecomposition
from tl_depass.apd.spd import SPD
from tl_depass.apd.targets import make_target
from tl_depass.apd.train import CHECKPOINT_NAME, train
from tl_depass.app import cli
from tl_depass.engine.backends import hooked_class, native_bridge
from tl_depass.errors import DepassError

HERE = Path(models.__file__).parent


needs_model = pytest.mark.skipif(hooked_class() is None and native_bridge() is None,
                                 reason="needs HookedTransformer (TL 3.x) or a TL-native Bridge (TL 4.x)")


def copy_pair(tmp_path: Path, name: str, stem: str = "model") -> tuple[Path, Path]:
    """A copy of a bundled .json/.safetensors pair in tmp_path, as `stem`.json/.safetensors."""
    pair = tmp_path / f"{stem}.json", tmp_path / f"{stem}.safetensors"
    shutil.copy(HERE / f"{name}.json", pair[0])
    shutil.copy(HERE / f"{name}.safetensors", pair[1])
    return pair


def with_config(path: Path, **changes) -> None:
    """Rewrite the model JSON at `path` with config fields changed (None: removed)."""
    meta = json.loads(path.read_text())
    meta["config"] = {k: v for k, v in {**meta["config"], **changes}.items() if v is not None}
    path.write_text(json.dumps(meta))


# --- model JSON: only allow-listed config fields reach TransformerLens ---------------------------


@needs_model
def test_remote_code_config_is_refused_and_no_tokenizer_is_fetched(tmp_path, monkeypatch):
    import transformers

    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise RuntimeError("AutoTokenizer.from_pretrained must not be called")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    config, _ = copy_pair(tmp_path, "recall")
    with_config(config, tokenizer_name="attacker/remote-code-tokenizer", trust_remote_code=True)
    with pytest.raises(DepassError, match=r"model\.json: config keys \['tokenizer_name', "
                                          r"'trust_remote_code'\] are not allowed.*'n_layers'"):
        models.load(config)
    assert cli.main(["explain", "--model", str(config), "--quiet", "--no-report"]) == 1
    assert calls == []


@needs_model
@pytest.mark.parametrize("key, value, message", [
    ("d_model", "64", "'d_model' must be a positive integer, got '64'"),
    ("n_layers", True, "'n_layers' must be a positive integer, got True"),
    ("n_heads", 0, "'n_heads' must be a positive integer, got 0"),
    ("d_mlp", 25.5, "'d_mlp' must be a positive integer or null, got 25.5"),
    ("attn_only", "no", "'attn_only' must be true or false"),
    ("eps", -1.0, "'eps' must be a positive number, got -1.0"),
    ("normalization_type", "layernorm", r"'normalization_type' must be one of \['LN', 'LNPre'"),
    ("act_fn", "tanh", r"'act_fn' must be one of \['relu'"),
    ("positional_embedding_type", "learned", r"must be one of \['standard', 'rotary'"),
    ("device", "cuda", r"config keys \['device'\] are not allowed"),
])
def test_bad_config_values_are_refused_naming_the_key(tmp_path, key, value, message):
    config, _ = copy_pair(tmp_path, "recall")
    with_config(config, **{key: value})
    with pytest.raises(DepassError, match=message):
        models.load(config)


@needs_model
def test_model_json_that_is_damaged_or_incomplete_is_refused(tmp_path):
    config, _ = copy_pair(tmp_path, "recall")
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(DepassError, match=r"model config .*model\.json is not valid JSON"):
        models.load(config)
    config.write_text("[1, 2]")
    with pytest.raises(DepassError, match="holds a JSON list, not an object"):
        models.load(config)
    config.write_text(text)
    with_config(config, d_head=None)
    with pytest.raises(DepassError, match=r"config lacks \['d_head'\]"):
        models.load(config)
    meta = json.loads(text)
    del meta["vocab"]
    config.write_text(json.dumps(meta))
    with pytest.raises(DepassError, match=r"model\.json lacks \['vocab'\]"):
        models.load(config)
    meta = json.loads(text)
    config.write_text(json.dumps({**meta, "vocab": meta["vocab"][:-1]}))
    with pytest.raises(DepassError, match="'vocab' has 66 words but config d_vocab is 67"):
        models.load(config)


@needs_model
def test_weights_that_are_truncated_or_do_not_fit_the_config_are_refused(tmp_path):
    config, weights = copy_pair(tmp_path, "recall")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DepassError, match=r"model weights .*model\.safetensors is not a readable "
                                          "safetensors file"):
        models.load(config)
    state = load_file(str(HERE / "recall.safetensors"))
    del state["blocks.1.mlp.b_out"]
    save_file(state, str(weights))
    with pytest.raises(DepassError, match=r"model\.safetensors do not match the config in "
                                          r"model\.json( \(bridge names\))?: missing blocks\.1\.mlp\."):
        models.load(config)
    state = load_file(str(HERE / "recall.safetensors"))
    state["blocks.0.mlp.W_out"] = state["blocks.0.mlp.W_out"][:-1]
    save_file(state, str(weights))
    with pytest.raises(DepassError, match=r"model\.safetensors do not match.*wrong shapes "
                                          r"blocks\.0\.mlp\.(W_out|out\.weight)"):
        models.load(config)
    with_config(config, d_mlp=128)  # the config disagrees with intact weights
    shutil.copy(HERE / "recall.safetensors", weights)
    with pytest.raises(DepassError, match=r"model\.safetensors do not match.*wrong shapes"):
        models.load(config)


@needs_model
def test_every_allowed_field_of_a_llama_style_model_loads(tmp_path):
    """The allow-list is wide enough for a GPT-2/Llama-style model: RMS norm, rotary positions,
    gated MLP, grouped-query attention, written by HookedTransformer and loaded back."""
    if hooked_class() is None:
        pytest.skip("writing the weights needs HookedTransformer (TL 3.x)")
    from tiny import LLAMA_LIKE, make_model  # tests/tiny.py

    model = make_model(dtype=torch.float32, **dict(LLAMA_LIKE, d_vocab=20, eps=1e-6, rotary_base=500))
    config = {k: getattr(model.cfg, k) for k in (*LLAMA_LIKE, "eps", "rotary_base")}
    vocab = ["<bos>", "<pad>", *(f"w{i}" for i in range(18))]
    (tmp_path / "llama.json").write_text(json.dumps({"config": config, "vocab": vocab}))
    save_file({k: v.contiguous() for k, v in model.named_parameters()},
              str(tmp_path / "llama.safetensors"))
    loaded = models.load(tmp_path / "llama.json", backend="hooked")
    tokens = torch.tensor([[0, 5, 7, 3, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))


# --- APD checkpoints: weights_only=True ----------------------------------------------------------


class Payload:
    """Unpickled without weights_only, this calls open(marker, "w"): the file appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def resume(run_dir: Path):
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=4))
    cfg = shortened(preset("tms-5-2", "spd"), steps=4, batch_size=8).method
    return train(SPD(target, cfg), target.sample, cfg.optim, 5, run_dir, progress="none")


def test_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"objective": {}, "step": 3, "history": [Payload(marker)]}, run_dir / CHECKPOINT_NAME)
    with pytest.raises(DepassError, match=r"checkpoint .*run/checkpoint\.pt cannot be loaded: it "
                                          r"holds something other than tensors.*open"):
        resume(run_dir)
    assert not marker.exists(), "the checkpoint's pickle payload ran"


def test_checkpoint_truncated_or_foreign_is_refused_naming_the_file(tmp_path):
    resume(tmp_path)  # writes a real checkpoint at the end
    path = tmp_path / CHECKPOINT_NAME
    data = path.read_bytes()
    for damaged in (data[: len(data) // 2], b"", b"not a checkpoint at all" * 8):
        path.write_bytes(damaged)
        with pytest.raises(DepassError, match=r"checkpoint .*checkpoint\.pt cannot be loaded"):
            resume(tmp_path)
    torch.save([1, 2, 3], path)
    with pytest.raises(DepassError, match="holds a list, not a dict"):
        resume(tmp_path)
    torch.save({"step": 2}, path)
    with pytest.raises(DepassError, match=r"checkpoint .*checkpoint\.pt lacks \['objective'"):
        resume(tmp_path)


# --- saved ParamDecompositions: JSON + safetensors ----------------------------------------------


def test_saved_decomposition_that_is_damaged_is_refused_naming_the_file(tmp_path):
    config, weights = copy_pair(tmp_path, "recall_spd", "dec")
    assert ParamDecomposition.load(config).names[0] == "blocks.0.mlp.W_in"  # the intact copy
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(DepassError, match=r"dec\.safetensors is not a readable safetensors file"):
        ParamDecomposition.load(config)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(DepassError, match=r"dec\.safetensors is not a readable safetensors file"):
        ParamDecomposition.load(config)
    shutil.copy(HERE / "recall_spd.safetensors", weights)
    text = config.read_text()
    config.write_text(text[:100])
    with pytest.raises(DepassError, match=r"dec\.json is not valid JSON"):
        ParamDecomposition.load(config)
    record = json.loads(text)
    del record["sites"][1]["d_in"]
    config.write_text(json.dumps(record))
    with pytest.raises(DepassError, match=r"site 1 has missing or invalid \['d_in'\]"):
        ParamDecomposition.load(config)
    record = json.loads(text)
    record["sites"][0]["C"] = 32
    config.write_text(json.dumps(record))
    with pytest.raises(DepassError, match="same positive C and ci_hidden"):
        ParamDecomposition.load(config)


def test_saved_decomposition_whose_tensors_do_not_fit_is_refused(tmp_path):
    config, weights = copy_pair(tmp_path, "recall_spd", "dec")
    state = load_file(str(weights))
    del state["sites.blocks__1__attn__W_O.weight"]
    save_file(state, str(weights))
    with pytest.raises(DepassError, match=r"dec\.safetensors do not match the sites in dec\.json: "
                                          r"missing sites\.blocks__1__attn__W_O\.weight"):
        ParamDecomposition.load(config)
    state = load_file(str(HERE / "recall_spd.safetensors"))
    state["sites.blocks__0__mlp__W_in.V"] = state["sites.blocks__0__mlp__W_in.V"][:, :10].contiguous()
    save_file(state, str(weights))
    with pytest.raises(DepassError, match=r"wrong shapes sites\.blocks__0__mlp__W_in\.V \(64, 10\)"):
        ParamDecomposition.load(config)
