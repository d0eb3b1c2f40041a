"""Build a seeded, randomly initialised Llama of a given shape: a Hugging Face folder (float32 safetensors and
a tokenizer).

    python benchmarks/make_random_llama.py --shape {tiny,llama-3.2-1b} --out DIR [--seed N] [--cache DIR]

The same builder as task ``llm-perplexity``'s built-in ``tiny-random-llama`` (``_llm_assets.build_random_llama``):
``LlamaForCausalLM(config)`` initialised by transformers' own ``_init_weights`` from ``torch.manual_seed(seed)``, with
the 512-token byte-level BPE tokenizer trained on the built-in enwiki train split (extracted once into ``--cache``,
default ``$RANKBENCH_CACHE/llm-perplexity``, as the task does). Same shape, seed and library versions: the same bytes.
The folder is written in a temporary sibling and renamed when complete. Use it as ``model: DIR`` in a suite.

Shapes (``_llm_assets.RANDOM_LLAMA_SHAPES``)
    ``tiny``          2 layers, hidden 64, 4 heads / 2 KV heads of dim 16, intermediate 128, tied embeddings:
                      106,816 parameters, under a second.
    ``llama-3.2-1b``  Llama-3.2-1B's shape: hidden 2048, intermediate 8192, 16 layers, 32 heads / 8 KV heads of dim
                      64, vocabulary 128,256, tied embeddings, RoPE theta 500,000 with llama3 scaling,
                      max_position_embeddings 131,072: 1,235,814,400 parameters, 4.94 GB of float32 weights (3
                      shards of at most 2 GB). The tokenizer has only 512 tokens, so its ids use the first 512 rows of
                      the embedding (the output still scores all 128,256 rows): what compression costs in memory and
                      time is that of the real model; perplexities mean nothing. The model is built once, on the CPU
                      (each tensor allocated and initialised in place, no second copy); saving writes shard by shard.
                      Measured (2-core machine shared with other jobs, one torch thread, torch 2.13 / transformers
                      5.25): 59 s wall (enwiki extraction and tokenizer 6 s, initialisation 30 s, saving 17 s), peak
                      RSS 6.05 GiB (``/usr/bin/time -v``), i.e. the weights (4.6 GiB) plus 1.4 GiB.

Needs about 5 GB of RAM and of disk for ``llama-3.2-1b``. Exit status 2 for bad arguments or an existing ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from rankbench_plugins.tasks import _llm_assets as assets

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(assets.RANDOM_LLAMA_SHAPES))
    parser.add_argument("--out", required=True, type=Path, help="the model folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the initialisation (default 0)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the enwiki corpus is extracted (default $RANKBENCH_CACHE/llm-perplexity)")
    args = parser.parse_args(argv)
    out = args.out.expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {out} exists; remove it or choose another folder")
    cache = args.cache
    if cache is None:
        cache = Path(os.environ.get("RANKBENCH_CACHE", Path.home() / ".cache" / "rankbench")) / "llm-perplexity"
    if out.exists():
        out.rmdir()  # an empty folder: build_once renames the finished build into its place
    out.parent.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    texts, corpus_sha = assets.tiny_model_texts(cache)
    tokenizer = assets.train_tiny_tokenizer(texts)
    tokenizer_s = time.perf_counter() - start
    report: dict = {}

    def build(tmp: Path) -> None:
        report.update(assets.build_random_llama(tmp, args.shape, tokenizer, args.seed))

    info = {"shape": args.shape, "seed": args.seed, "corpus_sha256": corpus_sha,
            "config": assets.RANDOM_LLAMA_SHAPES[args.shape]}
    assets.build_once(out, build, info)
    with contextlib.suppress(OSError):  # build_once's lock file, next to the folder: no other builder waits on it
        (out.parent / f".{out.name}.lock").unlink()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    size = sum(p.stat().st_size for p in out.iterdir() if p.name.endswith(".safetensors"))
    print(f"{args.shape} (seed {args.seed}) in {out}: parameters {report['parameters']:,}, "
          f"{size / 1e9:.2f} GB of safetensors")
    print(json.dumps({"tokenizer_s": round(tokenizer_s, 2), "init_s": round(report["init_s"], 2),
                      "build_and_save_s": round(report["total_s"], 2),
                      "total_s": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak_mib)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
