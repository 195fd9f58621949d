"""The `megatron-spo <verb> ...` command line.

Each verb lives with the subsystem it belongs to and is imported only when used, so
`megatron-spo --help` stays fast and a verb's heavy imports (Megatron, vLLM) cost nothing to the
others. A verb module exposes `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import importlib
import sys

from megatron_spo.errors import UserError

# verb -> (module exposing main(argv), one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "convert": ("megatron_spo.models.convert", "convert checkpoints: hf-to-mcore | mcore-to-hf"),
    "data": ("megatron_spo.value.data_cli", "dataset tools: split"),
    "values": ("megatron_spo.value.values_cli", "offline values: estimate | merge"),
    "train": ("megatron_spo.training.train_cli", "RL post-training (SPO, GRPO, ...) from a YAML config"),
    "sft": ("megatron_spo.training.sft_cli", "supervised warm start on prompt/response pairs"),
    "eval": ("megatron_spo.training.eval_cli", "accuracy, pass@k and maj@k of an HF model"),
    "plot": ("megatron_spo.training.plot_cli", "PNG curves from a run directory"),
    "demo": ("megatron_spo.demo.cli", "the embedded end-to-end job on a tiny model"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = ["usage: megatron-spo <verb> [args...]   (python -m megatron_spo is the same)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`megatron-spo <verb> --help` describes a verb."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"megatron-spo: unknown verb {verb!r}; valid verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        return int(module.main(rest) or 0)
    except UserError as err:
        print(f"megatron-spo {verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line saying where it stopped, the shell's 130
        print(f"megatron-spo {verb}: interrupted" + (f" {err}" if str(err) else ""), file=sys.stderr)
        return 130
