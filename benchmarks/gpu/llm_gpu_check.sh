#!/usr/bin/env bash
# The GPU proof of issue 17, as one script for a lent GPU machine (run from the repository root, after `make install`):
#   1. a random Llama of Llama-3.2-1B's shape (benchmarks/make_random_llama.py; no hub access needed);
#   2. the streamed memory bound of one svd-llm compression cell on CUDA (benchmarks/memory/streamed_llm_memory.py:
#      peak torch.cuda.max_memory_allocated against 1.5 x (weights + one block's work + one evaluation batch));
#   3. ppl_token throughput against a raw batched forward on CUDA (benchmarks/pytest/test_ppl_throughput.py);
#   4. a slice of suites/llm-gpu.yaml (svd and svd-llm x uniform x 0.8/0.4, dtype bfloat16 as Llama-3.2-1B's
#      checkpoint declares: the random folder's config declares float32, which dtype auto would keep) with the model replaced by the random
#      folder: per-phase times, peak_cuda_mb on every cell, device = cuda in every row;
#   5. --deterministic: two CUDA runs of suites/smoke.yaml's training slice give bit-identical metrics.
# Results go to $OUT (the device tool's output folder) or ./gpu-check. Budget: about 10 minutes on an H100/H200.
set -euo pipefail
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
PY=.venv/bin/python
BENCH=.venv/bin/bench
MODEL="$OUT/llama-3.2-1b-random"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
[ -d "$MODEL" ] || $PY benchmarks/make_random_llama.py --shape llama-3.2-1b --out "$MODEL" | tee "$OUT/make_model.txt"

$PY benchmarks/memory/streamed_llm_memory.py --model "$MODEL" --device cuda --factorization svd-llm --budget 0.5 \
    --seq-len 1024 --calib-samples 32 --eval-tokens 16384 --eval-batch-size 8 | tee "$OUT/memory_cuda.json"

RANKBENCH_BENCH_DEVICE=cuda timeout 240 $PY -m pytest benchmarks/pytest/test_ppl_throughput.py -m slow -q \
    --benchmark-only --benchmark-json "$OUT/ppl_throughput_cuda.json" || echo "ppl throughput benchmark failed"

sed -e "s#meta-llama/Llama-3.2-1B#$MODEL#" -e "s#^selectors:#selectors:#" suites/llm-gpu.yaml \
  | $PY -c "import sys, yaml; s = yaml.safe_load(sys.stdin); s['name'] = 'llm-gpu-check'; s['selectors'] = ['uniform']; s['factorizations'] = ['svd', 'svd-llm']; s['budgets'] = [0.8, 0.4]; s['tasks'][0]['llm-perplexity']['max_eval_tokens'] = 16384; s['tasks'][0]['llm-perplexity']['dtype'] = 'bfloat16'; print(yaml.safe_dump(s))" \
  > "$OUT/llm-gpu-check.yaml"
$BENCH run "$OUT/llm-gpu-check.yaml" --out "$OUT/llm-gpu-check" --device cuda
$BENCH report "$OUT/llm-gpu-check" > "$OUT/llm-gpu-check.txt" || true

for i in 1 2; do
  $BENCH run suites/smoke.yaml --out "$OUT/deterministic-$i" --device cuda --deterministic > /dev/null 2>&1 || true
done
$PY - "$OUT" <<'PY'
import sys, pandas as pd
out = sys.argv[1]
a, b = (pd.read_parquet(f"{out}/deterministic-{i}/metrics") for i in (1, 2))
timing = a["metric"].str.contains("seconds|_s$|_ms$|peak_|latency|throughput", regex=True)
keys = ["cell_id", "metric"]
m = a[~timing].merge(b, on=keys, suffixes=("_1", "_2"))
training = m[m["task"].isin(["mlp-classification", "pinn", "vit-classification", "cnn-classification"])] if "task" in m else m
same = (training["value_1"] == training["value_2"]) | (training["value_1"].isna() & training["value_2"].isna())
print(f"deterministic CUDA: {int(same.sum())} of {len(training)} training metrics bit-identical")
cells = pd.read_parquet(f"{out}/llm-gpu-check/metrics")
print("devices:", sorted(cells["device"].unique()), " cells with peak_cuda_mb:",
      cells.loc[cells["metric"] == "peak_cuda_mb", "cell_id"].nunique(), "of", cells["cell_id"].nunique())
PY
