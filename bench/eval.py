"""What `evaluate()` costs on top of generation: prompt building, grading and the metrics.

    python bench/eval.py [--model HF_DIR --data FILE] [--prompts 128] [--n 4] [--max-tokens 48]

Default model and data: the CPU example's SFT'd demo model and its held-out prompts
(`bash examples/cpu/run.sh` makes them), whose responses end in a `\\boxed{}` answer, so the
grader does real work; without them a random tiny Llama on the demo task's prompts (mostly
unboxed answers: the grader's fast path).

Baseline: the same engine's `generate` on the same requests (same prompts, seeds, sampling),
timed in the same process. Reported: seconds for each and the ratio evaluate / generate (1.0 =
evaluation adds nothing), for the inline grader and for the default `ScoringPool` of 2 worker
processes. After one untimed warm-up call, `--repeats` interleaved rounds; the best of each
case. OMP_NUM_THREADS=1 unless set.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from megatron_spo.rollout.engine import EngineConfig, make_engine  # noqa: E402
from megatron_spo.rollout.records import load_records  # noqa: E402
from megatron_spo.rollout.prompts import build_prompts  # noqa: E402
from megatron_spo.rollout.rewards import RewardConfig  # noqa: E402
from megatron_spo.rollout.scoring import ScoringPool  # noqa: E402
from megatron_spo.rollout.types import GenerationRequest  # noqa: E402
from megatron_spo.rollout.prompts import PromptConfig  # noqa: E402
from megatron_spo.training.evaluation import EvalConfig, evaluate  # noqa: E402

DEFAULT_MODEL = REPO / "runs/cpu_example/assets/sft"
DEFAULT_DATA = REPO / "runs/cpu_example/assets/data/val.jsonl"


def best_of(repeats: int, fn):
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.model is None and DEFAULT_MODEL.is_dir() and DEFAULT_DATA.is_file():
        args.model, args.data = str(DEFAULT_MODEL), str(DEFAULT_DATA)
    if args.model is None:
        from megatron_spo.demo.task import DemoTaskConfig, generate_splits, write_jsonl
        from tiny_models import make_tiny_model

        args.model = str(make_tiny_model(Path(tmp.name) / "model", "llama", seed=0))
        args.data = str(write_jsonl(generate_splits(DemoTaskConfig())["val"], Path(tmp.name) / "val.jsonl"))
    records = load_records(args.data)[: args.prompts]
    settings = EvalConfig(n=args.n, max_response_tokens=args.max_tokens)
    prompt = PromptConfig(max_prompt_tokens=256)
    engine = make_engine(EngineConfig(model=args.model))
    tokenizer = engine.tokenizer

    def generate_only():
        prompts = build_prompts([r["prompt"] for r in records], tokenizer, prompt).prompts
        requests = [GenerationRequest(prompt_token_ids=p.token_ids, params=settings.sampling(p.index)) for p in prompts]
        out = []
        for start in range(0, len(requests), settings.prompts_per_call):
            out += engine.generate(requests[start : start + settings.prompts_per_call])
        return out

    inline = RewardConfig(pool="inline")
    pool = ScoringPool(RewardConfig())  # started outside the timing, as the trainer keeps one
    cases = {
        "engine.generate (baseline)": generate_only,
        "evaluate(), inline grader": lambda: evaluate(engine, tokenizer, records, settings, prompt=prompt,
                                                      reward=inline),
        "evaluate(), ScoringPool 2 processes": lambda: evaluate(engine, tokenizer, records, settings, prompt=prompt,
                                                                pool=pool),
    }
    results = generate_only()  # warm-up (allocator, first-call costs), untimed
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    # interleaved rounds, so a burst of load from other jobs hits every case alike; best per case
    best = {name: (float("inf"), None) for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            seconds, value = best_of(1, fn)
            best[name] = min(best[name], (seconds, value), key=lambda pair: pair[0])
    pool.close()
    engine.shutdown()
    generate_s = best["engine.generate (baseline)"][0]
    rows = [(name, seconds, value if isinstance(value, dict) else None) for name, (seconds, value) in best.items()]

    print(f"model {args.model}, {len(records)} prompts x n {args.n}, {tokens} generated tokens, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, best of {args.repeats}")
    print(f"{'what':<38} {'seconds':>8} {'x baseline':>10} {'accuracy':>9}")
    for name, seconds, res in rows:
        accuracy = f"{res['overall']['accuracy']:.4f}" if res else "-"
        print(f"{name:<38} {seconds:>8.2f} {seconds / generate_s:>10.3f} {accuracy:>9}")


if __name__ == "__main__":
    main()
