"""Weighted global-batch loss and the CP split (single process; multi-rank paths in loop tests)."""

import torch
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_endprompt.training.batch import get_batch, split_for_context_parallel
from megatron_endprompt.training.loss import global_weight_sum, microbatch_objective


def test_objective_gradient_equals_global_weighted_mean():
    # Two DP ranks x two micro-batches of very different weight mass.
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    feats = [torch.randn(2, 3, 4) for _ in range(4)]
    masks = [torch.rand(2, 3) * (i + 1) for i in range(4)]
    masks[1][:, :2] = 0.0

    def ce(f):  # a stand-in per-token loss, differentiable in theta
        return (f @ theta) ** 2

    ref = sum((ce(f) * m).sum() for f, m in zip(feats, masks)) / sum(m.sum() for m in masks)
    (g_ref,) = torch.autograd.grad(ref, theta)

    w_total = global_weight_sum(masks)  # what the all-reduce over both ranks yields
    dp = 2
    grads = []
    for rank in range(dp):  # each rank back-propagates its micro-batches; DDP then averages
        theta.grad = None
        for f, m in zip(feats[2 * rank : 2 * rank + 2], masks[2 * rank : 2 * rank + 2]):
            obj, _ = microbatch_objective(ce(f), m, w_total, grad_scale=dp)
            obj.backward()
        grads.append(theta.grad.clone())
    torch.testing.assert_close(sum(grads) / dp, g_ref, rtol=1e-5, atol=1e-6)


def test_objective_all_zero_weights_is_zero():
    loss = torch.ones(2, 3, requires_grad=True)
    obj, s = microbatch_objective(loss, torch.zeros(2, 3), torch.zeros((), dtype=torch.float64))
    obj.backward()
    assert obj.item() == 0.0 and s.item() == 0.0 and torch.all(loss.grad == 0)


def test_cp_split_matches_megatron_and_keeps_alignment(monkeypatch):
    # megatron reads the group's size/rank only when torch.distributed looks initialised.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    s, cp = 16, 2
    batch = {
        "tokens": torch.arange(2 * s).view(2, s),
        "labels": torch.arange(2 * s).view(2, s) + 1,
        "loss_mask": torch.rand(2, s),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 61, 62, 63]] * 2),
    }
    for rank in range(cp):
        ours = split_for_context_parallel(batch, rank, cp)

        class G:  # a stand-in process group with the rank/size megatron asks for
            def __init__(self, r):
                self.r = r

            def size(self):
                return cp

            def rank(self):
                return self.r

        theirs = get_batch_on_this_cp_rank(dict(batch), cp_group=G(rank))
        for k in batch:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    kept = split_for_context_parallel(batch, 0, cp)["position_ids"][0].tolist()
    assert kept == [0, 1, 2, 3, 12, 61, 62, 63]  # chunks 0 and 3 of 4


def test_get_batch_single_process_validates_shapes():
    it = iter([{k: torch.zeros(1, 8) for k in ("tokens", "labels", "loss_mask", "position_ids")}])
    out = get_batch(it, 1, 8, torch.device("cpu"))
    assert out["tokens"].dtype == torch.int64 and out["loss_mask"].dtype == torch.float32
    bad = iter([{k: torch.zeros(1, 4) for k in ("tokens", "labels", "loss_mask", "position_ids")}])
    try:
        get_batch(bad, 1, 8, torch.device("cpu"))
    except ValueError as e:
        assert "--seq-length" in str(e)
    else:
        raise AssertionError("shape mismatch not reported")
