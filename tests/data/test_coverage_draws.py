"""The coverage report sees exactly the position layouts EndPromptDataset hands out."""

from __future__ import annotations

import os

import numpy as np
import pytest
from dataset_fixtures import distinct_docs, make_config, write_corpus

from megatron_endprompt.coverage import layout_pair_counts, sample_layouts
from megatron_endprompt.data.builder import build_datasets


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(os.path.join(root, "docs", "text_document"), distinct_docs(40))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(cues=[[1], [2, 3], [4, 5, 6]], placement="random"),
        dict(position_mode="pose", pose_chunk_sampler="reference", pose_skip_text=True),
        dict(position_mode="endprompt_pose", placement="random", pose_num_chunks=3, cues=[[7]]),
        dict(terminal="tail", tail_length=3, terminal_source="document_end"),
    ],
)
def test_coverage_draws_are_the_dataset_draws(corpus, tmp_path, overrides):
    config = make_config(corpus, str(tmp_path), sequence_length=16, target_length=256, **overrides)
    train, _, _ = build_datasets(config, [30, None, None])
    n = len(train)
    ours = list(sample_layouts(config.layout_spec(), config.random_seed, n))
    theirs = [train[i]["position_ids"].numpy() for i in range(n)]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(layout_pair_counts(ours, 256), layout_pair_counts(theirs, 256))
