"""Trainer features a user switches on in the config: the tool agent loop, the KL / entropy terms
against the frozen reference, soft-SPO's off-policy sources with exact resume, the token budget.

Each case runs the real trainer in a one-rank gloo world (`spawn`)."""

from __future__ import annotations

import json

import pytest

from helpers import algorithm_setup, merge, tiny_train_setup

pytestmark = pytest.mark.distributed

VOLATILE = ("perf/",)


class ScriptedToolEngine:
    """Wraps the real engine (weight sync still goes to it) and answers like a tool-using model:
    first turn writes code, the turn after the interpreter's output writes the boxed answer."""

    open_stream = None  # not the wrapped engine's stream: async mode streams through `generate` here

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, requests):
        from megatron_spo.rollout.types import Completion, GenerationResult

        results = []
        for request in requests:
            seen = self.tokenizer.decode(request.prompt_token_ids)
            text = "The answer is \\boxed{42}." if "</interpreter>" in seen else "<code>```python\nprint(6*7)\n```</code>"
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            completions = [Completion(token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="stop", text=text)
                           for _ in range(request.params.n)]
            results.append(GenerationResult(request=request, completions=completions))
        return results


class Recording:
    """The configured algorithm, recording the rollout and the batch it prepares (the public
    algorithm protocol: `TrainerParts.algorithm`)."""

    def __init__(self, algorithm):
        self.algorithm, self.seen = algorithm, []

    def __getattr__(self, name):
        return getattr(self.algorithm, name)

    def prepare(self, ctx, rollout, batch, old):
        self.seen.append((rollout, batch))
        return self.algorithm.prepare(ctx, rollout, batch, old)


def _tool_agent_step(rank, world_size, config):
    from megatron_spo.config import from_dict
    from megatron_spo.models.checkpoint import hf_side_dir_of
    from megatron_spo.rollout.engine import make_engine
    from megatron_spo.rollout.prompts import load_tokenizer
    from megatron_spo.training import algorithms
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer, TrainerParts

    cfg = from_dict(TrainConfig, config)
    model_dir = str(hf_side_dir_of(cfg.model.hf_dir))
    engine = ScriptedToolEngine(make_engine(cfg.rollout.engine_config(model_dir, load_weights=False)),
                                load_tokenizer(model_dir))
    recording = []
    parts = TrainerParts(engine=engine, algorithm=lambda setup: recording.append(
        Recording(algorithms.build(cfg, setup))) or recording[0])
    trainer = Trainer(cfg, parts=parts)
    metrics = trainer.train_step()
    evaluation = trainer.evaluate()
    trainer.close()
    rollout, seq = recording[0].seen[0]
    tool_text = [trainer.tokenizer.decode([t for t, m in zip(r, mask) if not m])
                 for r, mask in zip(rollout.responses, rollout.masks)]
    model_text = [trainer.tokenizer.decode([t for t, m in zip(r, mask) if m])
                  for r, mask in zip(rollout.responses, rollout.masks)]
    mask_ok = all(
        seq.response_mask[row, len(c) - 1 : len(c) - 1 + len(m)].tolist() == [float(x) for x in m]
        for row, (c, m) in enumerate(zip(rollout.contexts, rollout.masks))
    )
    return {"tool_text": tool_text, "model_text": model_text, "rewards": rollout.rewards, "mask_ok": mask_ok,
            "metrics": metrics, "evaluation": evaluation}


@pytest.mark.parametrize("algorithm,mode,n", [("grpo", "sync", 2), ("spo", "async", 1)])
def test_tool_agent_loop_masks_interpreter_output_and_trains(spawn, tmp_path, algorithm, mode, n):
    base = tiny_train_setup(tmp_path)
    data = tmp_path / "answer42.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is 6 times 7? ({i})", "answer": "42"}) + "\n" for i in range(8)))
    config = merge(base, {
        "run_dir": str(tmp_path / "run"), "total_steps": 1, "algorithm": {"name": algorithm, "spo": {"gen_batch_size": 8}},
        "data": {"train_files": [str(data)]},
        "rollout": {"agent": "tool", "n": n, "max_response_tokens": 200, "max_assistant_turns": 3, "mode": mode,
                    "reward": {"pool": "inline", "function": "megatron_spo.rollout.rewards:math_reward"}},
        "batch": {"train_batch_size": 2, "mini_batch_size": 2},
        "eval": {"files": [str(data)], "n": 1},
    })
    out = spawn(1, _tool_agent_step, config)[0]
    assert all("<interpreter>" in t and "42" in t for t in out["tool_text"]), out["tool_text"]
    assert all("\\boxed{42}" in t and "<interpreter>" not in t for t in out["model_text"])
    assert out["mask_ok"], "the response mask of the training sequences does not follow the agent's mask"
    assert out["rewards"] == [1.0] * 2 * n  # graded on what the model wrote
    assert out["metrics"]["reward/mean"] == 1.0
    # the held-out evaluation runs the agent too: the box comes in the turn after the tool's output
    assert out["evaluation"]["eval/accuracy"] == 1.0


def _run(rank, world_size, config, steps):
    from megatron_spo.config import from_dict
    from megatron_spo.training.config import TrainConfig
    from megatron_spo.training.trainer import Trainer

    trainer = Trainer(from_dict(TrainConfig, {**config, "total_steps": steps}))
    history = []
    trainer.fit(on_step=lambda step, metrics: history.append(
        {k: v for k, v in metrics.items() if not k.startswith(VOLATILE)}))
    params = {k: v.clone() for k, v in trainer.actor.export_hf()}
    out = {"history": history, "params": params, "step": trainer.step,
           "q0": dict(getattr(trainer.algorithm, "q0", {})), "generated": trainer.generated_tokens}
    trainer.close()
    return out


def test_kl_and_entropy_terms_use_the_frozen_reference(spawn, tmp_path):
    base = {**tiny_train_setup(tmp_path), "checkpoint": {"every_steps": 0}}
    with_kl = spawn(1, _run, merge(base, {"run_dir": str(tmp_path / "kl"),
                                          "algorithm": {"spo": {"loss": {"kl_coef": 0.5, "kl_estimator": "k3",
                                                                             "entropy_coef": 0.01}}}}), 2)[0]
    plain = spawn(1, _run, {**base, "run_dir": str(tmp_path / "plain")}, 2)[0]
    first, second = (h["actor/kl_ref"] for h in with_kl["history"])
    assert 0 <= first < second  # the reference is the start: the drift from it grows
    assert "actor/kl_ref" not in plain["history"][0] and plain["history"][0]["actor/entropy"] > 0
    # the first step's first mini-batch is identical; the penalties change what follows
    assert any((with_kl["params"][k] - v).abs().max() > 0 for k, v in plain["params"].items())


def test_generated_token_budget_stops_the_run(spawn, tmp_path):
    config = {**tiny_train_setup(tmp_path), "run_dir": str(tmp_path / "run"), "checkpoint": {"every_steps": 0},
              "max_generated_tokens": 1}
    out = spawn(1, _run, config, 5)[0]
    assert out["step"] == 1 and out["generated"] >= 1


def test_soft_spo_offpolicy_file_replay_and_exact_resume(spawn, tmp_path):
    base = algorithm_setup(tmp_path, "soft_spo")
    external = tmp_path / "external.jsonl"
    external.write_text("".join(
        json.dumps({"prompt": f"Compute {i} + 1.", "response": f"It is {i + 1}", "reward": -0.25 * (i % 3),
                    "answer": str(i + 1)}) + "\n" for i in range(5)))
    soft = {"offpolicy_files": [str(external)], "offpolicy_per_step": 2, "replay_buffer_size": 6, "replay_per_step": 2}
    config = merge(base, {"algorithm": {"soft_spo": soft}})
    full = spawn(1, _run, {**config, "run_dir": str(tmp_path / "full"), "checkpoint": {"every_steps": 0}}, 3)[0]
    counts = [h["rollout/train_sequences"] for h in full["history"]]
    assert counts == [4 + 2, 4 + 2 + 2, 4 + 2 + 2]  # policy + file, then + replay
    assert len(full["q0"]) > 4 and all(-1.0 <= v <= 0.0 for v in full["q0"].values())
    split = {**config, "run_dir": str(tmp_path / "split"), "checkpoint": {"every_steps": 2}}
    spawn(1, _run, split, 2)
    resumed = spawn(1, _run, split, 3)[0]
    assert len(resumed["history"]) == 1
    for key, value in full["history"][2].items():
        assert resumed["history"][0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for name, tensor in full["params"].items():
        assert (resumed["params"][name] - tensor).abs().max().item() <= 1e-5, name
