"""Peak memory (and time) of one SLTrain training step: the memory-efficient forward against the naive one and dense.

SLTrain (Han et al., NeurIPS 2024) parameterises W = (alpha / r) B A + S. The naive forward forms W with autograd
on, so autograd keeps W (out x in) from the forward to the backward; the memory-efficient forward
(``SparsePlusLowRankLinear`` in ``rankbench_plugins.trainers._sltrain_layers``) saves only x, B, A, the sparse values
and indices and re-forms W in the backward. A training step here is: y = layer(x), the loss sum(y * g) for a fixed
g, and the backward, with the gradients set to None before the step (the optimiser step is left out: its state is
the same for both forwards).

Variants, on the same shapes (SLTrain at the plugin's defaults: r = ceil(min(m, n) / 4), density 0.03, alpha 32):

* ``dense``: ``nn.Linear`` (the W it trains is a parameter, its gradient out x in);
* ``sltrain-naive``: ``SLTrainLinear.forward_dense`` (the previous implementation);
* ``sltrain-efficient``: ``SLTrainLinear.forward`` (the custom autograd function).

Cases: one Linear 784 -> 512 (the MLP task's hidden layer) and one 384 -> 1536 (a ViT-S MLP up-projection), a batch
of 256 inputs; and a stack of four ViT-S MLP blocks (384 -> 1536 -> GELU -> 384, all eight Linears replaced) on 256
tokens, where the naive forward keeps one W per layer until the backward.

Peak memory, without ``tracemalloc``: the torch profiler's allocation events (``profile_memory=True``; every CPU
tensor allocation and free in the step, in order), summed cumulatively; the peak is the most bytes live at once
above what was live before the step (parameters, x, g; the gradients the step makes are inside it). Reported
beside it: the parameters' own bytes, ``total = params + step peak`` and ``+Adam = 3 params + step peak`` (with
Adam's two moments, one of each per parameter). On CUDA (``--device cuda``) ``torch.cuda.max_memory_allocated``
is used instead. Ratios are to ``dense`` of the same case, measured in the same process. Time: the fastest of
``--repeats`` steps (the least disturbed on a shared machine; still noisy there).

Run:  OMP_NUM_THREADS=1 python benchmarks/memory/sltrain_memory.py [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time


def profiled_peak_bytes(step) -> int:
    """The most bytes of CPU tensors live at once during ``step()``, above those live before it (profiler events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = []

    def walk(node):
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative for a free
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    allocations.sort(key=lambda a: a[0])
    return max(itertools.accumulate(size for _, size in allocations), default=0)


def cuda_peak_bytes(step) -> int:
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def build(variant: str, shapes: list[tuple[int, int]], seed: int, device: str):
    """(model, forward): a Sequential of the Linears of ``shapes`` ((in, out) each), GELU between the two Linears of
    every block when there is more than one Linear, in the variant's form."""
    import torch
    from torch import nn

    from rankbench_plugins.trainers.sltrain import SLTrain

    torch.manual_seed(seed)
    method = SLTrain()
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(shapes):
        linear = nn.Linear(fan_in, fan_out)
        if variant == "dense":
            layer = linear
        else:
            layer = method.make_layer(linear, generator)
            if variant == "sltrain-naive":
                layer.forward = layer.forward_dense  # the previous implementation
        layers.append(layer)
        if len(shapes) > 1 and i % 2 == 0:
            layers.append(nn.GELU())
    return nn.Sequential(*layers).to(device)


def measure(variant: str, shapes, batch: int, repeats: int, device: str) -> dict:
    import torch

    model = build(variant, shapes, 0, device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, shapes[0][0], generator=generator).to(device)
    g = torch.randn(batch, shapes[-1][1], generator=generator).to(device)

    def clear():
        for p in model.parameters():
            p.grad = None

    def step():
        (model(x) * g).sum().backward()

    step()  # warm-up
    peaks = []
    for _ in range(3):  # the largest of three profiled steps (the allocator's temporaries vary a little)
        clear()  # outside the measured step: the previous step's gradients are not live before it
        peaks.append(cuda_peak_bytes(step) if device.startswith("cuda") else profiled_peak_bytes(step))
    peak = max(peaks)
    seconds = []
    for _ in range(repeats):
        clear()
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"variant": variant, "params_mb": params / 2**20, "step_peak_mb": peak / 2**20,
            "total_mb": (params + peak) / 2**20, "total_adam_mb": (3 * params + peak) / 2**20, "step_ms": 1e3 * min(seconds)}


CASES = {
    "linear 784->512, batch 256": ([(784, 512)], 256),
    "linear 384->1536, batch 256": ([(384, 1536)], 256),
    "4 ViT-S MLP blocks 384->1536->384, 256 tokens": ([(384, 1536), (1536, 384)] * 4, 256),
}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    for case, (shapes, batch) in CASES.items():
        results = [measure(v, shapes, batch, args.repeats, args.device)
                   for v in ("dense", "sltrain-naive", "sltrain-efficient")]
        dense = results[0]
        for r in results:
            r["case"] = case
            for key in ("step_peak_mb", "total_mb", "total_adam_mb", "step_ms"):
                r[f"{key}_vs_dense"] = r[key] / dense[key] if dense[key] else math.nan
            r["step_peak_vs_naive"] = r["step_peak_mb"] / results[1]["step_peak_mb"]
            rows.append(r)
    header = (f"{'case':46s} {'variant':18s} {'params MB':>9s} {'step peak MB':>12s} {'/dense':>7s} {'/naive':>7s} "
              f"{'total MB':>9s} {'/dense':>7s} {'+Adam MB':>9s} {'/dense':>7s} {'step ms':>8s} {'/dense':>7s}")
    print(header)
    for r in rows:
        print(f"{r['case']:46s} {r['variant']:18s} {r['params_mb']:9.2f} {r['step_peak_mb']:12.2f} "
              f"{r['step_peak_mb_vs_dense']:7.2f} {r['step_peak_vs_naive']:7.2f} {r['total_mb']:9.2f} "
              f"{r['total_mb_vs_dense']:7.2f} {r['total_adam_mb']:9.2f} {r['total_adam_mb_vs_dense']:7.2f} {r['step_ms']:8.2f} {r['step_ms_vs_dense']:7.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
