"""Checks of config values: each a (test, what is expected) pair, named in error messages."""

from __future__ import annotations

import math


def integer(low: int):
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
          f"an integer >= {low}")


def number(test, text: str):
  return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v) and test(v), f"a finite number {text}")


def one_of(choices):
  return (lambda v: v in choices, f"one of {tuple(choices)}")


FLAG = (lambda v: isinstance(v, bool), "true or false")
