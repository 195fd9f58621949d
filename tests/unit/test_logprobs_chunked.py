"""The chunked vocab-parallel log-prob / entropy against torch's full-vocabulary log-softmax:
values and gradients, at any chunk size, with a temperature, with and without an entropy bonus;
at TP 2 (gloo) each rank's shard gradient is the matching slice of the unsplit one."""

from __future__ import annotations

import pytest
import torch

from megatron_spo.training.logprobs import vocab_parallel_logprobs


def reference(logits, targets, temperature):
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    lp = log_p.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return lp, entropy


def inputs(seed=0, b=3, t=7, v=50):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(b, t, v, generator=g)
    targets = torch.randint(0, v, (b, t), generator=g)
    weights = torch.randn(b, t, generator=g)  # arbitrary upstream gradients
    return logits, targets, weights


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy_bonus", [0.0, 0.3])
def test_values_and_gradients_match_full_log_softmax(chunk, temperature, entropy_bonus):
    logits, targets, w = inputs()
    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets, temperature=temperature, with_entropy=True, chunk_tokens=chunk)
    loss = (lp * w).sum() + entropy_bonus * (ent * w).sum() if entropy_bonus else (lp * w).sum()
    loss.backward()
    y = logits.double().clone().requires_grad_()
    lp_ref, ent_ref = reference(y, targets, temperature)
    ref_loss = (lp_ref * w).sum() + (entropy_bonus * (ent_ref * w).sum() if entropy_bonus else 0)
    ref_loss.backward()
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=0, atol=1e-5)


def test_bf16_logits_get_bf16_gradients_and_fp32_results():
    logits, targets, w = inputs(1)
    x = logits.bfloat16().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets, with_entropy=False, chunk_tokens=5)
    assert ent is None and lp.dtype == torch.float32
    (lp * w).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    y = x.detach().double().requires_grad_()
    (reference(y, targets, 1.0)[0] * w).sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=0, atol=2e-2)


def _tp2(rank, world_size, logits, targets, w):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    v = logits.shape[-1] // 2
    x = logits[..., rank * v:(rank + 1) * v].clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs(x, targets, tp_group=dist.group.WORLD, temperature=0.8, with_entropy=True,
                                      chunk_tokens=3)
    ((lp * w).sum() + 0.5 * (ent * w).sum()).backward()
    return lp, ent, x.grad


@pytest.mark.distributed
def test_tp2_shards_equal_the_unsplit_result(spawn):
    logits, targets, w = inputs(2, v=64)
    results = spawn(2, _tp2, logits, targets, w)
    y = logits.double().requires_grad_()
    lp_ref, ent_ref = reference(y, targets, 0.8)
    ((lp_ref * w).sum() + 0.5 * (ent_ref * w).sum()).backward()
    for rank, (lp, ent, grad) in enumerate(results):
        torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent.double(), ent_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(grad.double(), y.grad[..., rank * 32:(rank + 1) * 32], rtol=0, atol=1e-5)
