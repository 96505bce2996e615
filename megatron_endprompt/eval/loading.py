"""Load a model for evaluation and wrap it as a ``LogitsFn``.

Two sources:

- ``load_megatron_model``: this package's checkpoint format (``training/checkpoint.py``:
  ``LOAD/latest_checkpointed_iteration.txt`` + ``iter_N/mp_rank_00_000/model_optim_rng.pt``),
  written by training (the shard holds ``run_config``) or by a conversion (the shard holds
  ``model_config``, or a ``model_config.json`` lies beside it). Evaluation runs unsharded
  (TP = PP = 1).
- ``load_hf_model``: a Hugging Face directory, through ``AutoModelForCausalLM`` in float32.

``load_ppl_documents`` reads the perplexity corpus (Megatron ``.bin/.idx`` or JSONL).

RoPE scaling is a pure function of the config, so ``rope_scaling_override`` evaluates the same
weights under another rotary embedding, e.g. a base model with Position Interpolation applied
but never trained with it (the "PI only" baseline).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from megatron_endprompt.config import ModelConfig, RopeScalingConfig, model_config_from_dict
from megatron_endprompt.eval.scoring import LogitsFn
from megatron_endprompt.training.checkpoint import MODEL_CONFIG_JSON, recorded_model_config


def _shard_dirs(iter_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(iter_dir) if d.startswith("mp_rank_"))


def _check_single_shard(load_dir: str, iteration: int) -> None:
    """Raise when the checkpoint is not one unsharded CPU-format shard."""
    from megatron_endprompt.training.checkpoint import stored_iteration_dir

    iter_dir = stored_iteration_dir(load_dir, iteration)
    if not os.path.isdir(iter_dir):
        raise FileNotFoundError(f"--load {load_dir}: checkpoint directory {iter_dir} is missing")
    if os.path.isfile(os.path.join(iter_dir, "metadata.json")):
        raise ValueError(
            f"--load {load_dir}: {iter_dir} is a megatron-core distributed checkpoint (saved on "
            "CUDA); evaluation reads the unsharded CPU format (mp_rank_00_000)"
        )
    shards = _shard_dirs(iter_dir)
    if shards != ["mp_rank_00_000"]:
        raise ValueError(
            f"--load {load_dir}: {iter_dir} holds shards {shards}; evaluation needs one "
            "unsharded checkpoint (tensor- and pipeline-parallel size 1)"
        )


def _resolve_iteration(load_dir: str, iteration: int | None) -> int:
    from megatron_endprompt.training.checkpoint import read_tracker

    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"--load {load_dir}: no such directory")
    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            raise FileNotFoundError(
                f"--load {load_dir}: no checkpoint (latest_checkpointed_iteration.txt is missing)"
            )
    return iteration


def _model_config_dict(shard: Mapping[str, Any], load_dir: str, ckpt_path: str) -> dict:
    """The model config of a checkpoint: run_config["model"], model_config, or the JSON file."""
    shard_dir = os.path.dirname(ckpt_path)
    saved = recorded_model_config(shard, (shard_dir, os.path.dirname(shard_dir), load_dir))
    if saved is None:
        raise ValueError(
            f"--load {load_dir}: {ckpt_path} carries no model config (no run_config or "
            f"model_config entry, no {MODEL_CONFIG_JSON} beside it)"
        )
    return saved


def _seeds(shard: Mapping[str, Any]) -> dict[str, Any]:
    run_config = shard.get("run_config")
    if not isinstance(run_config, Mapping):
        return {}
    training = run_config.get("training")
    if isinstance(training, Mapping) and "seed" in training:
        return {"training": training["seed"]}
    return {}


def _apply_overrides(
    config: ModelConfig,
    rope_scaling_override: RopeScalingConfig | None,
    max_position_override: int | None,
) -> ModelConfig:
    changes: dict[str, Any] = {}
    if rope_scaling_override is not None:
        changes["rope_scaling"] = rope_scaling_override
    if max_position_override is not None:
        changes["max_position_embeddings"] = max_position_override
        # The training length only has to fit the window; it plays no part in evaluation.
        changes["seq_length"] = min(config.seq_length, max_position_override)
    return dataclasses.replace(config, **changes) if changes else config


def _load_weights(model: torch.nn.Module, sd: Mapping[str, Any], load_dir: str) -> None:
    from megatron_endprompt.convert.hf_llama import load_megatron_state_dict

    try:
        load_megatron_state_dict(model, sd)
    except (ValueError, RuntimeError) as err:
        # torch lists every size mismatch on its own line; the first one names the problem.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise ValueError(f"--load {load_dir}: weights do not match the model: {detail}") from err


def load_megatron_model(
    load_dir: str,
    iteration: int | None = None,
    device: str | torch.device = "cpu",
    rope_scaling_override: RopeScalingConfig | None = None,
    max_position_override: int | None = None,
) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """Build the EndPromptGPTModel of a checkpoint and load its weights (eval mode).

    Args:
        load_dir: the ``--load`` directory (holding the tracker file).
        iteration: which iteration; None reads the tracker.
        device: where the model goes ("cpu", "cuda", "cuda:1", ...).
        rope_scaling_override: evaluate under this RoPE scaling instead of the checkpoint's.
        max_position_override: the context window to evaluate up to, instead of the
            checkpoint's ``max_position_embeddings``.

    Returns:
        ``(model, model_config, meta)``; meta holds the checkpoint path, iteration, RoPE scaling
        (and whether it was overridden), max position and the checkpoint's seeds.

    Raises:
        FileNotFoundError: no checkpoint in ``load_dir``.
        ValueError: sharded or distributed checkpoint, missing config, or mismatched weights.
    """
    from megatron_endprompt.model.gpt import build_model
    from megatron_endprompt.training.checkpoint import ShardRank, checkpoint_path, load_checkpoint

    iteration = _resolve_iteration(load_dir, iteration)
    _check_single_shard(load_dir, iteration)
    path = checkpoint_path(load_dir, ShardRank(), iteration)
    shard = load_checkpoint(load_dir, ShardRank(), iteration)
    if not isinstance(shard, Mapping) or "model" not in shard:
        raise ValueError(f"--load {load_dir}: {path} holds no 'model' state dict")
    config = model_config_from_dict(_model_config_dict(shard, load_dir, path))
    config = _apply_overrides(config, rope_scaling_override, max_position_override)
    model = build_model(config, seed=0)
    _load_weights(model, shard["model"], load_dir)
    model = model.to(device).eval()
    meta = {
        "checkpoint": os.path.abspath(path),
        "iteration": iteration,
        "rope_scaling": config.rope_scaling.to_dict(),
        "rope_scaling_overridden": rope_scaling_override is not None,
        "max_position_embeddings": config.max_position_embeddings,
        "seeds": _seeds(shard),
    }
    return model, config, meta


def megatron_logits_fn(
    model: torch.nn.Module, device: str | torch.device, vocab_size: int
) -> LogitsFn:
    """A ``LogitsFn`` over an EndPromptGPTModel.

    Args:
        model: the model (eval mode, on ``device``).
        device: where the inputs are moved.
        vocab_size: the real vocabulary (``model_config.vocab_size``): Megatron pads the output
            layer, and the padded rows are dropped so they can neither win an argmax nor take
            probability mass.

    Returns:
        ``fn(input_ids [b, s], position_ids [b, s]) -> float32 logits [b, s, vocab_size]``.
    """

    @torch.no_grad()
    def logits_fn(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids.to(device), position_ids.to(device))
        return logits[..., :vocab_size].float()

    return logits_fn


def max_position(model_config: ModelConfig) -> int:
    """The positions a model is meant for: ``0 .. max_position_embeddings - 1``."""
    return model_config.max_position_embeddings


def load_hf_model(
    hf_dir: str, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A Hugging Face causal LM in float32, eval mode, on ``device``.

    Returns:
        ``(model, meta)``; meta holds the directory, model type, RoPE parameters and
        ``max_position_embeddings``.

    Raises:
        FileNotFoundError: ``hf_dir`` has no ``config.json``.
        ValueError: transformers cannot load it.
    """
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"--hf-dir {hf_dir}: no config.json (not a Hugging Face model)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ValueError(
            "--hf-dir needs Hugging Face transformers: pip install -e '.[hf]'"
        ) from err
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--hf-dir {hf_dir}: cannot load the model: {err}") from err
    model = model.to(device).eval()
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    meta = {
        "checkpoint": os.path.abspath(hf_dir),
        "model_type": getattr(config, "model_type", None),
        "rope_scaling": dict(rope) if isinstance(rope, Mapping) else None,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "vocab_size": getattr(config, "vocab_size", None),
    }
    return model, meta


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """A ``LogitsFn`` over a Hugging Face causal LM; ``position_ids`` are passed explicitly.

    An all-ones ``attention_mask`` is passed too: without a mask and a cache, transformers reads a
    jump in ``position_ids`` (such as EndPrompt's ``0..a-1, L-t..L-1``) as the start of another
    packed sequence and masks attention across it; the mask keeps plain causal attention.
    """
    device = next(model.parameters()).device

    @torch.no_grad()
    def logits_fn(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.to(device)
        out = model(
            input_ids=input_ids,
            position_ids=position_ids.to(device),
            attention_mask=torch.ones_like(input_ids),
            use_cache=False,
        )
        return out.logits.float()

    return logits_fn


def _read_jsonl(path: str, key: str, tokenizer: Any) -> list[list[int]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ppl-jsonl {path}: no such file")
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"--ppl-jsonl {path}:{lineno}: no JSON key {key!r}") from err
            if not isinstance(text, str):
                raise ValueError(f"--ppl-jsonl {path}:{lineno}: {key!r} is not a string")
            docs.append(tokenizer.tokenize(text))
    return docs


def _read_indexed(
    prefix: str, length: int, max_windows: int | None, from_end: bool
) -> list[np.ndarray]:
    """Documents of a .bin/.idx pair, read until ``max_windows`` windows of ``length`` fit."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(f"--ppl-data {prefix}: {prefix + ext} is missing")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    docs, windows = [], 0
    order = range(len(dataset) - 1, -1, -1) if from_end else range(len(dataset))
    for i in order:
        doc = np.asarray(dataset[i], dtype=np.int64)
        docs.append(doc)
        # perplexity.make_windows cuts ceil((n - L) / L) windows of L + 1 tokens from n tokens.
        windows += max(0, -(-(len(doc) - length) // length))
        if max_windows is not None and windows >= max_windows:
            break
    return docs


def load_ppl_documents(
    ppl_data: str | None,
    ppl_jsonl: str | None,
    tokenizer: Any,
    length: int,
    max_windows: int | None = None,
    json_key: str = "text",
    from_end: bool = False,
) -> list[Any]:
    """The perplexity corpus as token-id sequences, from exactly one of two sources.

    Args:
        ppl_data: Megatron ``.bin/.idx`` prefix (already tokenized; read lazily, only as many
            documents as ``max_windows`` windows need).
        ppl_jsonl: JSONL file, one document per line under ``json_key`` (tokenized here).
        tokenizer: the model's tokenizer (JSONL only).
        length: perplexity context L; a document needs L + 1 tokens to give a window.
        max_windows: windows that will be scored (None: all documents are read).
        json_key: JSON key of the JSONL documents.
        from_end: read ``ppl_data`` from its last document backwards. Megatron's ``--split``
            gives the training split the first documents, so the last ones are held out.

    Raises:
        ValueError: naming the flag when no document has L + 1 tokens, or a JSONL line is bad.
        FileNotFoundError: naming the flag when the files are missing.
    """
    if (ppl_data is None) == (ppl_jsonl is None):
        raise ValueError("give exactly one of --ppl-data and --ppl-jsonl")
    if ppl_data is not None:
        flag, source = "--ppl-data", ppl_data
        docs = _read_indexed(ppl_data, length, max_windows, from_end)
    else:
        flag, source = "--ppl-jsonl", ppl_jsonl
        docs = _read_jsonl(ppl_jsonl, json_key, tokenizer)
    if not any(len(d) > length for d in docs):
        raise ValueError(
            f"{flag} {source}: no document has {length + 1} tokens (needed for --ppl-length "
            f"{length}; {len(docs)} documents read)"
        )
    return docs
