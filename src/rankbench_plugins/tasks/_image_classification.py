"""What the image-classification tasks (``vit-classification``, ``mlp-classification``) share: the dataset, the
seeded network, calibration batches, the training-kind minibatch stream, the evaluation (top-1 accuracy, test loss,
latency) and the digest that keys cached trained weights. Each task supplies its network (``build_network``), its
sites and its training settings.

Metrics: ``accuracy`` (top-1 on the test split, primary), ``test_loss``, ``latency_ms`` (median of
``latency_repeats`` forward passes over one batch of ``batch_size`` test images, device-synchronised on CUDA).
Calibration batches are the first ``calib_samples`` training images; training-kind minibatches are drawn in an
order seeded by the task seed and the epoch.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rankbench.api import TRAINING
from rankbench.cells import derived_seed
from rankbench.kinds.compression import CompressionTask
from rankbench.kinds.training import TrainingTask, trained_dense_network
from rankbench_plugins.tasks import _vision_data as data

if TYPE_CHECKING:
    import torch
    from torch import nn

CACHE_VERSION = 1
# parameters a trained network does not depend on (compression, fine-tuning and measurement settings)
NOT_IN_NETWORK = {"model", "calib_samples", "latency_repeats", "problem", "target", "steps", "retrain_steps", "sites",
                  "adapter_lr", "train_head"}


class ImageClassificationTask(CompressionTask, TrainingTask):
    """A classifier on ``_vision_data``'s datasets that speaks the training kind (its dense network, trained from
    scratch, is also what its compression cells compress)."""

    problem_kind = TRAINING
    primary_metric = "accuracy"

    @abc.abstractmethod
    def build_network(self, ds: data.ImageDataset) -> nn.Module:
        """The untrained network for ``ds``."""

    def dataset(self, ctx, name: str | None = None) -> data.ImageDataset:
        """The training dataset (``name`` None) or another one, loaded once per process."""
        p = self.params
        name = name or p.dataset
        return ctx.memo(("vit_data", name, p.max_train, p.max_test),
                        lambda: data.load_dataset(name, Path(ctx.cache_dir).parent, p.max_train, p.max_test))

    def evaluated_dataset(self, ctx) -> data.ImageDataset:
        """The dataset whose test split the metrics are measured on."""
        return self.dataset(ctx)

    def seeded_network(self, ctx) -> nn.Module:
        import torch

        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's generator
            torch.manual_seed(derived_seed(ctx.task_seed, "init"))
            return self.build_network(self.dataset(ctx))

    def network_digest(self, ctx, kind: str) -> str:
        """What a trained network depends on (not the compression or fine-tuning settings)."""
        p = self.params
        config = {**p.model_dump(exclude=NOT_IN_NETWORK), "seed": ctx.task_seed, "version": CACHE_VERSION}
        if getattr(p, "model", None) is not None:
            config["model"] = folder_digest(p.model)
        if kind != "pretrained":
            config["kind"] = kind
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    def load_model(self, ctx) -> nn.Module:
        return trained_dense_network(self, ctx)

    def calibration_batches(self, ctx) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ds, size = self.dataset(ctx), self.params.batch_size
        x, y = ds.train_x[: self.params.calib_samples], ds.train_y[: self.params.calib_samples]
        return [(x[i : i + size].to(ctx.device), y[i : i + size].to(ctx.device)) for i in range(0, len(x), size)]

    def calibration_loss(self, model: nn.Module, batch) -> torch.Tensor:
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, ctx, model: nn.Module) -> None:
        import torch
        import torch.nn.functional as F

        ds, size = self.evaluated_dataset(ctx), self.params.batch_size
        correct, loss = 0, 0.0
        with torch.no_grad():
            for start in range(0, ds.test_x.shape[0], size):
                x, y = ds.test_x[start : start + size].to(ctx.device), ds.test_y[start : start + size].to(ctx.device)
                logits = model(x)
                correct += int((logits.argmax(dim=1) == y).sum())
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n = ds.test_x.shape[0]
        ctx.metric("accuracy", correct / n, "", True)
        ctx.metric("test_loss", loss / n, "", False)
        ctx.metric("latency_ms", self.latency_ms(ctx, model, ds.test_x[:size].to(ctx.device)), "ms", False)

    def latency_ms(self, ctx, model: nn.Module, batch: torch.Tensor) -> float:
        """Median wall time of one forward pass over ``batch`` (device-synchronised on CUDA)."""
        import torch

        times = []
        with torch.no_grad():
            model(batch)  # warm-up
            for _ in range(self.params.latency_repeats):
                if ctx.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(batch)
                if ctx.device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return 1000.0 * sorted(times)[len(times) // 2]

    # -- the training kind ------------------------------------------------------------------------------------------
    def fresh_model(self, ctx) -> nn.Module:
        return self.seeded_network(ctx).to(ctx.device).train()

    def training_batches(self, ctx, epoch: int):
        import torch

        ds, size = self.dataset(ctx), self.params.batch_size
        order = torch.randperm(ds.train_x.shape[0], generator=torch.Generator().manual_seed(
            derived_seed(ctx.task_seed, "batches", epoch)))
        for start in range(0, len(order), size):
            index = order[start : start + size]
            yield ds.train_x[index].to(ctx.device), ds.train_y[index].to(ctx.device)

    def batch_loss(self, model: nn.Module, batch) -> torch.Tensor:
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(model(x), y)

    def dense_cache_path(self, ctx) -> Path:
        return Path(ctx.cache_dir) / f"{self.name}-{self.params.dataset}-{self.network_digest(ctx, 'scratch')}.pt"


def folder_digest(name: str) -> str:
    """sha256 over a local model folder's files (names and bytes); a hub id stands for itself. Hashed once per
    process for an unchanged folder (a ViT-B checkpoint is ~350 MB; every cell asks for its cache key)."""
    folder = Path(name)
    if not folder.is_dir():
        return name
    files = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in sorted(folder.rglob("*")) if p.is_file())
    return files_digest(str(folder.resolve()), files)


@functools.lru_cache(maxsize=8)
def files_digest(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for relative, _size, _mtime in files:
        digest.update(relative.encode())
        with (Path(folder) / relative).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


