"""Peak memory of one ``llm-perplexity`` compression cell against the streaming bound.

The bound (issue: "peak memory of a compression cell <= 1.5 x (model weights + one block's work + one evaluation
batch)"), with each term computed from the model here:

* model weights: the bytes of every parameter of the loaded model;
* one block's work: the first decoder layer's Gram matrices in float64 (one per distinct input: q/k/v share one,
  gate/up share one) plus the factorization's full decompositions of that layer's sites in its precision
  (p x (out + in) + p values each);
* one evaluation batch: ``eval_batch_size x seq_len x vocabulary`` logits in float32, twice (the logits and the
  cross-entropy's log-softmax).

Peak memory is the process's peak resident set (``VmHWM``), reset after the model is loaded and the text tokenized
(as the runner does at the start of each cell), and read after the compressed cell (calibration, decompositions,
selection, the swap and the evaluation) -- on CUDA, ``torch.cuda.max_memory_allocated`` instead. The runtime's own
resident memory (Python, torch, transformers: ~0.35 GB, measured before the model loads) is reported, and the ratio
is given with and without it.

Run (any Hugging Face Llama-family folder; ``benchmarks/make_random_llama.py`` builds Llama-3.2-1B's shape):

    python benchmarks/memory/streamed_llm_memory.py --model /path/to/folder [--factorization svd-llm]
        [--budget 0.5] [--seq-len 256] [--calib-samples 4] [--eval-tokens 1024] [--no-stream] [--device cpu]

``--no-stream`` runs the same cell with the task's blocks hidden (one whole-model calibration pass holding every
site's statistics), for the before/after comparison on a model where that fits. The decomposition cache goes to a
temporary folder (deleted after) unless ``--cache-dir`` names one, so the cell computes its decompositions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def block_work_bytes(task, model, factorization) -> int:
    """Float64 Gram matrices of the first block's distinct inputs plus that block's decompositions."""
    import torch

    blocks = task.site_blocks(model)
    sites = {name: linear for name, linear in task.target_sites(model).items() if name.startswith(blocks[0] + ".")}
    precision = torch.float64 if factorization.precision == "float64" else torch.float32
    element = torch.tensor([], dtype=precision).element_size()
    widths = {}  # one Gram per distinct input: sites reading the same tensor are recognised by the module names
    for name, linear in sites.items():
        group = "attention-in" if any(k in name for k in ("q_proj", "k_proj", "v_proj", "c_attn")) else (
            "mlp-in" if any(k in name for k in ("gate_proj", "up_proj", "fc1", "c_fc")) else name)
        widths[group] = linear.weight.shape[1]
    grams = sum(w * w * 8 for w in widths.values()) if "gram" in factorization.needs else 0
    decompositions = 0
    for linear in sites.values():
        out_features, in_features = linear.weight.shape
        p = min(out_features, in_features)
        decompositions += (p * (out_features + in_features) + p) * element
    return grams + decompositions


def current_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face model folder (or smollm2-135m)")
    parser.add_argument("--factorization", default="svd-llm")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-stream", action="store_true", help="hide the task's blocks: one whole-model pass")
    parser.add_argument("--cache-dir", default=None, help="decomposition cache (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    from rankbench.context import CellContext
    from rankbench.kinds import run_cell
    from rankbench.measure import peak_rss_mb, reset_peak_rss
    from rankbench.plugins import load_plugins
    from rankbench.runner import cache_root
    from rankbench_plugins.selectors.uniform import UniformSelector
    from rankbench_plugins.tasks.llm_perplexity import LLMPerplexity, LLMPerplexityParams

    if args.threads:
        torch.set_num_threads(args.threads)
    task = LLMPerplexity(LLMPerplexityParams(
        model=args.model, seq_len=args.seq_len, calib_samples=args.calib_samples, calib_batch_size=args.eval_batch_size,
        max_eval_tokens=args.eval_tokens, eval_batch_size=args.eval_batch_size, lm_eval=False))
    factorization = load_plugins().get("factorization", args.factorization).cls()
    scratch = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="rankbench-memory-"))
    shared: dict = {}

    def context(budget):
        return CellContext(cell_id="memory", seed=0, task_seed=0, device=args.device, budget=budget,
                           budget_kind="param_ratio" if budget is not None else None, shared=shared,
                           cache_dir=Path(cache_root()) / "llm-perplexity")

    try:
        os.environ.pop("RANKBENCH_NO_DECOMPOSITION_CACHE", None)
        import transformers  # noqa: F401  (the runtime's own footprint, measured before any model is loaded)

        runtime = current_rss_mb()
        started = time.perf_counter()
        ctx = context(None)
        model = task.model(ctx)
        task.test_ids(ctx)
        task.calibration_windows(ctx)
        loaded_s = time.perf_counter() - started
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        block = block_work_bytes(task, model, factorization)
        if args.no_stream:
            type(task).site_blocks = lambda self, model: None
        vocabulary = model.get_output_embeddings().weight.shape[0]
        batch = 2 * args.eval_batch_size * args.seq_len * vocabulary * 4
        cell = context(args.budget)
        cell.cache_dir = scratch  # the decompositions' cache only (the model stays where it was loaded from)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rss_before = peak_rss_mb()
        reset_peak_rss()
        started = time.perf_counter()
        run_cell(task, cell, UniformSelector(), factorization)
        cell_s = time.perf_counter() - started
        peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else peak_rss_mb())
    finally:
        if not args.cache_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    metrics = {m["metric"]: m["value"] for m in cell.metrics}
    mib = 2**20
    bound = 1.5 * (weights + block + batch) / mib
    report = {
        "model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
        "factorization": args.factorization, "budget": args.budget, "streamed": not args.no_stream,
        "device": args.device, "threads": torch.get_num_threads(), "load_s": round(loaded_s, 1),
        "cell_s": round(cell_s, 1), "phases_s": {k: round(v, 1) for k, v in cell.timer.seconds.items()},
        "weights_mib": round(weights / mib), "block_work_mib": round(block / mib), "eval_batch_mib": round(batch / mib),
        "peak_after_load_mib": round(rss_before), "peak_cell_mib": round(peak), "bound_mib": round(bound),
        "runtime_mib": round(runtime),
        "peak_over_weights_block_batch": round(peak / ((weights + block + batch) / mib), 3),
        "peak_less_runtime_over_weights_block_batch": round((peak - runtime) / ((weights + block + batch) / mib), 3),
        "within_bound": peak <= bound, "ppl_token": metrics.get("ppl_token"), "param_ratio": metrics.get("param_ratio"),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
