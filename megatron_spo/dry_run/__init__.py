"""The GPU dry run: the real training step of a GPU configuration, executed on a CPU-only machine.

`megatron-spo train --config C --dry-run` runs, for each distinct rank role of the configured
cluster, one full step of the real trainer with the accelerator played by the `meta` device
(tensors with shapes, dtypes and devices but no data) under torch's fake process group of the
configured world size. Three things are checked on the way (`audit.py`, `collectives.py`):
strict devices (no op mixes accelerator and CPU tensors, NCCL groups carry accelerator tensors,
gloo groups CPU tensors), and a per-GPU memory plan measured from the bytes of live accelerator
tensors. `runner.py` drives it; `plan.py` prints the plan. What meta execution cannot reach (a
value read back from the accelerator, data from other ranks) is substituted by a stated worst case
and listed in the output.
"""
