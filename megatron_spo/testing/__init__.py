"""Scripted engines and fixtures used by tests and benches, never by the library itself.

- `digit_task`: the 3-digit number task whose prefix values are enumerable, with a scripted
  policy and a `RolloutEngine` over it, so segment algorithms can be checked against exact values.
"""
