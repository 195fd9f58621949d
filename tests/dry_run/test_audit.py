"""The dry run's strict-device and memory audit, op by op (in process; no process group)."""

from __future__ import annotations

import pytest
import torch

from megatron_spo.dry_run.audit import Audit, DeviceMixError


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_cpu_tensor_into_accelerator_op_names_the_line():
    weight = meta(10, 4)
    with Audit():
        with pytest.raises(DeviceMixError, match=r"aten\.embedding.*test_audit\.py:\d+"):
            torch.nn.functional.embedding(torch.zeros(3, dtype=torch.long), weight)  # meta kernels accept this


def test_what_cuda_allows_is_allowed():
    x = meta(4, 4)
    with Audit():
        x * torch.tensor(2.0)  # a 0-dim CPU scalar beside GPU tensors
        x[torch.tensor([0, 2])]  # CPU indices into a GPU tensor
        x.copy_(torch.ones(4, 4))  # host -> device copy
        torch.ones(3).to("meta")
        with pytest.raises(DeviceMixError):
            x + torch.ones(4, 4)


def test_reads_of_device_values_are_substituted_and_recorded():
    audit = Audit()
    x = meta(3)
    with audit:
        assert x.sum().item() == 0.0
        assert bool((x > 0).any()) is False
        host = x.cpu()
    assert host.device.type == "cpu" and torch.equal(host, torch.full((3,), -1.0))
    sites = " ".join(audit.substitutions)
    assert ".item()" in sites and "GPU -> CPU copy" in sites and "test_audit.py" in sites


def test_live_and_peak_bytes_follow_storages():
    audit = Audit()
    with audit:
        a = meta(1000)  # 4000 bytes
        view = a.view(10, 100)  # same storage: not counted again
        assert audit.live == 4000
        with audit.measure() as m:
            tmp = meta(250, dtype=torch.float64)  # 2000 bytes
            del tmp
        assert m.peak_above == 2000 and audit.live == 4000
        del a
        assert audit.live == 4000  # the view keeps the storage alive
        del view
        assert audit.live == 0
    assert audit.peak == 6000


def test_measure_nests_inside_the_outer_peak():
    audit = Audit()
    with audit:
        with audit.measure() as outer:
            big = meta(1000)
            del big
            with audit.measure() as inner:
                small = meta(10)
                del small
        assert (outer.peak_above, inner.peak_above) == (4000, 40)
