"""`python -m megatron_spo ...` is the same CLI as `megatron-spo ...`."""

from megatron_spo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
