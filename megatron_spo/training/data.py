"""Training prompts: loading them from dataset files, and the shuffled order a run walks through."""

from __future__ import annotations

import numpy as np

from megatron_spo.errors import UserError
from megatron_spo.training.rollouts import Prompt


def load_prompts(files: list[str], prompt_key: str, answer_key: str, tokenizer, prompt_config) -> tuple[list[Prompt], int]:
    """Every record of `files` as a Prompt (skipping over-long ones); returns (prompts, skipped).

    Keys may be dotted (`reward_model.ground_truth`); a prompt's value-store identity is its last
    user message, as `megatron-spo values estimate` keys its offline values. A record whose prompt
    or answer is missing, null or empty is refused with one line naming the file and record; a
    repeated prompt (in one file or across files) is dropped when its answer is the same (`train`
    prints how many before it starts) and refused when it differs (`records.load_prompt_records`)."""
    from megatron_spo.rollout.prompts import build_prompts
    from megatron_spo.rollout.records import field, load_prompt_records, raw_user_prompt
    from megatron_spo.value import prompt_key as key_of

    records, _ = load_prompt_records(files, prompt_key, answer_key)
    if not records:
        raise UserError(f"no records in {', '.join(files)}")
    raws = [raw_user_prompt(field(r, prompt_key)) for r in records]
    built = build_prompts([field(r, prompt_key) for r in records], tokenizer, prompt_config)
    prompts = [
        Prompt(key=key_of(raws[b.index]), raw=raws[b.index], token_ids=b.token_ids,
               answer=str(field(records[b.index], answer_key)))
        for b in built.prompts
    ]
    if not prompts:  # nothing to train on: say so, instead of drawing from an empty pool forever
        raise UserError(
            f"data.train_files: all {len(records)} prompts of {', '.join(files)} were skipped: longer than "
            f"data.prompt.max_prompt_tokens={prompt_config.max_prompt_tokens} tokens (raise it, or set "
            f"data.prompt.overlong=truncate)")
    return prompts, len(built.skipped)


class PromptOrder:
    """The run's walk through the prompts: epoch after epoch, each shuffled by (seed, epoch) when
    `shuffle`. `take(k)` returns the next k prompts, wrapping into the next epoch."""

    def __init__(self, prompts: list[Prompt], *, seed: int, shuffle: bool = True):
        if not prompts:
            raise UserError("no training prompts: the data is empty")
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = np.arange(len(self.prompts))
        if self.shuffle:
            np.random.default_rng(self.seed + 7919 * (epoch + 1)).shuffle(order)
        return order

    def take(self, count: int) -> list[Prompt]:
        out: list[Prompt] = []
        while len(out) < count:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order(self.epoch)
            chunk = self._order[self.cursor : self.cursor + count - len(out)]
            self.cursor += len(chunk)
            out.extend(self.prompts[i] for i in chunk)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order(self.epoch)
