"""Perplexity by position and per-token losses, checked against hand-computed losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_endprompt.eval.perplexity import (
    default_bucket_edges,
    make_windows,
    perplexity_by_position,
)
from megatron_endprompt.eval.scoring import token_losses

V = 7


def uniform(input_ids, position_ids):
    return torch.zeros(*input_ids.shape, V)


def confidence(pos: int) -> float:
    """Logit the position-aware model puts on the true next token at position ``pos``."""
    return 0.25 * pos - 1.0


def position_aware(input_ids, position_ids):
    """Documents count up mod V; puts logit confidence(pos) on (input + 1) mod V, 0 elsewhere."""
    logits = torch.zeros(*input_ids.shape, V)
    c = torch.tensor([[confidence(int(p)) for p in row] for row in position_ids])
    return logits.scatter(-1, ((input_ids + 1) % V).unsqueeze(-1), c.unsqueeze(-1))


def counting_doc(n: int, start: int = 0) -> list[int]:
    return [(start + i) % V for i in range(n)]


def expected_loss(pos: int) -> float:
    c = confidence(pos)
    return math.log(math.exp(c) + V - 1) - c


def test_default_bucket_edges():
    assert default_bucket_edges(1000) == [0, 256, 512, 1000]
    assert default_bucket_edges(1024) == [0, 256, 512, 1024]
    assert default_bucket_edges(256) == [0, 256]
    assert default_bucket_edges(100) == [0, 100]
    assert default_bucket_edges(20, first=4) == [0, 4, 8, 16, 20]


def test_token_losses_hand_worked():
    def fixed(input_ids, position_ids):  # p(token 1) = 3/4 everywhere
        return torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).expand(*input_ids.shape, 2)

    losses = token_losses(fixed, [[0, 1, 0], [1, 1, 1]], batch_size=1)
    want = [[math.log(4 / 3), math.log(4)], [math.log(4 / 3)] * 2]
    assert losses.dtype == np.float64 and losses.shape == (2, 2)
    np.testing.assert_allclose(losses, want, rtol=1e-12)


def test_token_losses_positions_and_shape_checks():
    seen = []

    def recording(input_ids, position_ids):
        seen.append(position_ids.tolist())
        return torch.zeros(*input_ids.shape, 3)

    token_losses(recording, np.zeros((3, 4), dtype=np.int64), position_ids=[5, 9, 20], batch_size=2)
    assert seen == [[[5, 9, 20]] * 2, [[5, 9, 20]]]
    with pytest.raises(ValueError, match="position_ids"):
        token_losses(recording, [[0, 1, 2]], position_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="ids"):
        token_losses(recording, [[0]])
    with pytest.raises(ValueError, match="logits_fn"):
        token_losses(lambda i, p: torch.zeros(1, 1, 3), [[0, 1, 2]])


def test_windows_stride_and_limit():
    docs = [counting_doc(25), counting_doc(10), counting_doc(8), counting_doc(40)]
    w = make_windows(docs, 8)
    # 25 tokens -> starts 0, 8, 16; 10 -> 0; 8 -> none (needs 9); 40 -> 0, 8, 16, 24.
    assert w.shape == (8, 9)
    np.testing.assert_array_equal(w[1], counting_doc(9, start=8))
    assert make_windows(docs, 8, max_windows=2).shape == (2, 9)


def test_uniform_perplexity_is_vocab_size():
    docs = [np.random.default_rng(0).integers(0, V, size=n) for n in (70, 33)]
    r = perplexity_by_position(uniform, docs, 32, bucket_edges=[0, 4, 16, 32], progress=False)
    # 70 -> windows at 0, 32; 33 -> window at 0.
    assert r.num_windows == 3
    assert r.token_count == [12, 36, 48]
    for ppl in r.perplexity + [r.overall_perplexity]:
        assert ppl == pytest.approx(V, rel=1e-9)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_position_dependent_bucket_means(batch_size):
    length, edges = 12, [0, 3, 8, 12]
    docs = [counting_doc(40, start=2), counting_doc(13, start=5)]
    r = perplexity_by_position(
        position_aware, docs, length, edges, batch_size=batch_size, progress=False
    )
    # 40 -> windows at 0, 12, 24; 13 -> one window: 4 windows, every position seen 4 times.
    assert r.num_windows == 4
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        want = sum(expected_loss(p) for p in range(lo, hi)) / (hi - lo)
        assert r.mean_loss[i] == pytest.approx(want, rel=1e-12)
        assert r.perplexity[i] == pytest.approx(math.exp(want), rel=1e-12)
        assert r.token_count[i] == 4 * (hi - lo)
    overall = sum(expected_loss(p) for p in range(length)) / length
    assert r.overall_mean_loss == pytest.approx(overall, rel=1e-12)
    # Later positions are more confident, so perplexity falls bucket by bucket.
    assert r.perplexity[0] > r.perplexity[1] > r.perplexity[2]


def test_errors_name_the_length():
    with pytest.raises(ValueError, match="length: no document has 17 tokens"):
        perplexity_by_position(uniform, [], 16, progress=False)
    with pytest.raises(ValueError, match="length: no document has 17 tokens"):
        perplexity_by_position(uniform, [counting_doc(16)], 16, progress=False)
    with pytest.raises(ValueError, match="bucket_edges"):
        perplexity_by_position(uniform, [counting_doc(20)], 16, [0, 8, 12], progress=False)
    with pytest.raises(ValueError, match="bucket_edges"):
        perplexity_by_position(uniform, [counting_doc(20)], 16, [0, 8, 8, 16], progress=False)


def hand_loss(window: np.ndarray, pos: int) -> float:
    """Loss of ``position_aware`` at input position ``pos`` of a window (by hand)."""
    c = confidence(pos)
    target_hit = int(window[pos + 1]) == (int(window[pos]) + 1) % V
    return math.log(math.exp(c) + V - 1) - (c if target_hit else 0.0)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_window_means_and_intervals(batch_size):
    from megatron_endprompt.eval.intervals import bootstrap_mean_interval

    length, edges = 12, [0, 4, 12]
    rng = np.random.default_rng(3)
    # Half-counting documents: some next tokens are the predicted (input + 1) mod V, some not.
    docs = [np.where(rng.uniform(size=n) < 0.5, np.arange(n) % V, rng.integers(0, V, size=n))
            for n in (60, 40)]  # fmt: skip
    windows = make_windows(docs, length)
    r = perplexity_by_position(
        position_aware, docs, length, edges, batch_size=batch_size, progress=False,
        interval_level=0.9, bootstrap_resamples=300,
    )  # fmt: skip
    want = [[sum(hand_loss(w, p) for p in range(lo, hi)) / (hi - lo)
             for lo, hi in zip(edges, edges[1:])] for w in windows]  # fmt: skip
    assert np.asarray(r.window_mean_loss).shape == (len(windows), 2)
    np.testing.assert_allclose(r.window_mean_loss, want, rtol=1e-9)
    # Every window puts the same number of tokens in a bucket: the bucket mean is the mean of
    # the per-window means, and the overall mean the size-weighted one.
    for b in range(2):
        assert r.mean_loss[b] == pytest.approx(np.mean([w[b] for w in want]), rel=1e-12)
    overall = [(4 * w[0] + 8 * w[1]) / 12 for w in want]
    assert r.window_overall_loss() == pytest.approx(overall, rel=1e-12)
    assert r.overall_mean_loss == pytest.approx(np.mean(overall), rel=1e-12)
    # Intervals: exp of the bootstrap (over windows) of the mean loss.
    for b in range(2):
        lo, hi = bootstrap_mean_interval([w[b] for w in want], level=0.9, resamples=300)
        assert r.perplexity_interval[b] == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-9)
        assert r.perplexity_interval[b][0] <= r.perplexity[b] <= r.perplexity_interval[b][1]
    lo, hi = bootstrap_mean_interval(overall, level=0.9, resamples=300)
    assert r.overall_perplexity_interval == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-9)
    d = r.to_dict()
    assert d["interval_level"] == 0.9 and d["bootstrap_resamples"] == 300
    assert d["perplexity_interval"] == [list(x) for x in r.perplexity_interval]
    assert d["window_mean_loss"] == r.window_mean_loss


def test_identical_windows_give_degenerate_intervals_and_zero_disables():
    length, edges = 12, [0, 3, 12]
    docs = [counting_doc(40, start=2), counting_doc(13, start=5)]
    r = perplexity_by_position(position_aware, docs, length, edges, progress=False)
    for (lo, hi), ppl in zip(r.perplexity_interval, r.perplexity):
        assert lo == pytest.approx(ppl, rel=1e-12) and hi == pytest.approx(ppl, rel=1e-12)
    off = perplexity_by_position(
        position_aware, docs, length, edges, progress=False, bootstrap_resamples=0
    )
    assert off.perplexity_interval is None and off.overall_perplexity_interval is None
    assert off.to_dict()["perplexity_interval"] is None
    assert off.window_mean_loss == r.window_mean_loss
    with pytest.raises(ValueError, match="interval_level"):
        perplexity_by_position(position_aware, docs, length, progress=False, interval_level=1.0)
    with pytest.raises(ValueError, match="bootstrap_resamples"):
        perplexity_by_position(position_aware, docs, length, progress=False, bootstrap_resamples=-1)


def test_progress_lines_on_stderr(capsys):
    docs = [counting_doc(12 * 25 + 1)]
    perplexity_by_position(position_aware, docs, 12, progress=False, progress_lines=True)
    err = capsys.readouterr().err.strip().splitlines()
    # 25 windows, a line every ceil(25 / 10) = 3 windows and one at the end.
    assert [line.split(",")[0] for line in err] == [
        f"ppl@12: {n}/25 windows" for n in (*range(3, 25, 3), 25)
    ]
    assert all("elapsed " in line and " eta " in line for line in err)
