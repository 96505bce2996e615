"""Stream whole checkpoints between a Hugging Face Llama directory and our Megatron layout.

Megatron side written by the import (the per-shard format of
:mod:`megatron_endprompt.checkpoint`)::

    OUT/latest_checkpointed_iteration.txt          "0"
    OUT/model_config.json                          ModelConfig as JSON (rope_scaling included)
    OUT/iter_0000000/mp_rank_TT[_PPP]/model_optim_rng.pt   (Megatron-LM's folder names)
        {"model": that rank's state dict, "args": Megatron-LM's namespace, "checkpoint_version":
         3.0, "iteration": 0, "consumed_samples": 0, "format": ..., "model_config": {...}}

The model's key names are those of ``transformer_impl``: ``te`` (the default, as Megatron-LM's
default ``--transformer-impl transformer_engine``): norms fused into ``linear_qkv`` /
``linear_fc1`` (``..._layer_norm_weight``) plus ``None`` ``_extra_state`` entries for every TE
module, so Megatron-LM's strict load finds every key; ``local``: ``input_layernorm.weight``,
``pre_mlp_layernorm.weight``. Our loaders map either set to either spec.

megatron-core numbers decoder layers locally per pipeline stage (``decoder.layers.0`` is the first
layer of every stage), so stage p holds global layers ``p * n/PP .. (p+1) * n/PP - 1``. With tied
embeddings and PP > 1 the last stage holds its own ``output_layer.weight`` (= the embedding).
The export reads either format at any layout through :mod:`megatron_endprompt.checkpoint.stored`
(per-shard files, or dist_checkpointing checkpoints of CUDA runs, TP/PP/VPP as saved).

Memory bound: tensors are read lazily (``safetensors.safe_open`` for Hugging Face, ``torch.load``
with ``mmap=True`` for Megatron shards, one layer's chunks for dist checkpoints) and converted one
layer at a time. Import holds one output
shard (one TP rank of one stage) plus the copies made while converting one layer; export holds one
output file (at most ``max_shard_size``; safetensors serialises it in memory, so twice that while
writing) plus one gathered layer. The largest per-tensor transient is about three copies of the
embedding (2.1 GB each for Llama-3-70B in bf16). Measured on a 640 MB float32 model: about 0.5 GB
of anonymous memory above the interpreter's for import (PP = 2, 320 MB shards) and for export
(200 MB files); the mmapped inputs are reclaimable page cache. Outputs go to a temporary sibling
directory renamed into place only on success.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from tqdm import tqdm

from megatron_endprompt.atomic_io import atomic_write_text, writing
from megatron_endprompt.checkpoint import (
    MODEL_CONFIG_JSON,
    SHARD_FILE,
    TRACKER,
    iteration_dir,
)
from megatron_endprompt.checkpoint.layout import save_torch, shard_dir_name, write_checksum
from megatron_endprompt.checkpoint.megatron_lm import CHECKPOINT_VERSION, conversion_args
from megatron_endprompt.checkpoint.stored import EMBEDDING, StoredCheckpoint, open_checkpoint
from megatron_endprompt.checkpoint.weights import (
    check_shapes,
    megatron_shard_shapes,
    norm_keys,
    shard_for_tensor_parallel,
)
from megatron_endprompt.config import PARAMS_DTYPES, ModelConfig, ParallelConfig
from megatron_endprompt.convert.hf_llama import (
    fuse_qkv,
    hf_config_from_model_config,
    model_config_from_hf,
    split_qkv,
)
from megatron_endprompt.convert.safetensors_io import (
    SafetensorsReader,
    SafetensorsWriter,
    parse_size,
    write_json,
)
from megatron_endprompt.convert.shapes import hf_shapes
from megatron_endprompt.convert.vocab import export_vocab_size

FORMAT = "megatron_endprompt/v1"
_TOKENIZER_RE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|"
    r"chat_template\.(jinja|json)|.*\.model)$"
)


def _check_output(output_dir: str, force: bool, input_dir: str | None = None) -> None:
    if input_dir is not None:
        out, src = os.path.realpath(output_dir), os.path.realpath(input_dir)
        if os.path.commonpath([out, src]) == out:
            raise ValueError(f"--output={output_dir}: is or contains --input={input_dir}")
    if os.path.lexists(output_dir) and not force:
        raise ValueError(f"--output={output_dir}: already exists (pass --force to overwrite it)")


@contextlib.contextmanager
def staged_output(output_dir: str, force: bool) -> Iterator[str]:
    """Yield a temporary directory that replaces ``output_dir`` only if the block succeeds."""
    _check_output(output_dir, force)
    output_dir = os.path.abspath(output_dir)
    tmp, old = f"{output_dir}.tmp-{os.getpid()}", f"{output_dir}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        os.makedirs(tmp)
    try:
        yield tmp
        with writing(output_dir):
            if os.path.lexists(output_dir):
                os.replace(output_dir, old)
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(output_dir):
            os.replace(old, output_dir)  # the earlier output stays as it was
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- Hugging Face -> Megatron


def _hf_layer_to_megatron(
    reader: SafetensorsReader, m: ModelConfig, global_i: int, local_i: int
) -> dict[str, torch.Tensor]:
    """One layer's megatron (TP = 1) tensors, keyed with its stage-local index."""
    hf, mg = f"model.layers.{global_i}.", f"decoder.layers.{local_i}."
    qkv = [reader.get(f"{hf}self_attn.{n}_proj.weight") for n in "qkv"]
    gate_up = [reader.get(f"{hf}mlp.{n}_proj.weight") for n in ("gate", "up")]
    attn_norm, mlp_norm = norm_keys(m, mg)
    return {
        f"{mg}self_attention.linear_qkv.weight": fuse_qkv(*qkv, m.num_query_groups),
        f"{mg}self_attention.linear_proj.weight": reader.get(f"{hf}self_attn.o_proj.weight"),
        f"{mg}mlp.linear_fc1.weight": torch.cat(gate_up, dim=0),
        f"{mg}mlp.linear_fc2.weight": reader.get(f"{hf}mlp.down_proj.weight"),
        attn_norm: reader.get(f"{hf}input_layernorm.weight"),
        mlp_norm: reader.get(f"{hf}post_attention_layernorm.weight"),
    }


def _megatron_shard(
    reader: SafetensorsReader, m: ModelConfig, tp: tuple[int, int], pp: tuple[int, int], bar: tqdm
) -> dict[str, torch.Tensor]:
    """The state dict of TP rank ``tp[1]`` of ``tp[0]``, stage ``pp[1]`` of ``pp[0]``."""
    (tp_size, tp_rank), (pp_size, pp_rank) = tp, pp

    def shard(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return shard_for_tensor_parallel(sd, m, tp_size, tp_rank)

    out: dict[str, torch.Tensor] = {}
    if pp_rank == 0:
        out |= shard({"embedding.word_embeddings.weight": reader.get("model.embed_tokens.weight")})
    per_stage = m.num_layers // pp_size
    for local_i in range(per_stage):
        out |= shard(_hf_layer_to_megatron(reader, m, pp_rank * per_stage + local_i, local_i))
        bar.update(1)
    if pp_rank == pp_size - 1:
        out["decoder.final_layernorm.weight"] = reader.get("model.norm.weight")
        if m.untie_embeddings_and_output_weights:
            out |= shard({"output_layer.weight": reader.get("lm_head.weight")})
        elif pp_size > 1:  # megatron's last stage keeps its own copy of the tied embedding
            out |= shard({"output_layer.weight": reader.get("model.embed_tokens.weight")})
    return out


_TE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj",
               "self_attention.core_attention", "mlp.linear_fc1", "mlp.linear_fc2")  # fmt: skip


def _te_extra_states(m: ModelConfig, sd: Mapping[str, torch.Tensor]) -> dict[str, None]:
    """The ``_extra_state`` keys a megatron-core TE-spec model has (None: no FP8 metadata)."""
    if m.transformer_impl != "te":
        return {}
    layers = sorted({k.split(".")[2] for k in sd if k.startswith("decoder.layers.")}, key=int)
    out = {f"decoder.layers.{i}.{mod}._extra_state": None for i in layers for mod in _TE_MODULES}
    if "output_layer.weight" in sd:
        out["output_layer._extra_state"] = None
    return out


def _hf_model_config(input_dir: str, seq_length: int | None, **overrides: Any) -> ModelConfig:
    path = os.path.join(input_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input={input_dir}: no config.json (not a Hugging Face model)")
    with open(path, encoding="utf-8") as f:
        hf_config = json.load(f)
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if dtype in PARAMS_DTYPES:
        overrides.setdefault("params_dtype", dtype)
    try:
        return model_config_from_hf(hf_config, seq_length, **overrides)
    except (TypeError, KeyError) as err:  # missing or null fields in config.json
        raise ValueError(f"--input: {path} is not a Llama/Mistral config: {err!r}") from err


def convert_hf_to_megatron(
    input_dir: str,
    output_dir: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seq_length: int | None = None,
    force: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> ModelConfig:
    """Write a Hugging Face Llama/Mistral directory as our Megatron checkpoint (iteration 0).

    Args:
        input_dir: Directory with ``config.json`` and ``*.safetensors`` (sharded or single).
        output_dir: Checkpoint directory to create (``--load`` it with ``--finetune``).
        tensor_model_parallel_size: TP size of the output shards.
        pipeline_model_parallel_size: PP size of the output shards.
        seq_length: Training sequence length recorded in the model config (None: see
            :func:`model_config_from_hf`).
        force: Replace an existing ``output_dir``.
        progress: Show a progress bar on stderr.
        **overrides: ModelConfig fields (``transformer_impl``, ``rope_scaling``, ...).

    Returns:
        The model config written to ``model_config.json``.

    Raises:
        ValueError / FileNotFoundError: Naming the flag, file or tensor at fault; nothing is
            left at ``output_dir`` then.
    """
    _check_output(output_dir, force, input_dir)
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"--input={input_dir}: no such directory")
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    m = _hf_model_config(input_dir, seq_length, **overrides)
    m.validate_against(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    )
    reader = SafetensorsReader(input_dir)
    found = {k: s for k, s in reader.shapes().items() if not k.endswith("rotary_emb.inv_freq")}
    if not m.untie_embeddings_and_output_weights:
        found.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    check_shapes(found, hf_shapes(m), f"--input={input_dir}")
    config, args = m.to_dict(), conversion_args(m, tp, pp)
    bar = tqdm(total=m.num_layers * tp, unit="layer", disable=not progress, dynamic_ncols=True)
    with bar, staged_output(output_dir, force) as tmp:
        for pp_rank in range(pp):
            expected = megatron_shard_shapes(m, tp, pp, pp_rank)
            for tp_rank in range(tp):
                name = shard_dir_name(tp_rank, pp_rank, pp)
                bar.set_description(name)
                sd = _megatron_shard(reader, m, (tp, tp_rank), (pp, pp_rank), bar)
                check_shapes({k: v.shape for k, v in sd.items()}, expected, name)
                sd |= _te_extra_states(m, sd)
                with writing(iteration_dir(tmp, 0)):
                    os.makedirs(os.path.join(iteration_dir(tmp, 0), name))
                state = {"model": sd, "args": args, "checkpoint_version": CHECKPOINT_VERSION,
                         "iteration": 0, "consumed_samples": 0, "format": FORMAT,
                         "model_config": config}  # fmt: skip
                shard_path = os.path.join(iteration_dir(tmp, 0), name, SHARD_FILE)
                save_torch(state, shard_path)
                write_checksum(shard_path)
                del sd, state
        write_json(os.path.join(tmp, MODEL_CONFIG_JSON), config)
        atomic_write_text(os.path.join(tmp, TRACKER), "0\n")
    return m


# ---------------------------------------------------------------- Megatron -> Hugging Face


def _megatron_layer_to_hf(
    sd: Mapping[str, torch.Tensor], m: ModelConfig, local_i: int, global_i: int
) -> dict[str, torch.Tensor]:
    """One merged (TP = 1) megatron layer as Hugging Face tensors of global layer ``global_i``."""
    mg, hf = f"decoder.layers.{local_i}.", f"model.layers.{global_i}."
    q, k, v = split_qkv(
        sd[f"{mg}self_attention.linear_qkv.weight"], m.num_attention_heads, m.num_query_groups
    )
    gate, up = torch.chunk(sd[f"{mg}mlp.linear_fc1.weight"], 2, dim=0)
    attn_norm, mlp_norm = norm_keys(m, mg)
    out = {
        "self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
        "self_attn.o_proj": sd[f"{mg}self_attention.linear_proj.weight"],
        "mlp.gate_proj": gate, "mlp.up_proj": up, "mlp.down_proj": sd[f"{mg}mlp.linear_fc2.weight"],
        "input_layernorm": sd[attn_norm], "post_attention_layernorm": sd[mlp_norm],
    }  # fmt: skip
    return {f"{hf}{name}.weight": t for name, t in out.items()}


def _tokenizer_files(tokenizer_dir: str) -> list[str]:
    """Paths of the tokenizer files (tokenizer*, special_tokens_map.json, *.model, ...) of a dir."""
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"--tokenizer-dir={tokenizer_dir}: no such directory")
    names = [n for n in sorted(os.listdir(tokenizer_dir)) if _TOKENIZER_RE.match(n)]
    if not names:
        raise FileNotFoundError(f"--tokenizer-dir={tokenizer_dir}: no tokenizer files in it")
    return [os.path.join(tokenizer_dir, n) for n in names]


def _export_tensors(
    ckpt: StoredCheckpoint, m: ModelConfig, writer: SafetensorsWriter, progress: bool
) -> None:
    """Append every tensor, gathered to full size one layer at a time, in Hugging Face order."""
    writer.add("model.embed_tokens.weight", ckpt.embedding()[: m.vocab_size])
    for i in tqdm(range(m.num_layers), unit="layer", disable=not progress):
        for name, tensor in _megatron_layer_to_hf(ckpt.layer(i), m, i, i).items():
            writer.add(name, tensor)
    writer.add("model.norm.weight", ckpt.final_norm())
    if m.untie_embeddings_and_output_weights:
        writer.add("lm_head.weight", ckpt.output_layer()[: m.vocab_size])


def convert_megatron_to_hf(
    input_dir: str,
    output_dir: str,
    target_length: int | None = None,
    max_shard_size: str | int = "5GB",
    tokenizer_dir: str | None = None,
    force: bool = False,
    progress: bool = True,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Write a Megatron checkpoint (either format, any TP/PP/VPP) as a Hugging Face Llama directory.

    The embedding and output layer lose Megatron's padding rows: the export has the tokenizer's
    vocabulary size (:func:`.vocab.export_vocab_size`: ``vocab_size``, the checkpoint's own
    record, or ``tokenizer_dir``'s ``config.json`` / tokenizer for Megatron-LM checkpoints).

    Args:
        input_dir: Checkpoint directory (``--save`` of a CPU or CUDA training run, or
            ``hf-to-megatron`` output): per-shard torch files or dist_checkpointing.
        output_dir: Directory to create: ``config.json`` and ``model.safetensors`` (or
            ``model-0000i-of-0000n.safetensors`` + index above ``max_shard_size``).
        target_length: ``max_position_embeddings`` of the export (the extended window L); None
            takes the run's target length, else the model's ``max_position_embeddings``.
        max_shard_size: Largest output file, e.g. ``"5GB"``.
        tokenizer_dir: Directory whose tokenizer files are copied alongside.
        force: Replace an existing ``output_dir``.
        progress: Show a progress bar on stderr.
        vocab_size: The export's vocabulary size (``--vocab-size``); None: see above.

    Returns:
        The ``config.json`` written (rope_theta and rope_scaling from the model config).

    Raises:
        ValueError / FileNotFoundError: Naming the flag, file or tensor at fault; nothing is
            left at ``output_dir`` then.
    """
    _check_output(output_dir, force, input_dir)
    max_bytes = parse_size(str(max_shard_size))
    if target_length is not None and target_length < 1:
        raise ValueError(f"--target-length={target_length}: must be a positive integer")
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir else []
    ckpt = open_checkpoint(input_dir, where=f"--input={input_dir}")
    m, default_length = ckpt.model_config, ckpt.target_length()
    # Rows of the stored embedding: a dist checkpoint's global tensor, merged shards' TP = 1 size.
    reader = getattr(ckpt, "reader", None)
    rows = reader.shapes[EMBEDDING][0] if reader else m.padded_vocab_size(1)
    vocab = export_vocab_size(m.vocab_size, ckpt.record, vocab_size, tokenizer_dir, rows)
    m = dataclasses.replace(m, vocab_size=vocab)
    hf_config = hf_config_from_model_config(m, target_length or default_length)
    with staged_output(output_dir, force) as tmp:
        writer = SafetensorsWriter(tmp, max_bytes)
        _export_tensors(ckpt, m, writer, progress)
        writer.close()
        write_json(os.path.join(tmp, "config.json"), hf_config)
        for path in tokenizer_files:
            with writing(os.path.join(tmp, os.path.basename(path))):
                shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
    return hf_config
