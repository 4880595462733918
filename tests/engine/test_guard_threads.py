"""Calls on one model from several threads are serialised: each gives the single-threaded result.

TransformerLens hooks live on the model's modules, not on a thread, so two unserialised calls on
one model run each other's hooks (wrong logits, or shape errors inside the forward)."""

import sys
import threading

import pytest
import torch

import tl_depass
from tl_depass import compare
from tl_depass.engine import replay
from tl_depass.engine.backends import bridge_class
from tl_depass.engine.guard import model_lock

THREADS, CALLS = 4, 4


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.fixture(autouse=True)
def frequent_switches():
    """Switch threads every few microseconds (not every 5 ms) so that unserialised calls
    interleave inside their forwards reliably."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def run_together(work, n: int = THREADS, timeout: float = 300) -> tuple[dict, list]:
    """`work(i, j)` for j < CALLS in each of `n` threads, all released at once by a barrier."""
    barrier = threading.Barrier(n)
    results, errors = {}, []

    def worker(i):
        try:
            barrier.wait()
            for j in range(CALLS):
                results[i, j] = work(i, j)
        except Exception as e:  # noqa: BLE001 (reported by the test below)
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread is still running: deadlock?"
    return results, errors


@pytest.fixture
def models():
    return pytest.importorskip("tiny")  # skips where TransformerLens has no HookedTransformer


def check_results(results: dict, errors: list, expected: dict) -> None:
    assert not errors, f"{len(errors)} calls raised, e.g. {errors[0]}"
    for key, want in expected.items():
        torch.testing.assert_close(results[key], want, rtol=0, atol=0,
                                   msg=lambda m, key=key: f"thread {key[0]} call {key[1]}: {m}")


def calls(model, tokens: list):
    """Call j of thread i: decompose, or attribute by either method, on that thread's tokens."""

    def work(i, j):
        kind = j % 3
        if kind == 0:
            return tl_depass.decompose(model, tokens[i], keep=["blocks.1.hook_resid_mid"]).results
        method, rule = ("backward", "ratio") if kind == 1 else ("forward", "softmax")
        return tl_depass.attribute(model, tokens[i], tl_depass.Heads(), answer=3, wrong=5,
                                   mlp_rule=rule, method=method).scores
    return work


def test_threads_on_one_model_give_the_single_threaded_results(models):
    model = models.make_model()
    work = calls(model, [models.random_tokens(model, seed=10 + i) for i in range(THREADS)])
    expected = {(i, j): work(i, j) for i in range(THREADS) for j in range(CALLS)}
    check_results(*run_together(work), expected)
    assert hook_count(model) == 0, "hooks left on the model after the threads finished"


def test_threads_on_zero_ablation_give_the_single_threaded_results(models):
    model = models.make_model()
    tokens = [models.random_tokens(model, seed=10 + i) for i in range(THREADS)]

    def work(i, j):
        return compare.zero_ablation(model, tokens[i], lambda x: x[:, -1, 3].sum(), frozen=j % 2 == 0)

    expected = {(i, j): work(i, j) for i in range(THREADS) for j in range(CALLS)}
    check_results(*run_together(work), expected)
    assert hook_count(model) == 0


def test_threads_on_one_bridge_give_the_single_threaded_results():
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    bridge, _ = make_bridge("GPT2LMHeadModel")
    g = torch.Generator().manual_seed(1)
    work = calls(bridge, [torch.randint(0, 61, (2, 7), generator=g) for _ in range(THREADS)])
    expected = {(i, j): work(i, j) for i in range(THREADS) for j in range(CALLS)}
    own = hook_count(bridge)  # the Bridge's own hooks on its Hugging Face model, added by now
    check_results(*run_together(work), expected)
    assert hook_count(bridge) == own, "hooks left on the Bridge after the threads finished"


def test_different_models_are_not_serialised_together(models):
    a, b = models.make_model(), models.make_model(seed=1)
    tokens = models.random_tokens(b)
    done = threading.Event()
    with model_lock(a):  # a call on `a` in progress must not hold up a call on `b`
        t = threading.Thread(target=lambda: (tl_depass.decompose(b, tokens), done.set()))
        t.start()
        t.join(120)
    assert done.is_set(), "decompose on another model waited for this model's lock"


def test_the_lock_is_reentrant_and_weak(models):
    import gc
    import weakref

    model = models.make_model()
    with model_lock(model), model_lock(model):  # attribute -> decompose re-enters
        tl_depass.attribute(model, models.random_tokens(model), answer=3, method="forward")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "the lock table keeps the model alive"


def test_an_exception_mid_pass_leaves_no_hooks_and_releases_the_lock(models, monkeypatch):
    model = models.make_model()
    tokens = models.random_tokens(model)
    want = tl_depass.decompose(model, tokens).logits

    class Boom(Exception):
        pass

    def boom(*args):
        raise Boom

    with monkeypatch.context() as m:
        m.setattr(replay, "attend", boom)
        with pytest.raises(Boom):
            tl_depass.decompose(model, tokens)
    assert hook_count(model) == 0, "DePass hooks were left behind after the exception"
    out = {}
    t = threading.Thread(target=lambda: out.update(logits=tl_depass.decompose(model, tokens).logits))
    t.start()
    t.join(120)
    assert "logits" in out, "the model's lock was not released after the exception"
    torch.testing.assert_close(out["logits"], want, rtol=0, atol=0)
