"""`tl_depass.models.load_any`: one loader for a bundled name, a model file or a pretrained name
(no test downloads: the hub is stubbed), and the old `engine.backends` names, deprecated."""

import shutil
import warnings

import pytest
import torch

import tl_depass
from tl_depass import models
from tl_depass.engine import backends
from tl_depass.models import pretrained, tasks

needs_model = pytest.mark.skipif(backends.hooked_class() is None and backends.native_bridge() is None,
                                 reason="needs HookedTransformer (TL 3.x) or a TL-native Bridge (TL 4.x)")


def logits(model, name: str) -> torch.Tensor:
    tokens = tasks.generate(models.info(name)["task"], 4, seed=0).tokens
    with torch.no_grad():
        return model(tokens)


@needs_model
def test_a_bundled_model_loads_as_models_load_does():
    model = models.load_any("ioi", dtype=torch.float64)
    assert isinstance(model, backends.Model) and model.cfg.dtype == torch.float64
    torch.testing.assert_close(logits(model, "ioi"), logits(models.load("ioi", dtype=torch.float64), "ioi"))


@needs_model
def test_a_saved_model_file_loads_from_either_path(tmp_path):
    config, weights = models.find("recall")
    for source in (config, weights):
        shutil.copy(source, tmp_path / f"mine{source.suffix}")
    expected = logits(models.load("recall"), "recall")
    for path in (tmp_path / "mine.json", str(tmp_path / "mine.safetensors")):
        assert pretrained.is_local(path)
        torch.testing.assert_close(logits(models.load_any(path), "recall"), expected)


def test_an_unknown_name_names_every_kind_of_model():
    with pytest.raises(tl_depass.DepassError, match=r"unknown model 'no-such-model-xyz'.*induction.*"
                                                   r"\.json/\.safetensors.*gpt2"):
        models.load_any("no-such-model-xyz")


@needs_model
def test_a_pretrained_name_is_resolved_then_loaded_offline_checked(monkeypatch):
    asked, downloaded = [], models.load("induction")  # stands in for the hub's model
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(pretrained, "load_pretrained",
                        lambda name, **settings: asked.append((name, settings)) or downloaded)
    with pytest.raises(tl_depass.DepassError, match="no network.*HF_HUB_OFFLINE=1"):
        models.load_any("gpt2-small")
    assert asked == []
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: True)
    assert models.load_any("gpt2-small", dtype=torch.float64) is downloaded
    assert asked == [(pretrained.pretrained_name("gpt2"), {"device": "cpu", "dtype": torch.float64})]


def test_the_old_backends_names_still_work_with_a_deprecation_warning():
    for name in backends.MOVED_TO_MODELS:
        with pytest.warns(DeprecationWarning, match=f"backends.{name} moved to tl_depass.models"):
            assert getattr(backends, name) is getattr(pretrained, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from tl_depass.engine.backends import pretrained_name
    assert pretrained_name is models.pretrained_name
    with pytest.raises(AttributeError):
        backends.no_such_name  # noqa: B018
