"""PyTorch reference step for the benchmarks, written from docs/methods/algorithm.md.

The same two-branch models (small CNN pair, ResNet-18 pair), MMTM fusion, loss
(Σ_k CE(ŷ_k, y)) and plain SGD step as gml_jax, with the conditional-learning-speed
bookkeeping done the way the authors' code does it: after backward, a Python loop over the
named parameters with a host sync (``.item()``) per tensor, groups found from parameter
names, and the state machine in Python.

Benchmark only: never imported by gml_jax. Runs (``python -m benchmarks.torch_reference``,
from the clone's root) as a worker that the benchmark driver talks
to over stdin/stdout, one JSON object per line:

  {"cmd": "setup", "workload": "cnn_b64", "seed": 0, "dtype": "float32"}
                                                      -> {"params": <count>}
  {"cmd": "run", "method": "guided", "steps": 20}     -> {"seconds": <wall time>,
                                                          "peak_mb": <CUDA peak or null>}

``dtype`` "bfloat16" runs the forward pass under ``torch.autocast`` (PyTorch's mixed
precision: parameters and optimizer in float32, like gml_jax's ``compute_dtype``).
  {"cmd": "quit"}
"""

import json
import math
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.workloads import ALPHA, LEARNING_RATE, WINDOW, WORKLOADS


def conv_bn_relu(cin, cout, kernel, stride=1):
  return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def cnn_stages(cin, width=32):
  return nn.ModuleList([
      nn.Sequential(conv_bn_relu(cin, width, 5), nn.MaxPool2d(2), conv_bn_relu(width, width, 3)),
      conv_bn_relu(width, 2 * width, 3, 2),
      conv_bn_relu(2 * width, 2 * width, 3),
  ])


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = conv_bn_relu(cin, cout, 3, stride)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.bn2(self.conv2(self.conv1(x)))
    return F.relu((x if self.down is None else self.down(x)) + y)


def resnet18_stages(cin):
  layer = lambda a, b, s: nn.Sequential(BasicBlock(a, b, s), BasicBlock(b, b, 1))
  return nn.ModuleList([
      nn.Sequential(conv_bn_relu(cin, 64, 7, 2), nn.MaxPool2d(3, 2, 1)),
      layer(64, 64, 1), layer(64, 128, 2), layer(128, 256, 2), layer(256, 512, 2),
  ])


class MMTM(nn.Module):
  """MMTM for two modalities with per-modality running means of the excitations."""

  def __init__(self, channels, ratio=4):
    super().__init__()
    self.squeeze = nn.Linear(sum(channels), int(2 * sum(channels) / ratio))
    self.excite = nn.ModuleList([nn.Linear(self.squeeze.out_features, c) for c in channels])
    for k, c in enumerate(channels):
      self.register_buffer(f"mean_{k}", torch.zeros(c))
      self.register_buffer(f"count_{k}", torch.zeros(()))

  def forward(self, xs, cut):
    z = F.relu(self.squeeze(torch.cat([x.mean((2, 3)) for x in xs], 1)))
    out = []
    for k, x in enumerate(xs):
      mean, count = getattr(self, f"mean_{k}"), getattr(self, f"count_{k}")
      if k == cut:
        e = mean.expand(x.shape[0], -1)
      else:
        e = torch.sigmoid(self.excite[k](z))
        if self.training:
          with torch.no_grad():
            count += 1
            mean += (e.mean(0) - mean) / count
      out.append(x * e[:, :, None, None])
    return out


class FusionNet(nn.Module):
  def __init__(self, stages_fn, channels, classes, fusion_after, fused_channels):
    super().__init__()
    self.branch_0, self.branch_1 = stages_fn(channels[0]), stages_fn(channels[1])
    self.fusion = nn.ModuleList([MMTM([c, c]) for c in fused_channels])
    self.fusion_after = list(fusion_after)
    width = fused_channels[-1]
    self.head_0, self.head_1 = nn.Linear(width, classes), nn.Linear(width, classes)

  def forward(self, x0, x1, cut=-1):
    for s, (f0, f1) in enumerate(zip(self.branch_0, self.branch_1)):
      x0, x1 = f0(x0), f1(x1)
      if s in self.fusion_after:
        x0, x1 = self.fusion[self.fusion_after.index(s)]([x0, x1], cut)
    return self.head_0(x0.mean((2, 3))), self.head_1(x1.mean((2, 3)))


def build(workload):
  w = WORKLOADS[workload]
  if w["model"] == "small_cnn":
    return FusionNet(cnn_stages, w["channels"], w["classes"], (1, 2), (64, 64))
  return FusionNet(resnet18_stages, w["channels"], w["classes"], (2, 3, 4), (128, 256, 512))


def group_of(name):
  """The authors' way: parameter groups from parameter names."""
  if name.startswith(("branch_0", "head_0")):
    return "main_0"
  if name.startswith(("branch_1", "head_1")):
    return "main_1"
  if ".excite.0." in name:
    return "fusion_0"
  if ".excite.1." in name:
    return "fusion_1"
  return "shared"


class Trainer:
  def __init__(self, workload, seed, dtype="float32"):
    torch.manual_seed(seed)
    random.seed(seed)
    w = WORKLOADS[workload]
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                   enabled=dtype == "bfloat16")
    self.model = build(workload).train().to(self.device)
    self.opt = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
    shape = lambda c: (w["batch"], c, w["size"], w["size"])
    self.x0 = torch.randn(shape(w["channels"][0]), device=self.device)
    self.x1 = torch.randn(shape(w["channels"][1]), device=self.device)
    self.y = torch.randint(0, w["classes"], (w["batch"],), device=self.device)
    self.reset()

  def reset(self):
    self.accum = {g: 0.0 for g in ("main_0", "main_1", "fusion_0", "fusion_1")}
    self.target, self.left, self.step_count = -1, 0, 0

  def step(self, method):
    cut = self.target
    self.opt.zero_grad(set_to_none=True)
    with self.autocast:
      l0, l1 = self.model(self.x0, self.x1, cut)
    loss = F.cross_entropy(l0.float(), self.y) + F.cross_entropy(l1.float(), self.y)
    loss.backward()
    # Conditional learning speed, one host sync per tensor.
    sums = {g: [0.0, 0.0] for g in ("main_0", "main_1", "fusion_0", "fusion_1", "shared")}
    for name, p in self.model.named_parameters():
      if p.grad is None:
        continue
      g = sums[group_of(name)]
      g[0] += p.grad.norm().item() ** 2
      g[1] += p.data.norm().item() ** 2
    if cut >= 0:  # re-balancing step: only branch k moves
      for name, p in self.model.named_parameters():
        if group_of(name) != f"main_{cut}":
          p.grad = None
      self.left -= 1
      self.target = cut if self.left > 0 else -1
    else:
      for k in range(2):
        self.accum[f"main_{k}"] += sums[f"main_{k}"][0] / sums[f"main_{k}"][1]
        fusion = [a + b for a, b in zip(sums[f"fusion_{k}"], sums["shared"])]
        self.accum[f"fusion_{k}"] += fusion[0] / fusion[1]
      s = [math.log10(self.accum[f"fusion_{k}"] / self.accum[f"main_{k}"]) for k in range(2)]
      if method == "guided" and abs(s[0] - s[1]) > ALPHA:
        self.target, self.left = (0 if s[0] > s[1] else 1), WINDOW
    if method == "random":
      self.target = random.choice([-1, 0, 1])
      self.left = 1
    self.opt.step()
    self.step_count += 1


def serve():
  trainer = None
  for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "setup":
      trainer = Trainer(msg["workload"], msg.get("seed", 0), msg.get("dtype", "float32"))
      reply = {"params": sum(p.numel() for p in trainer.model.parameters()),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    elif msg["cmd"] == "run":
      trainer.reset()
      cuda = trainer.device.type == "cuda"
      if cuda:
        torch.cuda.reset_peak_memory_stats()
      trainer.step(msg["method"])  # outside the timing, like the JAX side's warm-up
      start = time.perf_counter()
      for _ in range(msg["steps"]):
        trainer.step(msg["method"])
      if cuda:
        torch.cuda.synchronize()
      reply = {"seconds": time.perf_counter() - start,
               "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    else:
      return
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  serve()
