"""`rollout.mode: async`: trajectories stream in the background while the actor trains.

Each rank runs a driver thread over its engine's stream (`rollout.streaming`: up to
`rollout.max_inflight` sequences decoding at once, a finished one's slot refilled at once) and a
grading thread over the scoring pool; graded trajectories land in a buffer. A training step

    top_up     all ranks agree on the prompts that bring each rank back to (max_staleness + 1)
               batches outstanding (the algorithm draws them, never a prompt in flight) and
               queue them on their streams                                      (collective)
    take       this rank waits for batch.train_batch_size / dp trajectories of its buffer, in
               finish order, dropping (and counting) those sampled more than max_staleness
               versions ago; what generation started is not waited for twice
    train      as in sync mode, on those trajectories (p_hat is read now, before the update)
    advance    the new weights go into the engine between two decoding steps; the version rises;
               with `partial_rollout` false the in-flight sequences restart from their prompt;
               the ranks share which prompts they trained, which are drawable again (collective)

A trajectory's version is the policy version that sampled its first token. Tokens sampled by an
older policy than the step's proximal one (the actor before the update, `old_logprobs`) are
reweighted by pi_prox / pi_behav, truncated at `is_cap` (`off_policy_correction: tis`; verl's and
AReaL's async recipes) or not (`decoupled`, decoupled PPO: Hilton et al. 2022, AReaL): the PPO
ratio is then taken against pi_prox, so the clip bounds the step from the proximal policy, not
from whatever stale policy sampled the token. Tokens of the current version weigh exactly 1.

What changes against the synchronous order, and why max_staleness = 0 changes nothing: sync
draws a batch, generates it and trains it at one version. Here a prompt is drawn when its rank
has room, and a prompt in flight is not drawn again until it is trained or dropped (SPO's value
store may not see one prompt twice in one step). With max_staleness = 0 a rank has exactly one
batch outstanding, drawn at the same point of the run as sync draws it (after the previous
update, with the same sampler state), seeded by the same (step, position), generated under the
same weights and trained in the same positions: p_hat is read before the update as in sync, the
KL drift for rho compares the response stored at the prompt's previous trained visit, and every
token weighs 1. The batch's trajectories, the update and the value store's posterior are those of
sync mode, so the estimate stays what it is there. For max_staleness > 0, p_hat is read when the
trajectory is trained, so the advantage r - p_hat uses the freshest posterior, and the
policy-gradient bias of a stale sample is what the importance weight corrects.

Faults: a trajectory whose grader failed (error, timeout, non-finite) is dropped and counted
(`async/dropped_grader`), not trained as a zero; its prompt is released. A resumed run starts with
an empty stream: what was in flight at the checkpoint is discarded, and those prompts are
drawable again with the posterior they had (the value store only changes on a trained visit).

GRPO streams too, with its group barrier in the buffer: a prompt's n responses (response j seeded
as sync mode's j-th sample) are trained together once all have finished and been graded, and a
group is dropped whole (stale, or a member's grader failed).

Scope of this release: algorithms spo and grpo, one rank per model replica (tp = pp = 1, engine TP 1; data
parallelism is fine), colocated (the engine and the actor share each rank); single-turn and the
tool agent. `training.rollout_config.check_async` refuses the rest with one line.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import threading
import time
from typing import Any, Sequence

import torch

from megatron_spo.errors import UserError
from megatron_spo.rollout.streaming import StreamRequest, open_stream
from megatron_spo.rollout.types import SamplingParams
from megatron_spo.training.rollouts import Prompt, Rollout, step_seed


@dataclasses.dataclass(eq=False)
class Trajectory:
    """One prompt's trajectory, from its draw to its training (or drop)."""

    prompt: Prompt
    batch: int
    """Index of the draw it came in (sync mode's step): with `position`, its sampling seed."""
    position: int
    """Position in that draw (sync mode's position in the step's global batch)."""
    seed: int
    member: int = 0
    """Which of the prompt's n responses (GRPO's group; 0 for SPO)."""
    response: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    mask: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str = ""
    text: str | None = None
    reward: float = 0.0
    restarts: int = 0
    agent_state: Any = None
    """The tool agent's `AgentTrajectory` (rollout.agent=tool), else None."""
    restart_pending: bool = False
    """Its tools were running when the weights changed (partial rollouts off): start again."""

    @property
    def version(self) -> int:
        """The policy version that sampled its first token."""
        return self.versions[0]


@dataclasses.dataclass(eq=False)
class _Group:
    """A prompt's n trajectories (n = 1 for SPO), trained together once all have finished: the
    group barrier of GRPO lives here, not in the trainer."""

    members: list[Trajectory]
    finished: int = 0
    failed: int = 0

    @property
    def version(self) -> int:
        return min(t.version for t in self.members)

    @property
    def order(self) -> tuple[int, int]:
        return self.members[0].batch, self.members[0].position


class LockedScorer:
    """The scoring pool shared by the grading thread and the main thread's evaluation."""

    def __init__(self, pool):
        self.pool, self._lock = pool, threading.Lock()

    def score(self, responses, ground_truths):
        with self._lock:
            return self.pool.score(responses, ground_truths)

    def close(self) -> None:
        self.pool.close()


class AsyncRollouts:
    """This rank's stream, grader and buffer (see the module docstring). The main thread calls
    `top_up`, `take`, `advance`, `paused`, `close`; the driver and grading threads do the rest."""

    def __init__(self, engine, tokenizer, scorer: LockedScorer, *, sampling, config, seed: int,
                 per_rank: int, dp: int, dp_rank: int, dp_group=None, agent=None, first_draw: int = 0,
                 n: int = 1):
        self.tokenizer, self.scorer, self.sampling, self.config = tokenizer, scorer, sampling, config
        self.agent = agent
        """The tool agent (`rollout.agent_loop.AgentLoop`), or None for single-turn."""
        self.seed, self.per_rank, self.dp, self.dp_rank, self.dp_group = seed, per_rank, dp, dp_rank, dp_group
        self.stream = open_stream(engine, config.max_inflight)
        self.version = 0
        self.draws = first_draw
        """Draws made so far (a resumed run starts at its step): the next one seeds as sync
        mode's step of that index, so a resumed max_staleness-0 run repeats an uninterrupted one."""
        self.inflight_keys: set[int] = set()
        """Prompts drawn by any rank and not yet trained or dropped (replicated)."""
        self.n = n
        self._groups: dict[int, _Group] = {}
        """Groups drawn by this rank and not yet taken or dropped (by prompt key)."""
        self._complete: list[_Group] = []
        """Groups whose members all finished and were graded, in completion order."""
        self._ready: list[Trajectory] = []  # tool agent: tools done, next turn not yet queued
        self._tooling: set[Trajectory] = set()  # tool agent: tools running
        self._tools = None if agent is None else concurrent.futures.ThreadPoolExecutor(
            agent.config.max_concurrent_tools, thread_name_prefix="async-tools")
        self._released: list[int] = []
        self.counts: collections.Counter = collections.Counter()
        self._cv = threading.Condition()
        self._pause_requests = 0
        self._parked = False
        self._stop = False
        self._error: BaseException | None = None
        self._grader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="async-grader")
        self._driver = threading.Thread(target=self._drive, name="async-rollout", daemon=True)
        self._driver.start()

    # ------------------------------------------------------------------ driver and grading threads

    def _drive(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and (self._pause_requests or (self.stream.idle and not self._ready)):
                        self._parked = True
                        self._cv.notify_all()
                        self._cv.wait()
                    self._parked = False
                    if self._stop:
                        return
                    # queued under the lock: `take` never sees a trajectory in neither place
                    self.stream.submit([self._request(t) for t in self._ready])
                    self._ready = []
                before = self.stream.refills
                done = self._collect(self.stream.step())
                with self._cv:
                    self.counts["refills"] += self.stream.refills - before
                if done:
                    self._grader.submit(self._grade, done)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread by `take`
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        with self._cv:
            self._error, self._parked = err, True
            self._cv.notify_all()

    def _collect(self, results) -> list[Trajectory]:
        """Finished trajectories among the stream's results; a tool-agent turn with code instead
        starts its tools, and the trajectory comes back when they are done (`_tools_done`)."""
        done = []
        for result in results:
            t: Trajectory = result.tag
            c = result.completion
            if self.agent is None:
                t.response, t.logprobs, t.versions = list(c.token_ids), list(c.logprobs), list(result.token_versions)
                t.mask, t.finish_reason = [1] * len(c.token_ids), c.finish_reason
                t.text = c.text if c.text is not None else self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                done.append(t)
                continue
            t.versions += result.token_versions
            self.agent.after_turn(t.agent_state, c, self._tools)
            if t.agent_state.pending_tools:
                self._wait_for_tools(t)
            else:
                self._finish_agent(t)
                done.append(t)
        return done

    def _wait_for_tools(self, t: Trajectory) -> None:
        futures = list(t.agent_state.pending_tools)
        left = [len(futures)]
        with self._cv:
            self._tooling.add(t)

        def one_done(_):
            with self._cv:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._tools_done(t)

        for future in futures:
            future.add_done_callback(one_done)

    def _tools_done(self, t: Trajectory) -> None:
        """A tool thread: the outputs go into the trajectory, which generates its next turn,
        ends, or (weights changed meanwhile, partial rollouts off) starts again."""
        from megatron_spo.rollout.agent_loop import State

        try:
            state = t.agent_state
            before = len(state.response_ids)
            self.agent.append_tool_outputs(state)
            t.versions += [t.versions[-1]] * (len(state.response_ids) - before)  # mask 0: no gradient
            with self._cv:
                self._tooling.discard(t)
                if t.restart_pending:
                    self._reset(t)
                    self._ready.append(t)
                elif state.state is State.TERMINATED:
                    self._finish_agent(t)
                    self._grader.submit(self._grade, [t])
                else:
                    self._ready.append(t)
                self._cv.notify_all()
        except BaseException as err:  # noqa: BLE001
            self._fail(err)

    def _finish_agent(self, t: Trajectory) -> None:
        sample = self.agent.to_sample(t.agent_state)
        t.response, t.logprobs, t.mask = sample.response_token_ids, sample.response_logprobs, sample.response_mask
        t.finish_reason, t.text = sample.finish_reason, sample.extra["model_text"]  # grade what the model wrote

    def _reset(self, t: Trajectory) -> None:
        """Start `t` again from its prompt (its tokens so far are discarded)."""
        t.versions, t.restarts, t.restart_pending = [], t.restarts + 1, False
        if self.agent is not None:
            t.agent_state = self._new_agent_state(t)

    def _new_agent_state(self, t: Trajectory):
        from megatron_spo.rollout.agent_loop import AgentTask, AgentTrajectory, State

        task = AgentTask(prompt_key=t.prompt.key, prompt_token_ids=t.prompt.token_ids, prompt_text=t.prompt.raw,
                         ground_truth=t.prompt.answer, seed=t.seed)
        return AgentTrajectory(task=task, state=State.GENERATING)

    def _grade(self, trajectories: list[Trajectory]) -> None:
        try:
            scored = self.scorer.score([t.text for t in trajectories], [t.prompt.answer for t in trajectories])
            with self._cv:
                self.counts["generated_tokens"] += sum(sum(t.mask) for t in trajectories)
                for i, t in enumerate(trajectories):
                    group = self._groups[t.prompt.key]
                    group.finished += 1
                    if i in scored.failure_messages:
                        group.failed += 1
                    else:
                        t.reward = float(scored.scores[i])
                    if group.finished == len(group.members):
                        if group.failed:  # not trained as a zero: the whole group goes
                            self.counts["dropped_grader"] += group.failed
                            self._drop(group)
                        else:
                            self._complete.append(group)
                self._cv.notify_all()
        except BaseException as err:  # noqa: BLE001
            self._fail(err)

    def _drop(self, group: _Group) -> None:
        """Forget a group (lock held): its prompt is released."""
        del self._groups[group.members[0].prompt.key]
        self._released.append(group.members[0].prompt.key)

    # ------------------------------------------------------------------ main thread

    @contextlib.contextmanager
    def paused(self):
        """The driver parked between two decoding steps: the stream and the engine are the
        caller's (weight loads, submissions, evaluation)."""
        with self._cv:
            self._pause_requests += 1
            while not self._parked and self._error is None:
                self._cv.wait()
        try:
            with self.stream.held():
                yield
        finally:
            with self._cv:
                self._pause_requests -= 1
                self._cv.notify_all()

    def outstanding(self) -> int:
        """This rank's prompts (groups) drawn and not yet taken or dropped."""
        with self._cv:
            return len(self._groups)

    def top_up(self, algorithm, order) -> None:
        """Draw prompts so every rank has (max_staleness + 1) batches outstanding (collective):
        the algorithm draws from the data order, skipping prompts in flight, at most one batch
        a draw, and position i of a draw goes to the ranks in turn (sync mode's split)."""
        self._share_released()
        deficit = (self.config.max_staleness + 1) * self.per_rank - self.outstanding()
        deficits = self._all_gather_ints([max(deficit, 0)])
        mine: list[Trajectory] = []
        while sum(deficits):
            count = min(sum(deficits), self.per_rank * self.dp)
            chosen = algorithm.choose_async_prompts(order, count, exclude=self.inflight_keys)
            for position, rank in enumerate(_deal(deficits, len(chosen))):
                p = chosen[position]
                self.inflight_keys.add(p.key)
                deficits[rank] -= 1
                if rank == self.dp_rank:
                    seed = step_seed(self.seed, self.draws, position)
                    # sync mode's seeds of response j: seed + j (an engine's n), the agent's + 104729 j
                    stride = 1 if self.agent is None else 104_729
                    mine += [Trajectory(prompt=p, batch=self.draws, position=position, seed=seed + stride * j,
                                        member=j) for j in range(self.n)]
            self.draws += 1
            if not chosen:
                break
        if mine:
            with self.paused():
                with self._cv:
                    for t in mine:
                        self._groups.setdefault(t.prompt.key, _Group(members=[])).members.append(t)
                self.stream.submit([self._request(t) for t in mine])

    def _request(self, t: Trajectory) -> StreamRequest:
        if self.agent is not None:
            if t.agent_state is None:
                t.agent_state = self._new_agent_state(t)
            turn = self.agent.turn_request(t.agent_state)
            return StreamRequest(tag=t, prompt_token_ids=turn.prompt_token_ids, params=turn.params)
        s = self.sampling
        return StreamRequest(tag=t, prompt_token_ids=t.prompt.token_ids, params=SamplingParams(
            n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens, seed=t.seed))

    def take(self) -> tuple[list[Trajectory], float]:
        """This rank's `per_rank` groups for the step, in completion order (and the seconds
        waited), their trajectories sorted by draw, position and member; fewer only when nothing
        else is outstanding. Groups sampled more than max_staleness versions ago are dropped."""
        started = time.perf_counter()
        oldest = self.version - self.config.max_staleness
        with self._cv:
            while True:
                if isinstance(self._error, UserError):  # e.g. a rollout rank gone: its own one line
                    raise self._error
                if self._error is not None:
                    raise RuntimeError(f"async rollout failed: {self._error!r}") from self._error
                for group in [g for g in self._complete if g.version < oldest]:
                    self._complete.remove(group)
                    self.counts["dropped_stale"] += len(group.members)
                    self._drop(group)
                if len(self._complete) >= self.per_rank or len(self._complete) == len(self._groups):
                    break
                self._cv.wait()
            taken, self._complete = self._complete[: self.per_rank], self._complete[self.per_rank :]
            for group in taken:
                self._drop(group)  # trained now: released for the next draws
        taken.sort(key=lambda g: g.order)
        return [t for g in taken for t in sorted(g.members, key=lambda t: t.member)], time.perf_counter() - started

    def advance(self, load_weights) -> None:
        """After the update: the new weights into the engine, the version up; without partial
        rollouts the in-flight sequences start again from their prompt."""
        with self.paused():
            load_weights()
            self.version += 1
            self.stream.version = self.version
            if not self.config.partial_rollout:
                self._restart_in_flight()
        self._share_released()  # every rank learns what this step trained (collective)

    def _restart_in_flight(self) -> None:
        """Partial rollouts off: every trajectory with tokens of the old version starts again from
        its prompt (the driver is parked); one whose tools are running restarts when they end."""
        aborted = [r.tag for r in self.stream.abort()]
        queued = [r.tag for r in self.stream.clear_queue()]
        with self._cv:
            queued += self._ready
            self._ready = []
            started = aborted + [t for t in queued if t.versions]
            for t in started:
                self._reset(t)
            for t in self._tooling:
                t.restart_pending = True
            self.counts["restarted"] += len(started) + len(self._tooling)
        self.stream.submit([self._request(t) for t in aborted + queued])

    def rollout_of(self, taken: Sequence[Trajectory], prompts_by_key: dict[int, Prompt]):
        """(this rank's Rollout, the step's global prompt list): positions are dealt to the ranks
        in turn over the groups each rank took (sync mode's d, d + dp, ... when all took a full
        share), so every rank knows every position's prompt (collective)."""
        groups = [list(g) for _, g in itertools.groupby(taken, key=lambda t: (t.batch, t.position))]
        keys = self._all_gather_lists([g[0].prompt.key for g in groups])
        positions, global_keys = {}, []
        for j in range(max(len(k) for k in keys)):
            for rank, rank_keys in enumerate(keys):
                if j < len(rank_keys):
                    if rank == self.dp_rank:
                        positions[j] = len(global_keys)
                    global_keys.append(rank_keys[j])
        rollout = Rollout()
        for j, group in enumerate(groups):
            for t in group:
                rollout.add(positions[j], t.prompt, t.prompt.token_ids, t.response, t.mask, t.logprobs, t.reward)
                rollout.generated_tokens += sum(t.mask)
        rollout.episode_rewards = list(rollout.rewards)
        rollout.episode_index = list(rollout.prompt_index)
        return rollout, [prompts_by_key[k] for k in global_keys]

    def take_counts(self) -> dict[str, float]:
        with self._cv:
            counts, self.counts = dict(self.counts), collections.Counter()
            outstanding = self.outstanding()
        return {**counts, "outstanding": float(outstanding)}

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._driver.join(timeout=60)
        if self._tools is not None:
            self._tools.shutdown(wait=True, cancel_futures=True)
        self._grader.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ collectives over DP

    def _share_released(self) -> None:
        """Every rank learns which prompts the others trained or dropped since the last draw."""
        with self._cv:
            released, self._released = self._released, []
        for keys in self._all_gather_lists(released):
            self.inflight_keys.difference_update(keys)

    def _all_gather_lists(self, values: list[int]) -> list[list[int]]:
        if self.dp == 1:
            return [list(values)]
        out: list[Any] = [None] * self.dp
        torch.distributed.all_gather_object(out, list(values), group=self.dp_group)
        return out

    def _all_gather_ints(self, values: list[int]) -> list[int]:
        return [v for part in self._all_gather_lists(values) for v in part]


def _deal(deficits: Sequence[int], count: int) -> list[int]:
    """The rank of each of `count` positions: the ranks in turn, skipping ranks already full
    (equal deficits: position i -> rank i % dp, sync mode's split)."""
    left, out, rank = list(deficits), [], 0
    while len(out) < count and sum(left):
        if left[rank]:
            out.append(rank)
            left[rank] -= 1
        rank = (rank + 1) % len(left)
    return out


def behaviour_weights(old: torch.Tensor, behaviour: torch.Tensor, stale: torch.Tensor, mode: str,
                      cap: float) -> torch.Tensor:
    """Importance weight of each token (all (N, T - 1)): on `stale` tokens (sampled by an older
    policy than the proximal one) pi_old / pi_behaviour = exp(old - behaviour), truncated at `cap`
    for `tis`, as is for `decoupled`, 1 for `none`; exactly 1 on every other token."""
    if mode == "none":
        return torch.ones_like(old)
    ratio = torch.exp((old - behaviour).clamp(max=30.0))
    if mode == "tis":
        ratio = ratio.clamp(max=cap)
    return torch.where(stale, ratio, torch.ones_like(ratio))
