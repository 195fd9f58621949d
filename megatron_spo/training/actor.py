"""The Megatron actor: model chunks under TP x PP x DP with Megatron's DDP and optimizer.

`Actor.train_step` is one optimizer step over a list of micro-batches, in Megatron's own contract:
`forward_step` returns the model output and a loss function; the loss function returns
`(loss_sum, count, metrics)`; with `calculate_per_token_loss` Megatron sums gradients over
micro-batches and data-parallel ranks and divides once by the global `count` in
`finalize_model_grads`. So a token-mean loss is the exact mean over every token of the global
batch, however it is split into micro-batches and ranks (and a sequence-mean loss is the same
with `count` = number of sequences).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from megatron_spo import platform
from megatron_spo.models.bridge import WeightBridge
from megatron_spo.models.hf_config import ModelSpec
from megatron_spo.platform import ParallelContext
from megatron_spo.training.logprobs import compute_logprobs
from megatron_spo.training.schedule import run_microbatches

if TYPE_CHECKING:
    from megatron_spo.training.config import OptimizerConfig

# loss_fn(logits (b, s, V/tp), micro_batch) -> (loss_sum scalar, count scalar, {name: float tensor})
LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, dict]]


def lr_schedule(optimizer: OptimizerConfig, total_steps: int | None) -> dict[str, float | int | str]:
    """Megatron `OptimizerParamScheduler` lr arguments: linear warm-up from 0 over
    `optimizer.warmup_steps`, then the schedule's decay down to lr x min_lr_ratio at optimizer step
    `total_steps`; a constant rate when the schedule is constant, `total_steps` is None or nothing
    is left after the warm-up."""
    o = optimizer
    decays = total_steps is not None and o.schedule != "constant" and total_steps > o.warmup_steps
    return {
        "init_lr": 0.0 if o.warmup_steps else o.lr,
        "max_lr": o.lr,
        "min_lr": o.lr * o.min_lr_ratio,
        "lr_warmup_steps": o.warmup_steps,
        "lr_decay_steps": total_steps if decays else o.warmup_steps + 1,
        "lr_decay_style": o.schedule if decays else "constant",
    }


class Actor:
    """Megatron model chunks + DDP + optimizer + LR schedule on this rank."""

    def __init__(
        self,
        spec: ModelSpec,
        chunks: Sequence[torch.nn.Module],
        bridge: WeightBridge,
        parallel: ParallelContext,
        optimizer: OptimizerConfig,
        *,
        total_steps: int | None = None,
    ):
        """`optimizer` is the run's optimizer section (training's `optimizer:`, SFT's); the lr
        schedule warms up over `optimizer.warmup_steps` and decays (cosine / linear) down to
        lr x min_lr_ratio over the rest of `total_steps` optimizer steps. With `total_steps` None,
        or a constant schedule, or no steps left after the warm-up, the rate stays at its peak."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.spec, self.bridge, self.parallel, self.optimizer_config = spec, bridge, parallel, optimizer
        o = optimizer
        self.raw_chunks = list(chunks)
        config = self.raw_chunks[0].config
        config.calculate_per_token_loss = True
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=(platform.supports_distributed_optimizer()
                                       if o.distributed is None else o.distributed),
        )
        self.chunks = [
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=(i > 0),
                pg_collection=parallel.pg_collection,
            )
            for i, chunk in enumerate(self.raw_chunks)
        ]
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        dtype = config.params_dtype
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.lr * o.min_lr_ratio,
                weight_decay=o.weight_decay,
                adam_beta1=o.betas[0],
                adam_beta2=o.betas[1],
                adam_eps=o.eps,
                clip_grad=o.grad_clip,
                bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16,
                params_dtype=dtype,
                use_distributed_optimizer=ddp_config.use_distributed_optimizer,
            ),
            self.chunks,
            use_gloo_process_groups=False,
            pg_collection=parallel.pg_collection,
        )
        config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            **lr_schedule(o, total_steps),
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        self.steps = 0

    # ------------------------------------------------------------------ training

    def train_step(self, microbatches: list[dict[str, torch.Tensor]], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over `microbatches` (each a dict with at least `input_ids` (b, s)).

        Returns metrics summed over micro-batches on the last stage and broadcast to all ranks
        (each metric's value is a sum; divide by `count` for a mean), plus `grad_norm`, `lr` and
        `skipped` (1 when the optimizer skipped the step, e.g. a non-finite gradient).
        """
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        device = platform.device()

        def forward_step(data_iterator, model):
            # micro-batches arrive as host tensors; the model and the loss run on the device
            mb = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
            position_ids = torch.arange(mb["input_ids"].shape[1], device=mb["input_ids"].device)
            output = model(mb["input_ids"], position_ids.unsqueeze(0).expand_as(mb["input_ids"]), attention_mask=None)

            def loss(logits):
                loss_sum, count, metrics = loss_fn(logits, mb)
                reported = {k: v.detach().float().reshape(()) for k, v in metrics.items()}
                reported["count"] = count.detach().float().reshape(())
                return loss_sum, count.to(torch.int), reported

            return output, loss

        reports = run_microbatches(self.chunks, self.parallel, forward_step, microbatches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
            self.steps += 1
        metrics = self._reduce_reports(reports)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["skipped"] = 0.0 if ok else 1.0
        return metrics

    def _reduce_reports(self, reports: list[dict]) -> dict[str, float]:
        """Sum per-micro-batch metrics (last stage), sum over DP, broadcast over PP."""
        names = sorted(reports[0]) if reports else []
        par = self.parallel
        holder = [names]
        if par.pp > 1:
            torch.distributed.broadcast_object_list(holder, src=par.pp_ranks[-1], group=par.pp_group)
        names = holder[0]
        # summed on the device: the DP / PP groups are NCCL on GPUs; one copy to the host at the end
        values = torch.zeros(len(names), dtype=torch.float64, device=platform.device())
        if par.is_last_stage:
            for report in reports:
                values += torch.stack([report[n].double() for n in names])
        if par.dp > 1:
            torch.distributed.all_reduce(values, group=par.dp_group)
        if par.pp > 1:
            torch.distributed.broadcast(values, src=par.pp_ranks[-1], group=par.pp_group)
        return dict(zip(names, values.tolist()))

    # ------------------------------------------------------------------ inference and export

    def logprobs(self, input_ids: torch.Tensor, *, micro_batch_size: int = 8, temperature: float = 1.0,
                 with_entropy: bool = False, lengths: torch.Tensor | None = None,
                 max_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """Forward-only log-probs (see `compute_logprobs`; `lengths` + `max_tokens`: dynamic batching)."""
        return compute_logprobs(
            self.raw_chunks, self.parallel, input_ids, micro_batch_size=micro_batch_size,
            temperature=temperature, with_entropy=with_entropy, lengths=lengths, max_tokens=max_tokens,
        )

    def export_hf(self, *, bucket_bytes: int | None = None, dtype: torch.dtype | None = None):
        kwargs = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
        return self.bridge.export_hf(self.raw_chunks, dtype=dtype, **kwargs)


def lm_loss(logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Token-level negative log-likelihood of `targets` where `loss_mask` is 1 (SFT, tests)."""
    from megatron_spo.training.logprobs import vocab_parallel_logprobs

    logprobs, _ = vocab_parallel_logprobs(logits, mb["targets"])
    mask = mb["loss_mask"].float()
    nll_sum = -(logprobs * mask).sum()
    return nll_sum, mask.sum(), {"nll_sum": nll_sum}
