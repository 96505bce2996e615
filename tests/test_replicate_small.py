"""benchmarks/replicate_small.py: the settings it refuses, its tables, and the --quick run."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import replicate_small as rs  # noqa: E402


def test_eval_lengths_double_up_to_the_factor():
    assert rs.Settings().eval_lengths == [128, 256, 512, 1024]
    assert rs.Settings(s0=64, factor=4).eval_lengths == [64, 128, 256]
    assert rs.Settings(s0=100, factor=6).eval_lengths == [100, 200, 400, 600]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--methods", "pi_only,nope"], "--methods"),
        (["--seeds", "1,1"], "--seeds"),
        (["--base-seeds", "3,3"], "--base-seeds"),
        (["--eval-trials", "0"], "--eval-trials"),
        (["--corpus-weight", "1.0"], "--corpus-weight"),
        (["--hidden-size", "130", "--num-attention-heads", "4"], "--hidden-size"),
        (["--rope-scaling", "nope"], "--rope-scaling"),
        (["--base-iters", "0"], "--base-iters"),
        (["--extend-iters", "-1"], "--extend-iters"),
        (["--base-bar", "1.5"], "--base-bar"),
    ],
)
def test_bad_settings_name_the_flag(argv, flag, capsys):
    assert rs.main(argv + ["--output", "/nonexistent/never-written"]) == 2
    assert flag in capsys.readouterr().err


def test_token_budget_must_divide_into_full_length_sequences():
    with pytest.raises(ValueError, match="multiples of L = 1024"):
        rs.check_settings(rs.Settings(tokens_per_iter=3000))


def _report(exact, digits, ppl):
    return {
        "results": {
            "passkey": {
                "mean_exact_match_by_length": {str(k): v for k, v in exact.items()},
                "mean_token_accuracy_by_length": {str(k): v for k, v in digits.items()},
            },
            "perplexity": {"bucket_edges": [0, 128, 256], "perplexity": ppl},
        }
    }


def test_rows_average_seeds_and_keep_each_seed():
    reports = [
        _report({128: 1.0, 256: 0.5}, {128: 1.0, 256: 0.8}, [10.0, 20.0]),
        _report({128: 0.5, 256: 0.0}, {128: 0.9, 256: 0.6}, [12.0, 30.0]),
    ]
    summaries = [
        {"tokens_per_s": 100.0, "peak_memory_gib": 1.0, "final_loss": 2.0},
        {"tokens_per_s": 300.0, "peak_memory_gib": 2.0, "final_loss": 1.0},
    ]
    row = rs.row_for("m", "d", reports, summaries)
    assert row["exact_match"] == {128: 0.75, 256: 0.25}
    # sample standard deviation of two values a, b: |a - b| / sqrt(2)
    assert row["exact_match_sd"] == pytest.approx({128: 0.5 / 2**0.5, 256: 0.5 / 2**0.5})
    assert row["exact_match_interval"] is None  # several seeds: the spread is the seeds'
    assert rs._cell(row, "exact_match", 128) == "0.75 ± 0.35"
    assert row["digit_accuracy"] == pytest.approx({128: 0.95, 256: 0.7})
    assert row["exact_match_per_seed"] == [{128: 1.0, 256: 0.5}, {128: 0.5, 256: 0.0}]
    assert row["perplexity"] == [11.0, 25.0]
    assert (row["tokens_per_s"], row["peak_memory_gib"], row["final_loss"]) == (200.0, 1.5, 1.5)
    untrained = rs.row_for("pi_only", "d", reports[:1], [None])
    assert untrained["tokens_per_s"] is None and untrained["seeds"] == 1
    assert untrained["exact_match_sd"] == {128: None, 256: None}
    assert rs._cell(untrained, "exact_match", 256) == "0.50"  # no interval in this report
    with_interval = _report({128: 0.5}, {128: 0.5}, [10.0, 20.0])
    with_interval["results"]["passkey"]["exact_match_interval_by_length"] = {"128": [0.25, 0.75]}
    one = rs.row_for("pi_only", "d", [with_interval], [None])
    assert one["exact_match_interval"] == {128: [0.25, 0.75]}
    assert rs._cell(one, "exact_match", 128) == "0.50 [0.25, 0.75]"


def test_result_lines_from_rows():
    s = rs.Settings(s0=128, factor=4)
    base = {"method": "base", "exact_match": {128: 0.96, 256: 0.0, 512: 0.0}}
    full = {"method": "full_length", "exact_match": {128: 1.0, 256: 0.9, 512: 0.6},
            "tokens_per_s": 1000.0, "peak_memory_gib": 2.0}  # fmt: skip
    tail = {"method": "endprompt_tail_fixed", "exact_match": {128: 1.0, 256: 0.5, 512: 0.2},
            "tokens_per_s": 1500.0, "peak_memory_gib": 1.0}  # fmt: skip
    bases = {1: {"at_bar": True}, 2: {"at_bar": False}}
    lines = rs.result_lines(s, [base, full, tail], bases)
    assert lines[:2] == ["RESULT bases_trained 2", "RESULT bases_at_bar 1"]
    assert "RESULT base_passkey_exact_at_s0 0.9600" in lines
    assert "RESULT base_bar_met 1" in lines  # 0.96 >= 0.95
    assert "RESULT full_length_bar_met 0" in lines  # 0.60 < 0.80 at L = 512
    assert "RESULT full_length_passkey_exact_mean_2x_to_4x 0.7500" in lines
    assert "RESULT endprompt_tail_fixed_passkey_exact_at_L 0.2000" in lines
    assert not [x for x in lines if "tokens_per_s_ratio" in x]  # not measured side by side
    assert "RESULT endprompt_tail_fixed_vs_full_length_peak_memory_ratio 0.500" in lines


def test_bars_name_what_is_missing():
    s = rs.Settings(s0=128, factor=4)
    rows = [{"method": "base", "exact_match": {128: 0.9}},
            {"method": "full_length", "exact_match": {512: 0.85}}]  # fmt: skip
    got = {b["bar"]: (b["value"], b["met"]) for b in rs.bars(s, rows)}
    assert got == {"base passkey exact match at S0 = 128": (0.9, False),
                   "full_length passkey exact match at L = 512": (0.85, True)}  # fmt: skip


def _install_steps(tmp_path, monkeypatch, train_run, evaluate):
    """Replace data preparation, training, evaluation and plots with the given stubs."""
    data = {k: str(tmp_path / k) for k in ("tokenizer", "corpus", "passkey_s0", "passkey_l")}
    monkeypatch.setattr(rs, "prepare_data", lambda *a: {**data, "tail_tokens": 12})
    monkeypatch.setattr(rs, "train_run", train_run)
    monkeypatch.setattr(rs, "evaluate", evaluate)
    monkeypatch.setattr(rs, "plot", lambda rows, a, b: [a, b])


def test_orchestration_extends_the_first_base_with_every_seed_the_others_with_one(
    tmp_path, monkeypatch
):
    """Every step stubbed: which runs happen, from which base, and what the report shows."""
    s = rs.Settings(s0=128, factor=2, base_seeds=[5, 7], seeds=[1, 2, 3], base_bar=0.0,
                    methods=["pi_only", "full_length", "short_contiguous"])  # fmt: skip
    trained, evaluated = [], []

    def fake_train_run(name, argv, ckpt, logs, resume):
        base = argv[argv.index("--load") + 1] if "--load" in argv else None
        trained.append((name, base, argv[argv.index("--seed") + 1]))
        return {"tokens_per_s": 10.0, "peak_memory_gib": 1.0, "final_loss": 1.0}

    def fake_evaluate(s_, paths, ckpt, name, out, logs, resume, scaling=None):
        evaluated.append((name, os.path.basename(ckpt), scaling))
        # a number that identifies the run: base 5 -> 0.5.., base 7 -> 0.7..; seed in 1e-2
        value = (0.5 if "seed5" in ckpt or "base5" in ckpt else 0.7) + 0.01 * len(evaluated)
        return _report({128: value, 256: value}, {128: value, 256: value}, [10.0, 20.0])

    _install_steps(tmp_path, monkeypatch, fake_train_run, fake_evaluate)
    lines = rs.replicate(s, str(tmp_path), resume=False)
    out = str(tmp_path)
    assert [t[0] for t in trained] == [
        "base_seed5", "full_length_base5_seed1", "full_length_base5_seed2",
        "full_length_base5_seed3", "short_contiguous_base5_seed1", "short_contiguous_base5_seed2",
        "short_contiguous_base5_seed3",
        "base_seed7", "full_length_base7_seed1", "short_contiguous_base7_seed1",
    ]  # fmt: skip
    # base seeds are the bases' --seed; extensions load their own base with their own seed
    assert trained[0][1:] == (None, "5") and trained[7][1:] == (None, "7")
    assert trained[2][1:] == (os.path.join(out, "ckpt", "base_seed5"), "2")
    assert trained[9][1:] == (os.path.join(out, "ckpt", "base_seed7"), "1")
    assert ("pi_only_base7", "base_seed7", "linear") in evaluated
    payload = json.loads((tmp_path / "replicate.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["base", "pi_only", "full_length",
                                                      "short_contiguous"]  # fmt: skip
    assert payload["rows"][2]["seeds"] == 3
    assert [r["seeds"] for r in payload["other_bases"]["7"]["rows"]] == [1, 1, 1, 1]
    md = (tmp_path / "replicate.md").read_text()
    assert "Base-to-base variance" in md and "base 7: passkey@256" in md
    assert "NOT MET" in md and "do not rank the methods" in md  # base values < 0.95
    assert "RESULT base_bar_met 0" in lines
    assert "RESULT short_contiguous_passkey_exact_at_L" in " ".join(lines)


@pytest.mark.slow
def test_quick_replication_runs_every_method_on_one_budget_and_resumes(tmp_path):
    out = tmp_path / "rep"
    env = {**os.environ, "OUT": str(out)}
    cmd = ["bash", os.path.join(ROOT, "examples", "replicate_small.sh"), "--quick"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    quick = tmp_path / "rep_quick"
    payload = json.loads((quick / "replicate.json").read_text())
    s = payload["settings"]
    methods = [r["method"] for r in payload["rows"]]
    assert methods == ["base", *rs.METHOD_NAMES]
    md = (quick / "replicate.md").read_text()
    for name in methods:
        assert f"| {name} |" in md
        if name != "base":
            assert f"RESULT {name}_passkey_exact_at_L " in proc.stdout
    assert (quick / "replicate_passkey.png").stat().st_size > 0
    assert (quick / "replicate_perplexity.png").stat().st_size > 0
    # The same token budget for every trained method: consumed samples x physical length.
    length = s["s0"] * s["factor"]
    for m in rs.METHODS:
        if not m.trains:
            continue
        run = quick / "ckpt" / f"{m.name}_base1_seed1" / "train_summary.json"
        summary = json.loads(run.read_text())
        seq = length if m.full_length else s["s0"]
        assert summary["consumed_samples"] * seq == s["extend_iters"] * s["tokens_per_iter"]
        assert summary["peak_memory_gib"] > 0
    for r in payload["rows"]:
        for n, v in r["exact_match"].items():
            assert 0.0 <= v <= 1.0 and 0.0 <= r["digit_accuracy"][n] <= 1.0
        assert all(p > 1.0 for p in r["perplexity"])
    # --resume reuses every finished step and reproduces the same numbers.
    again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "reusing" in again.stdout and "[replicate] evaluate" not in again.stdout
    assert json.loads((quick / "replicate.json").read_text())["rows"] == payload["rows"]
    # ... but not into a folder made with other settings.
    other = subprocess.run(cmd + ["--resume", "--extend-iters", "3"], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert other.returncode == 2 and "other settings (extend_iters" in other.stderr


def _stub_steps(tmp_path, monkeypatch, base_exact):
    """Stub every step; a base's passkey exact match is ``base_exact[seed]``, an extension's
    0.9. Returns the list of trained run names."""
    trained = []

    def fake_train_run(name, argv, ckpt, logs, resume):
        trained.append(name)
        return {"tokens_per_s": 10.0, "peak_memory_gib": 1.0, "final_loss": 1.0}

    def fake_evaluate(s_, paths, ckpt, name, out, logs, resume, scaling=None):
        value = base_exact[int(name[len("base_base") :])] if name.startswith("base_") else 0.9
        return _report({128: value, 256: value}, {128: value, 256: value}, [10.0, 20.0])

    _install_steps(tmp_path, monkeypatch, fake_train_run, fake_evaluate)
    return trained


def test_a_base_below_the_bar_is_reported_and_not_extended(tmp_path, monkeypatch):
    """Bases 5 (0.75 < 0.95), 6 (0.95, exactly at the bar) and 7 (1.0): base 6 is the main
    table with every extension seed, base 7 the base-to-base table, base 5 only reported."""
    trained = _stub_steps(tmp_path, monkeypatch, {5: 0.75, 6: 0.95, 7: 1.0})
    s = rs.Settings(s0=128, factor=2, base_seeds=[5, 6, 7], seeds=[1, 2],
                    methods=["full_length"])  # fmt: skip
    lines = rs.replicate(s, str(tmp_path), resume=False)
    assert trained == [
        "base_seed5",
        "base_seed6",
        "full_length_base6_seed1",
        "full_length_base6_seed2",
        "base_seed7",
        "full_length_base7_seed1",
    ]
    payload = json.loads((tmp_path / "replicate.json").read_text())
    assert payload["base_seed"] == 6 and list(payload["other_bases"]) == ["7"]
    assert {b: (x["exact_match_at_s0"], x["at_bar"]) for b, x in payload["bases"].items()} == {
        "5": (0.75, False),
        "6": (0.95, True),
        "7": (1.0, True),
    }
    md = (tmp_path / "replicate.md").read_text()
    assert "seed 5 0.75 (below the bar, not extended)" in md and "seed 6 0.95 (extended)" in md
    assert "## Methods from base 6" in md
    assert lines[:2] == ["RESULT bases_trained 3", "RESULT bases_at_bar 2"]
    assert "RESULT base_bar_met 1" in lines and "RESULT full_length_bar_met 1" in lines


def test_no_base_at_the_bar_is_an_error_naming_the_flag(tmp_path, monkeypatch, capsys):
    trained = _stub_steps(tmp_path, monkeypatch, {1: 0.5, 2: 0.9})
    argv = ["--base-seeds", "1,2", "--methods", "full_length", "--output", str(tmp_path)]
    assert rs.main(argv) == 2
    err = capsys.readouterr().err
    assert "no base reached --base-bar 0.95" in err and "seed 1: 0.50, seed 2: 0.90" in err
    assert trained == ["base_seed1", "base_seed2"]
