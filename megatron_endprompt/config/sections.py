"""Configuration of a training run besides the model: data, EndPrompt layout, schedule,
checkpoints, logging.

Same conventions as :mod:`megatron_endprompt.config.model` (model, parallel layout, RoPE
scaling): one dataclass per concern, a one-line docstring under each field (the CLI help text),
validation in ``__post_init__`` raising ``ValueError`` that names the flag and the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from megatron_endprompt.config.model import _require
from megatron_endprompt.positions import (
    PLACEMENTS,
    POSE_CHUNK_SAMPLERS,
    POSITION_MODES,
    TERMINAL_SOURCES,
    TERMINALS,
    Placement,
    PoseChunkSampler,
    PositionMode,
    Terminal,
    TerminalSource,
    default_pose_chunk_sampler,
)

MOCK_SPLIT = "1,1,1"
"""megatron-core's split of mock data (BlendedMegatronDatasetConfig sets it whatever --split)."""

CkptFormat = Literal["torch_dist", "torch"]
CKPT_FORMATS: tuple[str, ...] = get_args(CkptFormat)


@dataclass
class DataConfig:
    """Where the training text comes from and how it is tokenized."""

    data_path: list[str] = field(default_factory=list)
    """Megatron blend: PREFIX or W1 PREFIX1 W2 PREFIX2 ... (PREFIX without .bin/.idx)."""
    mock_data: bool = False
    """Synthetic documents instead of --data-path (megatron-core's MockGPTDataset text, under the
    run's tokenizer and position layout; split 1,1,1), to smoke-test a launch."""
    split: str = "969,30,1"
    """Train/valid/test weights of each prefix, as Megatron-LM's --split (missing parts are 0:
    "98,2" is 98,2,0)."""
    data_cache_path: str | None = None
    """Where dataset indices are cached (default: beside the data)."""
    tokenizer_type: str = "SentencePieceTokenizer"
    """Megatron-LM's tokenizer types (SentencePieceTokenizer, GPTSentencePieceTokenizer,
    Llama2Tokenizer, HuggingFaceTokenizer, GPT2BPETokenizer, TikTokenizer, NullTokenizer) or
    ByteTokenizer."""
    tokenizer_model: str | None = None
    """Tokenizer file (.model, tokenizer.json or its directory)."""
    legacy_tokenizer: bool = False
    """Megatron-LM's legacy tokenizer system (its ids, EOD and BOS rules differ)."""
    vocab_file: str | None = None
    """GPT2BPETokenizer vocab.json."""
    merge_file: str | None = None
    """GPT2BPETokenizer merges.txt."""
    vocab_size: int | None = None
    """NullTokenizer: ids below it, EOD = it; TikTokenizer: vocabulary size (default 2**17);
    other tokenizers use their own size (as Megatron-LM)."""
    vocab_extra_ids: int = 0
    """Legacy SentencePieceTokenizer: <extra_id_0..N-1> appended to the vocabulary."""
    tokenizer_special_tokens: list[str] | None = None
    """HuggingFaceTokenizer / GPT2BPETokenizer (default system), TikTokenizer: special tokens."""
    tiktoken_pattern: str | None = None
    """TikTokenizer split pattern v1 or v2 (default v2; required with --legacy-tokenizer)."""
    tiktoken_num_special_tokens: int = 1000
    """TikTokenizer: ids reserved for special tokens below the BPE ranks."""
    eod_mask_loss: bool = False
    """Give the end-of-document label zero weight."""
    num_workers: int = 2
    """DataLoader worker processes per reading rank."""
    mmap_bin_files: bool = True
    """Memory-map the .bin files (Megatron-LM's --no-mmap-bin-files reads them instead)."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, "--num-workers", self.num_workers, "must be >= 0")
        _require(
            not (self.mock_data and self.data_path),
            "--mock-data",
            True,
            "give it or --data-path, not both: a single data source must be provided (as "
            "Megatron-LM)",
        )
        if self.mock_data:
            self.split = MOCK_SPLIT
        self.split_weights()

    def tokenizer_options(self) -> dict:
        """Keyword arguments of ``data.tokenizers.build_tokenizer`` besides type and model."""
        return {
            "legacy": self.legacy_tokenizer,
            "vocab_file": self.vocab_file,
            "merge_file": self.merge_file,
            "vocab_size": self.vocab_size,
            "vocab_extra_ids": self.vocab_extra_ids,
            "special_tokens": self.tokenizer_special_tokens,
            "tiktoken_pattern": self.tiktoken_pattern,
            "tiktoken_num_special_tokens": self.tiktoken_num_special_tokens,
        }

    def split_weights(self) -> tuple[float, float, float]:
        """The train/valid/test weights, read as megatron-core reads --split: the numbers in the
        text (any separators), missing ones 0."""
        parts = [float(p) for p in re.findall(r"[.0-9]+", self.split) if p != "."]
        _require(
            1 <= len(parts) <= 3 and sum(parts) > 0,
            "--split",
            self.split,
            "must be one to three non-negative weights like 969,30,1 or 98,2",
        )
        parts += [0.0] * (3 - len(parts))
        return parts[0], parts[1], parts[2]


@dataclass
class EndPromptConfig:
    """How training samples are laid out in position space (the method)."""

    position_mode: PositionMode | None = None
    """contiguous | endprompt | pose | endprompt_pose (default: endprompt when --target-length is
    given, else contiguous: no context extension unless asked)."""
    target_length: int | None = None
    """Target context window L (positions reach L-1); default: --max-position-embeddings."""
    allow_unscaled_extension: bool = False
    """Confirm a --target-length beyond the RoPE's original context with no RoPE scaling."""
    terminal: Terminal = "cue"
    """cue: append a cue (paper) | tail: the sample's own last tokens (reference code)."""
    placement: Placement = "fixed"
    """fixed: terminal ends at L-1 | random: terminal start drawn per sample."""
    cues: list[str] | None = None
    """Cue strings (default: the paper's EP_1 sentence, 'End.', and the end-of-document token)."""
    tail_length: int = 20
    """Terminal length t in tail mode."""
    terminal_loss_weight: float | None = None
    """Loss weight of terminal predictions (default 0.1 for cue, 1.0 for tail)."""
    pose_num_chunks: int = 2
    """PoSE chunks (pose and endprompt_pose modes)."""
    terminal_source: TerminalSource = "contiguous"
    """Tail text: contiguous (the t tokens after the context) | document_end (its document's last
    t tokens after a gap, the reference code's random mode); tail terminal only."""
    pose_chunk_sampler: PoseChunkSampler | None = None
    """PoSE first-chunk length: paper (l0 ~ U{1..S-1}) | reference (l0 ~ U{1..(S+1)//2});
    unset: reference in a PoSE mode with <= 2 chunks (the replication's evidence), else paper."""
    pose_skip_text: bool = False
    """PoSE: skip a random stretch of text before each later chunk (reference code's v)."""

    def __post_init__(self) -> None:
        if self.position_mode is None:
            self.position_mode = "contiguous" if self.target_length is None else "endprompt"
        _require(
            self.position_mode in POSITION_MODES,
            "--position-mode",
            self.position_mode,
            f"must be one of {', '.join(POSITION_MODES)}",
        )
        _require(
            self.terminal in TERMINALS,
            "--endprompt-terminal",
            self.terminal,
            "must be cue or tail",
        )
        _require(
            self.placement in PLACEMENTS,
            "--endprompt-placement",
            self.placement,
            "must be fixed or random",
        )
        _require(self.tail_length >= 1, "--endprompt-tail-length", self.tail_length, "must be >= 1")
        _require(
            self.pose_num_chunks >= 1, "--pose-num-chunks", self.pose_num_chunks, "must be >= 1"
        )
        if self.terminal_loss_weight is not None:
            _require(
                self.terminal_loss_weight >= 0,
                "--endprompt-terminal-loss-weight",
                self.terminal_loss_weight,
                "must be >= 0",
            )
        if self.target_length is not None:
            _require(self.target_length >= 2, "--target-length", self.target_length, "must be >= 2")
        self._check_fidelity_options()

    def _check_fidelity_options(self) -> None:
        """The reference-code fidelity options: each applies to some layouts only."""
        is_pose = self.position_mode in ("pose", "endprompt_pose")
        if self.pose_chunk_sampler is None:
            self.pose_chunk_sampler = default_pose_chunk_sampler(
                self.position_mode, self.pose_num_chunks
            )
        source, sampler = self.terminal_source, self.pose_chunk_sampler
        _require(
            source in TERMINAL_SOURCES,
            "--endprompt-terminal-source",
            source,
            f"must be one of {', '.join(TERMINAL_SOURCES)}",
        )
        _require(
            source == "contiguous"
            or (self.terminal == "tail" and self.position_mode in ("endprompt", "endprompt_pose")),
            "--endprompt-terminal-source",
            source,
            "needs --endprompt-terminal tail and --position-mode endprompt or endprompt_pose",
        )
        _require(
            sampler in POSE_CHUNK_SAMPLERS,
            "--pose-chunk-sampler",
            sampler,
            "must be paper or reference",
        )
        _require(
            sampler == "paper" or is_pose,
            "--pose-chunk-sampler",
            sampler,
            "needs --position-mode pose or endprompt_pose",
        )
        _require(
            sampler == "paper" or self.pose_num_chunks <= 2,
            "--pose-chunk-sampler",
            sampler,
            f"draws the reference code's two chunks; --pose-num-chunks={self.pose_num_chunks}",
        )
        _require(
            not self.pose_skip_text or is_pose,
            "--pose-skip-text",
            True,
            "needs --position-mode pose or endprompt_pose",
        )
        _require(
            not (self.pose_skip_text and source == "document_end"),
            "--pose-skip-text",
            True,
            "cannot be combined with --endprompt-terminal-source document_end (two text sources)",
        )

    @property
    def is_per_sample_random(self) -> bool:
        """True when two samples of a micro-batch can have different layouts."""
        return self.position_mode in ("pose", "endprompt_pose") or (
            self.position_mode == "endprompt" and self.placement == "random"
        )


@dataclass
class CheckpointConfig:
    """Saving, loading and resuming."""

    save: str | None = None
    """Directory to save checkpoints to."""
    load: str | None = None
    """Directory to load a checkpoint from (resume, or --finetune from converted weights)."""
    save_interval: int = 0
    """Save every N iterations (0: only at the end and on SIGTERM)."""
    keep_last: int | None = None
    """Keep only the newest N checkpoints (default: keep all)."""
    no_load_optim: bool = False
    """Do not load optimizer and scheduler states."""
    no_load_rng: bool = False
    """Do not load RNG states."""
    finetune: bool = False
    """Load weights only; reset iteration, consumed samples, optimizer and scheduler."""
    exit_on_missing_checkpoint: bool = False
    """Fail when --load holds no checkpoint instead of training from scratch (Megatron-LM's
    flag; --finetune always fails then)."""
    exit_signal_handler: bool = True
    """On SIGTERM: save a checkpoint and exit 0."""
    ckpt_format: CkptFormat = "torch_dist"
    """torch_dist (megatron-core dist_checkpointing; CUDA path) | torch (Megatron-LM's legacy
    format: one file per TP/PP shard, plus distrib_optim.pt with the distributed optimizer). The
    CPU path always writes torch: megatron-core's dist writer needs CUDA."""
    use_checkpoint_args: bool = False
    """Take the model shape from the --load checkpoint's recorded arguments (Megatron-LM's
    args, or this package's model config) instead of the shape flags."""
    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, continue the checkpoint's LR/WD schedule, whatever the schedule flags say
    (Megatron-LM's flag). Default: the flags' schedule, which must equal the checkpoint's."""
    override_opt_param_scheduler: bool = False
    """On resume, use the schedule flags' values instead of the checkpoint's (Megatron-LM's
    flag); the schedule's position (samples done) still comes from the checkpoint."""
    dist_ckpt_optim_fully_reshardable: bool = False
    """CUDA, --use-distributed-optimizer: store the optimizer state so it loads at any TP/PP
    (gathered on DP rank 0; Megatron-LM's flag). Default: reshardable along DP only."""

    def __post_init__(self) -> None:
        if self.save_interval is None:
            self.save_interval = 0
        _require(self.save_interval >= 0, "--save-interval", self.save_interval, "must be >= 0")
        _require(
            not (self.use_checkpoint_opt_param_scheduler and self.override_opt_param_scheduler),
            "--override-opt_param-scheduler",
            True,
            "cannot be combined with --use-checkpoint-opt_param-scheduler (as in Megatron-LM)",
        )
        _require(
            self.ckpt_format in CKPT_FORMATS,
            "--ckpt-format",
            self.ckpt_format,
            f"must be one of {', '.join(CKPT_FORMATS)} (torch_dcp and fsdp_dtensor are not "
            "supported)",
        )
        _require(
            not self.use_checkpoint_args or self.load is not None,
            "--use-checkpoint-args",
            True,
            "needs --load",
        )
        if self.keep_last is not None:
            _require(self.keep_last >= 1, "--keep-last", self.keep_last, "must be >= 1")


@dataclass
class LoggingConfig:
    """Console and TensorBoard."""

    log_interval: int = 100
    """Print and record metrics every N iterations."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory (default: no TensorBoard)."""

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, "--log-interval", self.log_interval, "must be >= 1")
