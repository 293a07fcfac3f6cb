"""examples/ run as written: a user's own Linen and NNX models through the library."""

import re
import subprocess
import sys

import pytest
from run_helpers import ROOT


@pytest.mark.parametrize("script", ["film_linen.py", "gated_nnx.py"])
def test_example_runs_and_reports_vanilla_against_guided(script):
  result = subprocess.run([sys.executable, script], cwd=ROOT / "examples", capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  rows = {line.split()[0]: line for line in lines
          if line.split()[0] in ("vanilla", "guided") and "seed" not in line}
  number = r"(\d\.\d{3}) ± \d\.\d{3}"
  for method in ("vanilla", "guided"):
    accuracies = [float(a) for a in re.findall(number, rows[method])[:3]]
    assert len(accuracies) == 3 and all(0 <= a <= 1 for a in accuracies)
  assert rows["vanilla"].endswith("0% / 0%")  # vanilla measures, never re-balances
  shares = [int(s) for s in re.findall(r"(\d+)% / (\d+)%", rows["guided"])[0]]
  assert sum(shares) > 0
  described = [line for line in lines if line.startswith("vanilla seed")]
  assert len(described) == 3 and all("guided would favour m" in line for line in described)
