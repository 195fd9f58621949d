"""`megatron-spo train --config FILE.yaml [dotted.key=value ...]`: RL post-training.

Launch with torchrun at any scale:

    torchrun --nproc_per_node 2 -m megatron_spo train --config examples/cpu/spo.yaml total_steps=50

With `parallel.rollout_ranks=K` (and `rollout.mode=async`) the job's last K ranks run the rollout
engines only (`rollout.remote.serve`) and the first K train.

The run directory (`run_dir`) receives config.yaml (the effective config), metrics.jsonl,
TensorBoard events, checkpoints/ (resumed automatically from the latest complete one) and, at the
end, hf/ (the trained model as a Hugging Face directory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_spo.errors import ArgumentParser, UserError


def _check_inputs(config) -> None:
    """What a user can get wrong in the data and the output location, checked before any process
    group, model or run directory exists (the trainer reads the data again, tokenised)."""
    from megatron_spo import atomic
    from megatron_spo.rollout.records import load_prompt_records, load_records

    atomic.check_output_location(config.run_dir, "run_dir", kind="dir")
    data = config.data
    records, repeats = load_prompt_records(data.train_files, data.prompt_key, data.answer_key)
    if repeats and int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank: said once, not per rank
        print(f"data: {repeats} of {repeats + len(records)} records repeat an earlier prompt with the same answer "
              f"and are dropped (each prompt is one value-store entry)", flush=True)
    for path in config.eval_files:  # read at the first evaluation: a bad file fails now, not then
        load_records(path)


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="megatron-spo train", description=__doc__.split("\n\n")[0],
        epilog="Algorithms (algorithm.name): spo (default), grpo, spo_chain, spo_tree, soft_spo. "
               "Every config key can be overridden as dotted.key=value; `--show-config` lists them.",
    )
    parser.add_argument("--config", type=Path, help="YAML file with the TrainConfig sections")
    parser.add_argument("--show-config", action="store_true", help="list every config key with its default and stop")
    parser.add_argument("--no-export", action="store_true", help="do not write RUN_DIR/hf at the end")
    parser.add_argument("--dry-run", action="store_true",
                        help="on a CPU-only machine, run one real step of this GPU config for each rank role of the "
                             "cluster in dry_run.* (nodes, gpus_per_node, gpu_memory_gib) with simulated GPUs: strict "
                             "device checks and a per-GPU memory plan; needs only the model's config.json")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may sit before, between or after the flags
    from megatron_spo.training.config import TrainConfig, load_train_config

    if args.show_config:
        from megatron_spo.config import describe

        print("\n".join(describe(TrainConfig)))
        return 0
    if args.config is not None and not args.config.is_file():
        raise UserError(f"config file {args.config} does not exist")
    if args.dry_run:
        from megatron_spo.dry_run.runner import dry_run

        return dry_run(str(args.config) if args.config else None, args.overrides)
    config = load_train_config(str(args.config) if args.config else None, args.overrides)
    _check_inputs(config)
    from megatron_spo import platform
    from megatron_spo.training.trainer import Trainer

    if platform.is_rollout_rank(config.parallel.rollout_ranks):  # this rank only generates
        from megatron_spo.rollout.remote import serve

        config.check_world_size(platform.launch_world_size())
        return serve(config)

    trainer = Trainer(config)
    interrupted = False
    ctrl_c = _CtrlC()
    try:
        try:
            last = trainer.fit(on_step=ctrl_c.check)
        except KeyboardInterrupt:
            interrupted = True
            from megatron_spo.training.checkpointing import complete_checkpoints

            done = complete_checkpoints(Path(config.run_dir) / "checkpoints")
            raise KeyboardInterrupt(
                f"during step {trainer.step + 1}; " + (f"the last complete checkpoint is {done[-1]} (the same "
                                                       f"command resumes from it)" if done else
                                                       "no checkpoint was complete yet")) from None
        if config.checkpoint.export_hf and not args.no_export:
            out = trainer.export_hf(Path(config.run_dir) / "hf")
            if trainer.is_main:
                print(f"exported {out}", file=sys.stderr)
        if trainer.is_main and last:
            print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items()) if "/" in k), file=sys.stderr)
    finally:
        ctrl_c.restore()
        if not interrupted:  # an interrupted rank may be inside a collective its peers left
            trainer.close()
            platform.destroy_distributed()
    return 0


class _CtrlC:
    """SIGINT raises KeyboardInterrupt, as Python's own handler does, and is remembered: one that
    lands while a finalizer runs (where Python prints the exception and drops it) still stops the
    run, at the end of the step it arrived in."""

    def __init__(self):
        import signal
        import threading

        self.seen = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def check(self, step: int, metrics: dict) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
