"""Memory plans: the accelerator memory a training run needs, counted before its first step, and the change that
makes it fit. Weights, gradients, optimizer state, EMA and frozen models are counted from the parameters; activations
exactly, for any shape, without a GPU or memory: the stage builds its models from their configs on fake tensors
(`FakeTensorMode`: shapes and dtypes only) and runs one step's forward (under autocast in half precision) and
backward while `LiveBytes` adds up every storage allocated and subtracts it when freed. The peak is what the step
needs beyond the weights: saved activations, autocast's half weight copies, the largest transients
(`benchmarks/bench_memory.py` checks it against a real CPU step). A stage supplies `measure(choices)` -> (trained
parameters, frozen ones, step peak, step peak apart from gradients); `plan` turns it into `Plans`, whose text is the
table the notebooks print (`sdnb.memory.table`), counted by `sdnb.memory.count`.
"""

from sdnb.memory.count import HALF, LiveBytes, fake_tensors, optimizer_bytes, step_peak
from sdnb.memory.table import GiB, Choices, Plan, Plans, Target, Usage, plan, suggest, targets

__all__ = ["GiB", "HALF", "Choices", "LiveBytes", "Plan", "Plans", "Target", "Usage", "fake_tensors",
           "optimizer_bytes", "plan", "step_peak", "suggest", "targets"]
