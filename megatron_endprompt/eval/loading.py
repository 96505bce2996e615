"""Load a model for evaluation and wrap it as a ``LogitsFn``.

Two sources:

- ``load_megatron_model``: a Megatron checkpoint directory in either format (per-shard torch files
  of CPU training and conversions, or megatron-core dist_checkpointing of CUDA training), saved at
  any TP/PP/VPP layout. The model is built at the evaluation's tensor-parallel size (one rank per
  TP shard under torchrun, PP = 1) and each rank loads its shard (``checkpoint/stored.py``).
- ``load_hf_model``: a Hugging Face directory, through ``AutoModelForCausalLM`` in float32.

Both wrap as a KV-cached ``LogitsFn`` (``eval/decoding.py``).

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
from megatron.core import parallel_state as ps
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_endprompt import device as dev
from megatron_endprompt.checkpoint.stored import open_checkpoint, rank_state_dict
from megatron_endprompt.checkpoint.weights import load_megatron_state_dict
from megatron_endprompt.config import ModelConfig, ParallelConfig, RopeScalingConfig
from megatron_endprompt.eval.decoding import HFLogitsFn, MegatronLogitsFn
from megatron_endprompt.model.gpt import build_model


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
    try:
        load_megatron_state_dict(model, sd)
    except (ValueError, RuntimeError) as err:
        # torch lists every size mismatch on its own line; the first one names the problem.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise ValueError(f"--load {load_dir}: weights do not match the model: {detail}") from err


def _eval_spec(config: ModelConfig, device: torch.device) -> ModelConfig:
    """The layer spec to evaluate with: the recorded one, except ``te`` without CUDA and TE."""
    if config.transformer_impl == "te" and (
        device.type != "cuda" or not dev.transformer_engine_available()
    ):
        return dataclasses.replace(config, transformer_impl="local")  # same weights, torch SDPA
    return config


def load_megatron_model(
    load_dir: str,
    iteration: int | None = None,
    device: str | torch.device = "cpu",
    rope_scaling_override: RopeScalingConfig | None = None,
    max_position_override: int | None = None,
) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """Build the EndPromptGPTModel of a checkpoint and load its weights (eval mode).

    Reads either checkpoint format at any saved TP/PP/VPP layout (see ``checkpoint/stored.py``)
    and builds the model at the tensor-parallel size of megatron's parallel state (set up by the
    caller under torchrun; a single process gets TP = 1): each rank loads its own shard. A
    ``te``-spec checkpoint is evaluated with the ``local`` spec (same weights, torch SDPA) where
    Transformer Engine cannot run.

    Args:
        load_dir: the ``--load`` directory (holding the tracker file).
        iteration: which iteration; None reads the tracker.
        device: where the model goes ("cpu", "cuda", "cuda:1", ...).
        rope_scaling_override: evaluate under this RoPE scaling instead of the checkpoint's.
        max_position_override: the context window to evaluate up to, instead of the
            checkpoint's ``max_position_embeddings``.

    Returns:
        ``(model, model_config, meta)``; meta holds the checkpoint path, format, saved layout,
        iteration, RoPE scaling (and whether it was overridden), max position and the seeds.

    Raises:
        FileNotFoundError: no checkpoint in ``load_dir``.
        ValueError: unreadable checkpoint, missing config, or mismatched weights.
    """
    ckpt = open_checkpoint(load_dir, iteration, where=f"--load {load_dir}")
    device = torch.device(device)
    config = _eval_spec(ckpt.model_config, device)
    config = _apply_overrides(config, rope_scaling_override, max_position_override)
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    dev.ensure_model_parallel(parallel)  # a single process gets its 1-rank group here
    model = build_model(config, parallel, seed=0)
    tp_rank = ps.get_tensor_model_parallel_rank()
    _load_weights(model, rank_state_dict(ckpt, config, (tp, tp_rank)), load_dir)
    model = model.to(device).eval()
    meta = {
        "checkpoint": os.path.abspath(ckpt.path),
        "format": ckpt.format,
        "saved_layout": None if ckpt.layout is None else dict(zip(("tp", "pp"), ckpt.layout)),
        "tensor_model_parallel_size": tp,
        "iteration": ckpt.iteration,
        "rope_scaling": config.rope_scaling.to_dict(),
        "rope_scaling_overridden": rope_scaling_override is not None,
        "max_position_embeddings": config.max_position_embeddings,
        "seeds": _seeds(ckpt.record),
    }
    return model, config, meta


def megatron_logits_fn(
    model: torch.nn.Module, device: str | torch.device, vocab_size: int
) -> MegatronLogitsFn:
    """A ``CachedLogitsFn`` over an EndPromptGPTModel.

    Args:
        model: the model (eval mode, on ``device``, one pipeline stage).
        device: where the inputs are moved.
        vocab_size: the real vocabulary (``model_config.vocab_size``): Megatron pads the output
            layer, and the padded rows are dropped so they can neither win an argmax nor take
            probability mass.

    Returns:
        ``fn(input_ids [b, s], position_ids [b, s]) -> float32 logits [b, s, vocab_size]``, with
        ``prefill`` / ``extend`` for KV-cached greedy decoding.
    """
    return MegatronLogitsFn(model, device, vocab_size)


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


def hf_logits_fn(model: torch.nn.Module) -> HFLogitsFn:
    """A ``CachedLogitsFn`` over a Hugging Face causal LM; ``position_ids`` are passed explicitly.

    An all-ones ``attention_mask`` is passed too: without a mask and a cache, transformers reads a
    jump in ``position_ids`` (such as EndPrompt's ``0..a-1, L-t..L-1``) as the start of another
    packed sequence and masks attention across it; the mask keeps plain causal attention.
    """
    return HFLogitsFn(model)


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
