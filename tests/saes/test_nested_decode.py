"""The nested TopK decode (``saes/nested_decode.py``) against its specification (the naive decode)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from sae_vision_ext.saes import nested_decode
from sae_vision_ext.saes.nested_decode import naive_topk_reconstructions, nested_reconstructions

PLANS = ("below_plus_band", "above_minus_band", "dense")


def per_level(decoded, n_levels):
    """``nested_reconstructions`` returns a reconstruction shared by the top levels once: expand it."""
    assert 1 <= len(decoded) <= n_levels
    return [decoded[min(i, len(decoded) - 1)] for i in range(n_levels)]


def test_nested_decode_matches_independent_decodes_for_every_k():
    torch.manual_seed(3)
    acts = F.relu(torch.randn(33, 50) - 0.2)
    decoder = torch.randn(50, 7)
    levels = [1, 2, 5, 11, 30, 49, 50]
    fast = per_level(nested_reconstructions(acts, decoder, levels), len(levels))
    for k, y in zip(levels, fast):
        idx = acts.topk(k, dim=-1).indices
        expected = torch.zeros_like(acts).scatter(-1, idx, acts.gather(-1, idx)) @ decoder
        assert torch.allclose(y, expected, atol=1e-5)


def test_levels_sharing_the_full_decode_are_returned_once():
    torch.manual_seed(4)
    acts = F.relu(torch.randn(16, 50))
    acts[:, 10:] = 0  # at most 10 positive latents per row: every level with k >= 10 is the full decode
    decoder = torch.randn(50, 7, dtype=acts.dtype)
    levels = [2, 5, 10, 40, 50]
    decoded = nested_reconstructions(acts, decoder, levels)
    assert len(decoded) == 3  # levels 2 and 5, then the one decode that levels 10, 40 and 50 share
    expected = naive_topk_reconstructions(acts, decoder, levels)
    for y, y_expected in zip(per_level(decoded, len(levels)), expected):
        assert torch.allclose(y, y_expected, atol=1e-5)
    assert len(nested_reconstructions(acts[:0], decoder, levels)) == 1  # no rows: one empty reconstruction


def all_valid_plans(m):
    for plan in itertools.product(PLANS, repeat=m):
        if not any(a == "above_minus_band" and b == "below_plus_band" for a, b in zip(plan[:-1], plan[1:])):
            yield list(plan)


def test_every_decode_plan_gives_the_same_levels_and_gradients(monkeypatch, device):
    torch.manual_seed(5)
    pre = torch.randn(21, 40, dtype=torch.float64, device=device)
    decoder = torch.randn(40, 6, dtype=torch.float64, device=device)
    levels = [3, 7, 15, 40]  # about 20 of 40 latents are positive: 3, 7 and 15 are partial levels
    weights = torch.randn(len(levels), 21, 6, dtype=torch.float64, device=device)

    def objective(fn):
        p = pre.clone().requires_grad_()
        d = decoder.clone().requires_grad_()
        outs = per_level(fn(F.relu(p), d, levels), len(levels))
        total = sum((w * o).sum() for w, o in zip(weights, outs))
        return [o.detach() for o in outs], torch.autograd.grad(total, (p, d))

    ref_outs, ref_grads = objective(naive_topk_reconstructions)
    plans = list(all_valid_plans(3))
    assert len(plans) == 21  # 27 minus the 6 with an above_minus_band level right below a below_plus_band one
    for plan in plans:
        monkeypatch.setattr(nested_decode, "_plan_levels", lambda *a, plan=plan, **k: plan)
        outs, grads_ = objective(nested_reconstructions)
        for a, b in zip(outs + list(grads_), ref_outs + list(ref_grads)):
            assert torch.allclose(a, b, atol=1e-10), plan


@pytest.mark.parametrize("levels", [[2, 5, 9], [2, 5, 9, 40]])
def test_nested_decode_gradients_with_rows_short_of_positive_latents(levels):
    """Rows with fewer positive latents than a partial level (its top-k takes zeros there); with [2, 5, 9] no
    level reaches the largest count, so there is no shared dense decode."""
    torch.manual_seed(6)
    pre = torch.randn(17, 40, dtype=torch.float64)
    pre[0] = -1.0
    pre[0, 7] = 0.5  # one positive latent
    pre[1] = -1.0
    pre[1, 10:13] = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)  # three positive latents
    pre.requires_grad_()
    decoder = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(len(levels), 17, 6, dtype=torch.float64)
    results = []
    for fn in (nested_reconstructions, naive_topk_reconstructions):
        outs = per_level(fn(F.relu(pre), decoder, levels), len(levels))
        total = sum((w * o).sum() for w, o in zip(weights, outs))
        results.append([o.detach() for o in outs] + list(torch.autograd.grad(total, (pre, decoder))))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-10)


def test_ranking_scores_choose_the_top_k_sets():
    torch.manual_seed(7)
    acts = F.relu(torch.randn(12, 30, dtype=torch.float64))
    scores = acts * torch.rand(30, dtype=torch.float64)  # e.g. z_j ||D_j|| for rows of unequal norm
    decoder = torch.randn(30, 5, dtype=torch.float64)
    levels = [2, 4, 8, 30]
    fast = per_level(nested_reconstructions(acts, decoder, levels, scores=scores), len(levels))
    for a, b in zip(fast, naive_topk_reconstructions(acts, decoder, levels, scores=scores)):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("tile", [0, 4, 64])
def test_gather_decode_matches_embedding_bag_with_tiles_and_empty_bags(monkeypatch, tile):
    monkeypatch.setattr(nested_decode, "DECODE_TILE_WIDTH", tile)
    torch.manual_seed(2)
    decoder = torch.randn(30, 10, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([3, 7, 1, 29, 3, 0, 5, 5, 12])  # bags: [3 7 1] [] [29 3] [0 5] [] [5 12]
    offsets = torch.tensor([0, 3, 3, 5, 7, 7])
    weights = torch.rand(9, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 10, dtype=torch.float64)
    fast = nested_decode._gather_decode(weights, decoder, indices, offsets)
    ref = F.embedding_bag(indices, decoder, offsets, per_sample_weights=weights, mode="sum")
    assert torch.allclose(fast, ref)
    g_fast = torch.autograd.grad((fast * upstream).sum(), (weights, decoder))
    g_ref = torch.autograd.grad((ref * upstream).sum(), (weights, decoder))
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b)


def test_decode_planner_prefers_gathers_for_narrow_bands_and_subtracting_from_above():
    counts = torch.full((8,), 1200)
    plan = nested_decode._plan_levels([64, 128, 256, 512, 1024], counts, 6144, full_available=True)
    # 1024: only ~176 positives above it, so it is the full decode minus those
    assert plan[:3] == ["below_plus_band"] * 3 and plan[-1] == "above_minus_band"
    counts = torch.full((8,), 3100)
    plan = nested_decode._plan_levels([64, 128, 256, 512, 1024, 2048], counts, 6144, full_available=True)
    assert plan[0] == "below_plus_band" and plan[-1] == "dense"


def _levels_and_gradients(plan, pre, decoder, levels, weights):
    """Levels and the gradients of a weighted sum of them, in ``pre`` (before the ReLU: which zero latents a
    top-k picks in a row short of positives is arbitrary, and the ReLU gives them no gradient) and the
    decoder."""
    p = pre.clone().requires_grad_()
    d = decoder.clone().requires_grad_()
    if plan == "naive":
        outs = naive_topk_reconstructions(F.relu(p), d, levels)
    else:
        outs = per_level(nested_reconstructions(F.relu(p), d, levels, plan=plan), len(levels))
    total = sum((w * o).sum() for w, o in zip(weights, outs))
    return [o.detach() for o in outs] + list(torch.autograd.grad(total, (p, d)))


@pytest.mark.parametrize("plan", ["auto", "gather", "dense"])
def test_each_decode_plan_switch_matches_the_specification_on_the_device(device, plan):
    torch.manual_seed(8)
    pre = torch.randn(19, 48, dtype=torch.float64, device=device) - 0.3
    pre[0] = -1.0  # a row with no positive latent
    decoder = torch.randn(48, 5, dtype=torch.float64, device=device)
    levels = [2, 6, 12, 24, 48]
    weights = torch.randn(len(levels), 19, 5, dtype=torch.float64, device=device)
    expected = _levels_and_gradients("naive", pre, decoder, levels, weights)
    for a, b in zip(_levels_and_gradients(plan, pre, decoder, levels, weights), expected):
        assert a.device == device
        assert torch.allclose(a, b, atol=1e-10), plan


def test_dense_plan_reads_nothing_back_from_the_device(monkeypatch):
    """The dense plan decides nothing from the data, so it never moves a tensor to the host."""
    acts = F.relu(torch.randn(8, 20))
    decoder = torch.randn(20, 4)

    def no_host_copy(self, *args, **kwargs):
        raise AssertionError("the dense plan copied a tensor to the host")

    monkeypatch.setattr(torch.Tensor, "cpu", no_host_copy)
    monkeypatch.setattr(torch.Tensor, "item", no_host_copy)
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_copy)
    assert len(nested_reconstructions(acts, decoder, [2, 5, 20], plan="dense")) == 3


def test_auto_is_the_cpu_planner_on_a_cpu_and_calibration_times_both_plans_once(monkeypatch):
    acts = F.relu(torch.randn(16, 64))
    decoder = torch.randn(64, 8)
    levels = [2, 4, 8, 64]
    auto = nested_reconstructions(acts, decoder, levels)
    gather = nested_reconstructions(acts, decoder, levels, plan="gather")
    assert all(torch.equal(a, b) for a, b in zip(auto, gather))
    assert not nested_decode.CALIBRATED_PLANS  # a CPU follows the fixed rule: nothing was timed

    timed = []
    real_time_plan = nested_decode._time_plan
    monkeypatch.setattr(nested_decode, "CALIBRATED_PLANS", {})
    monkeypatch.setattr(
        nested_decode, "_time_plan", lambda plan, *a: timed.append(plan) or real_time_plan(plan, *a)
    )
    with torch.no_grad():  # calibration also works where the caller decodes without a graph
        chosen = nested_decode.calibrate_plan(acts, decoder, levels)
        again = nested_decode.calibrate_plan(acts, decoder, levels)
    assert chosen == again and chosen in ("gather", "dense")
    assert sorted(timed) == ["dense", "gather"]  # each plan timed once; the second call used the cache
    assert acts.grad is None and decoder.grad is None


def test_unknown_decode_plan_is_refused_by_name():
    with pytest.raises(ValueError, match="decode_plan must be one of auto, gather, dense, got 'fast'"):
        nested_reconstructions(torch.ones(2, 4), torch.ones(4, 3), [1, 4], plan="fast")
