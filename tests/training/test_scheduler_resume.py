"""The LR/WD schedule on resume, as Megatron-LM core_v0.16.1 has it.

Facts (megatron/training/training.py: get_optimizer_param_scheduler; megatron-core's
OptimizerParamScheduler.load_state_dict): wd_incr_steps = train_iters x global batch
(iteration-based) or train_samples (sample-based); a --lr-warmup-fraction warmup is
fraction x decay steps, not rounded; on resume every schedule value must equal the checkpoint's
unless --use-checkpoint-opt_param-scheduler (the checkpoint's win) or --override-opt_param-scheduler
(the flags' win), and the two together are refused.
"""

from __future__ import annotations

import pytest
import torch
from train_fixtures import make_corpus, train_flags

from megatron_endprompt.checkpoint.megatron_lm import load_scheduler_state
from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.train import main
from megatron_endprompt.training.optim import build_adamw
from megatron_endprompt.training.state import build_scheduler_for_run


def _scheduler(*extra: str):
    flags = train_flags("/nonexistent/corpus_text_document", "/nonexistent/cache", *extra)
    if "--train-samples" in extra:  # no iteration-based schedule flags (they do not mix)
        for flag in ("--train-iters", "--lr-warmup-iters", "--lr-decay-iters"):
            if flag in flags:
                i = flags.index(flag)
                del flags[i : i + 2]
    model = torch.nn.Linear(2, 2)
    return build_scheduler_for_run(
        parse_run_config(flags), build_adamw(model, 1e-3, 0.0, (0.9, 0.95), 1e-8)
    )


def test_megatron_lm_schedule_values():
    iters = _scheduler("--train-iters", "10")  # global batch 4, decay 8 iterations
    assert (iters.wd_incr_steps, iters.lr_decay_steps) == (10 * 4, 8 * 4)
    samples = _scheduler("--train-samples", "44", "--lr-decay-samples", "40",
                         "--lr-warmup-fraction", "0.07")  # fmt: skip
    assert samples.wd_incr_steps == 44 and samples.lr_warmup_steps == 0.07 * 40  # 2.8


def test_resume_checks_the_schedule_unless_told_which_wins():
    saved = _scheduler("--train-iters", "10")
    saved.step(increment=12)
    state = saved.state_dict()
    longer = _scheduler("--train-iters", "20")
    with pytest.raises(ValueError, match="for total number of weight decay iterations do not"):
        load_scheduler_state(longer, state, "--load=x")
    theirs = _scheduler("--train-iters", "20", "--use-checkpoint-opt_param-scheduler")
    load_scheduler_state(theirs, state, "--load=x")
    assert (theirs.wd_incr_steps, theirs.num_steps) == (40, 12)
    ours = _scheduler("--train-iters", "20", "--lr", "2e-3", "--override-opt_param-scheduler")
    load_scheduler_state(ours, state, "--load=x")
    assert (ours.wd_incr_steps, ours.max_lr, ours.num_steps) == (80, 2e-3, 12)


def test_training_longer_than_the_checkpoint_needs_a_choice(tmp_path, capsys, monkeypatch):
    data, cache = make_corpus(str(tmp_path)), str(tmp_path / "cache")
    save = str(tmp_path / "ckpt")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(train_flags(data, cache, "--train-iters", "2", "--save", save)) == 0
    capsys.readouterr()
    longer = train_flags(data, cache, "--train-iters", "4", "--load", save, "--save", save)
    assert main(longer) == 2
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith(f"error: --load={save}: the run's LR/WD schedule differs") and (
        "--override-opt_param-scheduler" in first
    ), first
    assert main([*longer, "--override-opt_param-scheduler"]) == 0
    assert '"iterations": 4' in capsys.readouterr().out
