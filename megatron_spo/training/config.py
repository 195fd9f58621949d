"""`TrainConfig`: everything `megatron-spo train` reads, one dataclass per subsystem.

Loaded strictly from YAML plus dotted overrides by `megatron_spo.config.load_config` (unknown keys
and wrong types are errors); `load_train_config` is the entry the CLI uses. The effective config
is saved beside every run (`save_config`).

Defaults are the SPO authors' (arXiv 2509.13232; their verl recipe `recipe/spo`, run script
`run_spo.sh`, summarised in DESIGN.md) for a Qwen3-8B math run: PPO clip 0.2 / 0.28 with dual
clip 10, token-mean loss, no KL, lr 1e-6, 768 prompts per step (one response each, mini-batches
of 96), responses up to 16k tokens, training sampling at temperature 1, validation at
temperature 0.6 / top-p 0.95 / top-k 20 with 16 samples per prompt. Subsystems that own their
config (value store, prompt building, rewards, weight sync, sandbox, the segment / soft SPO
variants) are composed here, not copied, so each default lives in exactly one place.

Layout (every leaf is settable as `section.key=value` on the command line):

    run_dir, seed, total_steps, total_epochs, max_generated_tokens
    model:      hf_dir, dtype
    parallel:   tp, pp, vpp
    data:       train_files, val_files, prompt_key, answer_key, shuffle, prompt.*
    algorithm:  name (spo | grpo | spo_chain | spo_tree | soft_spo), and one section per
                algorithm holding everything only it reads:
                spo.*       the value store (megatron_spo.value.ValueConfig), offline_values,
                            gen_batch_size, normalize_advantages, advantage_eps, loss.*
                grpo.*      eps, norm_by_std, loss.*
                spo_chain.*, spo_tree.*, soft_spo.* (spo_chain / spo_tree sample with their own
                temperature, top_p, top_k and max_response_tokens, and the loss reads log-probs
                at that temperature; the others use rollout.*; soft_spo's loss reads log-probs at
                temperature 1)
                (loss.*: clip_ratio_low/high/c, loss_agg, kl_coef, kl_estimator, entropy_coef)
    rollout:    mode (sync | async), max_inflight, max_staleness, partial_rollout,
                off_policy_correction, is_cap (megatron_spo.training.rollout_config),
                n, temperature, top_p, top_k, max_response_tokens, agent loop, offload_actor,
                engine.* (megatron_spo.rollout.engine.EngineConfig: name, dtype, max_model_len,
                max_num_seqs, tensor_parallel_size, kv_cache_gib, gpu_memory_utilization,
                enable_sleep_mode), reward.*, weight_sync.*, sandbox.*
    optimizer:  lr, weight_decay, betas, eps, grad_clip, warmup_steps, schedule, min_lr_ratio,
                distributed
    batch:      train_batch_size, mini_batch_size, micro_batch_size, max_tokens_per_micro_batch,
                epochs
    checkpoint: dir, every_steps, keep_last, resume, export_hf
    eval:       every_steps, before_train, files, and the evaluation itself
                (megatron_spo.training.evaluation.EvalConfig: n, temperature, top_p, top_k,
                max_response_tokens, ks, correct_min_score, group_by, prompts_per_call,
                prompt_key, answer_key)
    logging:    metrics_jsonl, tensorboard, wandb, wandb_project, progress_bar

Keys that moved since earlier versions (`spo.*`, `loss.*`, `batch.gen_batch_size`, the flat
`algorithm.*` advantage settings, the engine knobs under `rollout.*`) are refused with one line
naming their new key (`TrainConfig.MOVED`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal, Sequence

from megatron_spo.config import load_config
from megatron_spo.errors import UserError
from megatron_spo.rollout.prompts import PromptConfig
from megatron_spo.training.algorithms.segment_chain import SegmentChainConfig
from megatron_spo.training.algorithms.segment_tree import SegmentTreeConfig
from megatron_spo.training.algorithms.soft_spo import SoftSPOConfig
from megatron_spo.training.evaluation import EvalConfig
from megatron_spo.training.rollout_config import RolloutConfig, check_async, check_rollout_ranks
from megatron_spo.value.config import ValueConfig

Algorithm = Literal["spo", "grpo", "spo_chain", "spo_tree", "soft_spo"]
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _check_files(key: str, files: Sequence[str]) -> None:
    for f in files:
        path = Path(f)
        if path.suffix not in DATA_SUFFIXES:
            raise UserError(f"{key}: {f!r} is not a {' / '.join(DATA_SUFFIXES)} file")
        if not path.is_file():
            raise UserError(f"{key}: dataset file {f!r} does not exist")


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    hf_dir: str
    """Hugging Face model directory (config.json, safetensors weights, tokenizer) to start from.
    Llama, Qwen2 and Qwen3 architectures are supported."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter/compute dtype of the actor. "auto": bfloat16 on GPU (the authors' setting),
    float32 on CPU (so CPU runs are exactly reproducible)."""

    def __post_init__(self):
        if not (Path(self.hf_dir) / "config.json").is_file():
            raise UserError(f"model.hf_dir: {self.hf_dir!r} is not a Hugging Face model directory (no config.json)")


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (ranks sharing each layer). Must divide the attention heads."""
    pp: int = 1
    """Pipeline-parallel size (stages). tp * pp must divide the world size; the rest is DP."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None = not interleaved."""
    recompute: Literal["none", "full"] = "none"
    """Activation recompute of the actor: "full" keeps only each transformer layer's input and
    recomputes the layer in backward (Megatron's full / uniform / 1 layer, as verl sets it for
    long sequences): activation memory ~ one layer instead of all, for ~1/3 more compute.
    The same numbers either way."""
    sequence_parallel: bool | None = None
    """Megatron's sequence parallelism: outside the attention and MLP matmuls (norms, residuals,
    dropout, the layer inputs that recompute keeps) each TP rank holds 1/tp of the sequence;
    all-reduces become reduce-scatter + all-gather. None = on when tp > 1 (verl's default).
    Micro-batches are padded to a multiple of tp. The same numbers up to summation order."""
    rollout_ranks: int = 0
    """Disaggregated placement (`rollout.mode: async` only): the last K ranks of the torchrun job
    only generate (one engine each, `rollout.remote`), the first world - K only train, and
    trainer rank i streams from rollout rank i, so generation and training run at once on
    different devices. K must equal the number of trainer ranks (one rollout rank per trainer;
    tp = pp = 1 as for every async run). 0 = colocated: every rank trains and generates."""

    @property
    def sequence_parallel_enabled(self) -> bool:
        return self.tp > 1 and self.sequence_parallel is not False

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.vpp is not None and (self.vpp < 1 or (self.vpp > 1 and self.pp == 1)):
            raise ValueError(f"vpp={self.vpp} needs pp > 1 (and vpp >= 1)")
        if self.rollout_ranks < 0:
            raise ValueError(f"rollout_ranks must be >= 0, got {self.rollout_ranks}")


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    train_files: list[str]
    """Training prompts: .jsonl / .json / .parquet files, one record per prompt."""
    val_files: list[str] = dataclasses.field(default_factory=list)
    """Held-out prompts for periodic evaluation (same format); empty = no evaluation."""
    prompt_key: str = "prompt"
    """Record field holding the prompt (a string or a list of chat messages)."""
    answer_key: str = "answer"
    """Record field holding the ground-truth answer the reward compares against."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by `seed`); the value store's pool is
    the next `algorithm.spo.gen_batch_size` prompts of this order."""
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    """How prompts become token ids: answer-format suffix, chat template, length limit
    (`max_prompt_tokens`, the authors' 2048) and what happens to longer ones."""

    def __post_init__(self):
        if not self.train_files:
            raise ValueError("train_files must name at least one dataset file")
        _check_files("data.train_files", self.train_files)
        _check_files("data.val_files", self.val_files)


@dataclasses.dataclass(kw_only=True)
class PolicyLossConfig:
    clip_ratio_low: float = 0.2
    """PPO clip below 1: ratio floor 1 - 0.2 on positive advantages (the authors')."""
    clip_ratio_high: float = 0.28
    """PPO clip above 1: ratio ceiling 1 + 0.28 (clip-higher, DAPO; the authors')."""
    clip_ratio_c: float = 10.0
    """Dual clip: loss bounded by -A * 10 where A < 0 (the authors' / verl's)."""
    loss_agg: Literal["token-mean", "seq-mean"] = "token-mean"
    """Token-mean weighs every response token equally (the authors'); seq-mean every sequence."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the frozen initial policy; 0 = off and no reference model
    is kept (the authors' setting)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator when kl_coef > 0 (k3 = verl's low_var_kl)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (0 = off, the authors' setting)."""

    def __post_init__(self):
        if not 0 <= self.clip_ratio_low < 1 or self.clip_ratio_high < 0:
            raise ValueError(
                "need 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, "
                f"got {self.clip_ratio_low}, {self.clip_ratio_high}"
            )
        if self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c must be > 1, got {self.clip_ratio_c}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError("kl_coef and entropy_coef must be >= 0")


@dataclasses.dataclass(kw_only=True)
class SPOConfig(ValueConfig):
    """Single-stream SPO: the value store's settings (megatron_spo.value.ValueConfig), where its
    priors come from, how the batch is sampled from the pool, the advantage and the loss."""

    offline_values: str | None = None
    """offline_values.json ({prompt: [scores...]}) from `megatron-spo values estimate/merge`;
    None = every prompt starts at Beta(0.5, 0.5)."""
    gen_batch_size: int = 14000
    """Sampling pool: each step draws batch.train_batch_size prompts, weighted by the value
    tracker, from the next gen_batch_size prompts of the shuffled dataset (the authors' 14000)."""
    normalize_advantages: bool = True
    """Normalise r - p_hat over the batch of sequences (the authors do)."""
    advantage_eps: float = 1e-8
    """Added to the batch std in the normalisation (the authors' value)."""
    drift_tokens: Literal["model", "all"] = "model"
    """Which tokens of a prompt's stored response the KL drift D (hence rho) averages over:
    `model`, the tokens the policy wrote (tool output, which the policy did not choose, left out);
    `all`, every response token as the authors' recipe does (the same without the tool agent)."""
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    """The PPO-clip policy loss (the authors': clip 0.2 / 0.28, dual clip 10, token-mean, no KL)."""

    def __post_init__(self):
        super().__post_init__()
        if self.offline_values is not None and not Path(self.offline_values).is_file():
            raise UserError(f"offline_values: file {self.offline_values!r} does not exist")
        if self.gen_batch_size < 1:
            raise ValueError(f"gen_batch_size must be >= 1, got {self.gen_batch_size}")
        if self.advantage_eps <= 0:
            raise ValueError(f"advantage_eps must be > 0, got {self.advantage_eps}")


@dataclasses.dataclass(kw_only=True)
class GRPOConfig:
    """GRPO: the group baseline over rollout.n responses per prompt, and the loss."""

    eps: float = 1e-6
    """Added to the group std (verl's value)."""
    norm_by_std: bool = True
    """Divide by the group std; False = mean-centred only (Dr. GRPO)."""
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    """The PPO-clip policy loss (the same defaults as SPO's, for a like-for-like baseline)."""

    def __post_init__(self):
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


@dataclasses.dataclass(kw_only=True)
class AlgorithmConfig:
    name: Algorithm = "spo"
    """spo: Single-stream SPO (one response per prompt, value-tracker baseline);
    grpo: group baseline over rollout.n responses; spo_chain / spo_tree: Segment Policy
    Optimization; soft_spo: Soft Policy Optimization."""
    spo: SPOConfig = dataclasses.field(default_factory=SPOConfig)
    """Single-stream SPO: value store, offline priors, sampling pool, advantage, PPO loss."""
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    """The GRPO baseline: group advantage and PPO loss."""
    spo_chain: SegmentChainConfig = dataclasses.field(default_factory=SegmentChainConfig)
    """Segment Policy Optimization, chain variant (seed 003)."""
    spo_tree: SegmentTreeConfig = dataclasses.field(default_factory=SegmentTreeConfig)
    """Segment Policy Optimization, tree variant (seed 003)."""
    soft_spo: SoftSPOConfig = dataclasses.field(default_factory=SoftSPOConfig)
    """Soft Policy Optimization (seed 004)."""


@dataclasses.dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate (the authors' actor lr)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (verl's actor default)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates (torch / verl defaults)."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (verl's default); 0 = no clipping."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps (the authors use none)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warmup, over the run's optimizer steps (the authors': constant)."""
    min_lr_ratio: float = 0.0
    """cosine / linear: the final lr as a fraction of lr."""
    distributed: bool | None = None
    """Megatron's distributed optimizer: Adam moments and fp32 master weights sharded over
    data-parallel ranks (ZeRO-1). None = on GPU yes, on CPU no (it runs there too when set)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0 or self.eps <= 0:
            raise ValueError("weight_decay, grad_clip and warmup_steps must be >= 0 and eps > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(kw_only=True)
class BatchConfig:
    train_batch_size: int = 768
    """Prompts per training step (the DESIGN reference run: 768 prompts x 1 response for SPO;
    the GRPO baseline uses 96 prompts x 8)."""
    mini_batch_size: int = 96
    """Prompts per optimizer step (the authors' 96 for SPO, i.e. 8 updates per step); with
    rollout.n > 1 a mini-batch holds mini_batch_size * n sequences (verl semantics)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward when max_tokens_per_micro_batch is None."""
    max_tokens_per_micro_batch: int | None = 18432
    """Dynamic batching: pack sequences into micro-batches of at most this many tokens (the
    authors' prompt 2048 + response 16384); None = fixed micro_batch_size."""
    epochs: int = 1
    """Passes over each step's rollout batch (PPO epochs; the authors' 1)."""

    def __post_init__(self):
        for name in ("train_batch_size", "mini_batch_size", "micro_batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_batch_size % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must divide train_batch_size ({self.train_batch_size})"
            )
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError("max_tokens_per_micro_batch must be >= 1 or null")


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    dir: str | None = None
    """Where training checkpoints go; None = RUN_DIR/checkpoints."""
    every_steps: int = 20
    """Save every this many steps (the authors' save_freq); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted after a newer one is complete)."""
    resume: Literal["auto", "never", "overwrite"] = "auto"
    """A run directory belongs to one run (`training.run_dir`). auto: continue the run it holds
    from its latest complete checkpoint (refused when the config differs in anything but logging,
    evaluation, length and saving cadence; each resume's config is kept as
    config.resume-<step>.yaml; a run that stopped before its first step is started again);
    never: start a new run, refused unless the directory is empty;
    overwrite: delete what the directory (and `dir`) holds, then start a new run."""
    export_hf: bool = True
    """Write the final policy as a Hugging Face model to RUN_DIR/hf at the end."""

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError(f"need every_steps >= 0 and keep_last >= 1, got {self.every_steps}, {self.keep_last}")


@dataclasses.dataclass(kw_only=True)
class TrainEvalConfig(EvalConfig):
    """The periodic evaluation during training: when and on what (the schedule below), and how
    (`megatron_spo.training.evaluation.EvalConfig`, with the defaults training uses)."""

    every_steps: int = 20
    """Evaluate every this many steps (the authors' test_freq); 0 = only at the end."""
    before_train: bool = False
    """Also evaluate before the first step (the authors: off)."""
    files: list[str] = dataclasses.field(default_factory=list)
    """Evaluation sets; empty = data.val_files. Each file is reported separately."""
    n: int = 16
    """Samples per prompt: accuracy is avg@n, and pass@k / maj@k use them (the authors' 16;
    the paper reports maj@32 with n = 32)."""
    max_response_tokens: int | None = None
    """New tokens per response at most; None = rollout.max_response_tokens."""
    prompt_key: str | None = None
    """Record field of the prompt in the evaluation sets; None = data.prompt_key."""
    answer_key: str | None = None
    """Record field of the ground truth in the evaluation sets; None = data.answer_key."""

    def __post_init__(self):
        super().__post_init__()
        _check_files("eval.files", self.files)
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0, got {self.every_steps}")


@dataclasses.dataclass(kw_only=True)
class LoggingConfig:
    metrics_jsonl: bool = True
    """Append one JSON object per step to RUN_DIR/metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard events to RUN_DIR/tensorboard (skipped with a notice if tensorboard is
    not installed: `pip install megatron-spo[observe]`)."""
    wandb: bool = False
    """Log to Weights & Biases (needs `wandb` installed and a login)."""
    wandb_project: str = "megatron-spo"
    """W&B project."""
    wandb_run_name: str | None = None
    """W&B run name; None = the run directory's name."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""


@dataclasses.dataclass(kw_only=True)
class DryRunConfig:
    """`megatron-spo train --dry-run`: the GPU cluster the real step is simulated on (on a
    CPU-only machine; see megatron_spo/dry_run/)."""

    nodes: int = 1
    """Nodes of the simulated cluster."""
    gpus_per_node: int = 8
    """GPUs per node; world size = nodes x gpus_per_node (must split into parallel.tp x parallel.pp)."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU in GiB (80: H100 / A100-80GB); the memory plan is checked against it."""
    report_file: str | None = None
    """Also write every role's measurements and the plan as JSON here (benches, tests)."""
    require_fit: bool = False
    """True: exit with one line naming the phase and its largest item when a phase's peak exceeds
    gpu_memory_gib. False (for now): print the verdict in the plan and exit 0; the recipes are made
    to fit by the GPU-readiness II work (colocation offload, recompute, sequence parallelism)."""

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"dry_run.nodes and dry_run.gpus_per_node must be >= 1, got {self.nodes}, {self.gpus_per_node}")
        if self.gpu_memory_gib <= 0:
            raise ValueError(f"dry_run.gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


_ENGINE_KEYS = ("dtype", "max_model_len", "max_num_seqs", "tensor_parallel_size", "kv_cache_gib",
                "gpu_memory_utilization", "enable_sleep_mode")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    MOVED: ClassVar[dict[str, str | tuple[str, ...]]] = {
        "spo": "algorithm.spo",
        "loss": ("algorithm.spo.loss", "algorithm.grpo.loss"),
        "batch.gen_batch_size": "algorithm.spo.gen_batch_size",
        "algorithm.normalize_advantages": "algorithm.spo.normalize_advantages",
        "algorithm.spo_advantage_eps": "algorithm.spo.advantage_eps",
        "algorithm.grpo_eps": "algorithm.grpo.eps",
        "algorithm.grpo_norm_by_std": "algorithm.grpo.norm_by_std",
        "rollout.engine": "rollout.engine.name",
        **{f"rollout.{key}": f"rollout.engine.{key}" for key in _ENGINE_KEYS},
    }
    """Old key -> new key(s): a config that still uses an old key is refused naming the new one."""

    model: ModelConfig
    """The policy to start from."""
    data: DataConfig
    """Training and validation prompts."""
    run_dir: str = "runs/default"
    """Output directory: effective config, metrics, TensorBoard events, checkpoints, export."""
    seed: int = 0
    """Seed of everything random (data order, sampling, dropout-free init of new parts)."""
    total_steps: int | None = None
    """Training steps; None = total_epochs passes over the training prompts."""
    total_epochs: int = 500
    """Passes over the training prompts when total_steps is None (the authors' 500: run until
    stopped). A step consumes SPO's pool of algorithm.spo.gen_batch_size prompts (the authors'
    dataloader batch), the other algorithms' batch.train_batch_size; `data/epoch` reports it."""
    max_generated_tokens: int | None = None
    """Also stop once the run has generated this many tokens (`rollout/total_generated_tokens`:
    responses, SPO-chain continuations and SPO-tree nodes count; soft-SPO's one-off reference
    samples for Q0 are reported apart, as `rollout/reference_tokens`); None = no limit. Compares
    algorithms at equal sampling cost."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: TrainEvalConfig = dataclasses.field(default_factory=TrainEvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    dry_run: DryRunConfig = dataclasses.field(default_factory=DryRunConfig)
    """The simulated cluster of `train --dry-run` (read only by the dry run)."""

    def __post_init__(self):
        if self.total_steps is not None and self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or null, got {self.total_steps}")
        if self.total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {self.total_epochs}")
        if self.max_generated_tokens is not None and self.max_generated_tokens < 1:
            raise ValueError(f"max_generated_tokens must be >= 1 or null, got {self.max_generated_tokens}")
        name = self.algorithm.name
        if self.rollout.n is None:  # resolve, so the saved effective config states it
            self.rollout.n = 8 if name == "grpo" else 1
        if name == "spo" and self.rollout.n != 1:
            raise UserError(
                f"rollout.n={self.rollout.n}: algorithm 'spo' is single-stream (one response per prompt); "
                "use n=1 or algorithm.name=grpo"
            )
        if name == "grpo" and self.rollout.n < 2:
            raise UserError(
                f"rollout.n={self.rollout.n}: algorithm 'grpo' needs at least 2 responses per prompt "
                "for a group baseline"
            )
        if name in ("spo_chain", "spo_tree") and self.rollout.agent == "tool":
            raise UserError(f"rollout.agent=tool: {name} cuts responses into segments and continues them, "
                            "which does not cross tool output; use spo, grpo or soft_spo with the tool agent")
        if name == "spo_tree" and self.rollout.n != 1:
            raise UserError(f"rollout.n={self.rollout.n}: spo_tree samples by its branching factors "
                            "(algorithm.spo_tree.branching_factors); leave n at 1")
        if name == "spo" and self.algorithm.spo.gen_batch_size < self.batch.train_batch_size:
            raise UserError(
                f"algorithm.spo.gen_batch_size ({self.algorithm.spo.gen_batch_size}) must be >= "
                f"batch.train_batch_size ({self.batch.train_batch_size}): the batch is drawn from that pool"
            )
        check_async(self)

    def run_steps(self, num_prompts: int, prompts_per_step: int) -> int:
        """Training steps of the run: `total_steps`, or `total_epochs` passes over `num_prompts`
        prompts of which a step consumes `prompts_per_step` from the data order (SPO: its pool of
        `algorithm.spo.gen_batch_size`; the others: `batch.train_batch_size`)."""
        return self.total_steps or self.total_epochs * max(1, num_prompts // prompts_per_step)

    def optimizer_steps(self, steps: int) -> int:
        """Optimizer steps in `steps` training steps (one per mini-batch and epoch), the unit of the
        LR schedule's warm-up and decay."""
        b = self.batch
        return steps * b.epochs * (b.train_batch_size // b.mini_batch_size)

    def check_world_size(self, world_size: int) -> int:
        """Refuse parallel / batch sizes that cannot be laid out on `world_size` ranks; return DP.

        Called by the trainer before initialising process groups, so a wrong launch is one clear
        line instead of a hang or a shape error deep in a collective.
        """
        tp, pp = self.parallel.tp, self.parallel.pp
        world_size = check_rollout_ranks(self, world_size)
        if world_size % (tp * pp):
            raise UserError(
                f"parallel.tp ({tp}) x parallel.pp ({pp}) = {tp * pp} does not divide the world size "
                f"{world_size} (torchrun nodes x processes per node)"
            )
        dp = world_size // (tp * pp)
        rollout_tp = self.rollout.engine.tensor_parallel_size
        if rollout_tp < 1 or world_size % rollout_tp:
            raise UserError(
                f"rollout.engine.tensor_parallel_size ({rollout_tp}) must divide the world size {world_size}: "
                f"an engine spans a block of that many consecutive ranks"
            )
        n = self.rollout.n or 1
        for key, prompts in (("batch.train_batch_size", self.batch.train_batch_size),
                             ("batch.mini_batch_size", self.batch.mini_batch_size)):
            if (prompts * n) % dp:
                raise UserError(
                    f"{key} ({prompts} prompts x {n} responses = {prompts * n} sequences) is not divisible "
                    f"by the data-parallel size {dp} (world {world_size} / (tp {tp} x pp {pp}))"
                )
        return dp

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir is not None else Path(self.run_dir) / "checkpoints"

    @property
    def eval_files(self) -> list[str]:
        return list(self.eval.files) or list(self.data.val_files)

    def eval_config(self) -> EvalConfig:
        """The `EvalConfig` the periodic evaluation runs with: eval.* with its training defaults
        resolved (response length from rollout.*, record fields from data.*). Pass it to
        `evaluation.evaluate` with `prompt=data.prompt` and `seed=seed`."""
        e = self.eval
        return EvalConfig(**{f.name: getattr(e, f.name) for f in dataclasses.fields(EvalConfig)} | {
            "max_response_tokens": e.max_response_tokens or self.rollout.max_response_tokens,
            "prompt_key": e.prompt_key or self.data.prompt_key,
            "answer_key": e.answer_key or self.data.answer_key,
        })


def load_train_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """`megatron-spo train --config PATH key=value ...` -> TrainConfig (UserError on any problem)."""
    return load_config(TrainConfig, path, overrides)
