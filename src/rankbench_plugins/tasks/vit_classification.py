"""Task ``vit-classification``: a small Vision Transformer trained here on a real image dataset, then compressed.

Model (``_networks.ViT``; Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, in the pre-norm form): the
image is cut into non-overlapping ``patch`` x ``patch`` patches, each flattened and embedded by a Linear
(``patch_embed``); a learned class token is prepended and learned position embeddings added; ``depth`` blocks of

    h = h + proj(MHA(LN(h)))          (qkv: one Linear dim -> 3 dim, ``heads`` heads, scaled dot-product attention)
    h = h + fc2(GELU(fc1(LN(h))))     (hidden ``mlp_ratio`` x dim)

then LN and a Linear ``head`` on the class token. Sites: the qkv, proj, fc1 and fc2 Linears of every block (the
patch embedding and the head are not targeted).

Or ``model``: any transformers image classifier, from a local Hugging Face folder or a hub id (one
``from_pretrained`` path for both; the hub only where reachable), with its head resized to the dataset's classes and
the images resized to its input side and repeated over its channels; its sites are every Linear but the head and
the embeddings. It
is then fine-tuned on the dataset exactly as the built-in ViT is trained (cached by a digest of the folder's files).
timm checkpoints are not supported (timm is not installed here).

Training: AdamW (lr ``lr``, weight decay 0.05), cross-entropy, ``epochs`` passes over the training split in
minibatches of ``batch_size`` shuffled by a generator seeded from the task seed; the trained weights are cached on
disk per configuration and seed (``$RANKBENCH_CACHE/vit-classification/``), so every cell of a configuration
compresses the same network. Data: ``_vision_data`` (sklearn digits, MNIST-5k, Fashion-MNIST).

Problem kinds (``problem``)
    ``compression`` (budget kind ``param_ratio``): the compression protocol with the matrix (svd, asvd, fwsvd,
        svd-llm) and tensor (cp, tucker, tt, ttm) factorizations; calibration batches are the first
        ``calib_samples`` training images.
    ``adaptation`` (budget kind ``rank_total``): the network trained on ``dataset`` is fine-tuned on ``target``
        with LoRA adapters on the sites (``rankbench.kinds.adaptation``; everything else, the head included,
        stays frozen) for ``steps`` Adam steps (``adapter_lr``) on minibatches of ``batch_size`` drawn per cell;
        the reference cell fine-tunes every weight with ``lr``; ``train_head`` trains the head fully beside the
        adapters in every cell alike (PEFT's ``modules_to_save``; its size is ``extra_trained_params``, outside
        the rank budget). Metrics on ``target``'s test split.
    ``training``: the network trained from scratch (``rankbench.kinds.training``) with constant-rate AdamW
        (``lr``, weight decay 0.05) for ``epochs`` epochs, by a rank-adaptive method in its layer format, or densely
        (the reference; its weights are what the compression selectors of the same task compress).

Metrics: ``accuracy`` (top-1 on the test split, primary), ``test_loss``, ``latency_ms`` (median of ``latency_repeats``
forward passes over one batch of ``batch_size`` test images, device-synchronised), and the protocol's ``params`` /
``param_ratio``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from rankbench.api import ADAPTATION, TRAINING, PluginParams, hookimpl, lazy_attributes
from rankbench.cells import derived_seed
from rankbench.kinds import KindChosenByParameter
from rankbench.kinds.adaptation import AdaptsCompressionModel
from rankbench.kinds.compression import cached_weights
from rankbench.kinds.training import TrainingSettings, trained_dense_network
from rankbench_plugins.tasks import _vision_data as data
from rankbench_plugins.tasks._image_classification import ImageClassificationTask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rankbench_plugins.tasks._networks import PretrainedImageClassifier

# The Hugging Face hub stays offline unless the user sets HF_HUB_OFFLINE otherwise (an unreachable hub fails fast
# instead of hanging). Set when the plugin is imported, before any model loads: the Hugging Face libraries read it
# once, when they are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ViTParams(PluginParams):
    model: str | None = Field(
        None,
        description="a transformers image classifier (a local Hugging Face folder, or a hub id where the hub is "
        "reachable) used instead of the built-in ViT; its head is resized to the dataset's classes",
    )
    dataset: Literal["digits", "mnist", "fashion-mnist"] = "digits"
    max_train: int | None = Field(None, ge=10, description="cap on training images (stratified subset)")
    max_test: int | None = Field(None, ge=10, description="cap on test images (stratified subset)")
    patch: int = Field(2, ge=1, description="patch side in pixels (must divide the image side)")
    dim: int = Field(64, ge=8, description="embedding width")
    depth: int = Field(4, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (must divide dim)")
    mlp_ratio: int = Field(2, ge=1, description="MLP hidden width / dim")
    epochs: int = Field(10, ge=0, description="training epochs (cached)")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    calib_samples: int = Field(256, ge=1, description="training images used as calibration data")
    latency_repeats: int = Field(5, ge=1)
    problem: Literal["compression", "adaptation", "training"] = "compression"
    target: Literal["digits", "mnist", "fashion-mnist"] | None = Field(
        None, description="adaptation: the dataset to fine-tune on (None: the training dataset)"
    )
    steps: int = Field(300, ge=1, description="adaptation: fine-tuning steps per cell")
    retrain_steps: int = Field(100, ge=0, description="adaptation: steps after a post-hoc rank selection")
    adapter_lr: float = Field(1e-2, gt=0.0, description="adaptation: Adam learning rate of the adapters")
    train_head: bool = Field(False, description="adaptation: train the classification head fully beside the adapters")

    @model_validator(mode="after")
    def _check(self) -> ViTParams:
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        if self.retrain_steps >= self.steps:
            raise ValueError(f"retrain_steps ({self.retrain_steps}) must be smaller than steps ({self.steps})")
        return self


def load_pretrained_classifier(name: str, classes: int) -> PretrainedImageClassifier:
    """``from_pretrained`` on a local folder or a hub id (one path for both), head resized to ``classes``."""
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    from rankbench_plugins.tasks._networks import PretrainedImageClassifier

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the resized head's "newly initialized" warning is expected here
    try:
        net = AutoModelForImageClassification.from_pretrained(name, num_labels=classes, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    size = net.config.image_size
    return PretrainedImageClassifier(net, size if isinstance(size, int) else int(size[0]), net.config.num_channels)


class ViTClassification(KindChosenByParameter, ImageClassificationTask, AdaptsCompressionModel):
    name = "vit-classification"
    version = "1"
    description = "Small ViT trained here on digits / MNIST / Fashion-MNIST: top-1 accuracy and latency"
    Params = ViTParams

    @classmethod
    def conformance_params(cls) -> list[dict]:
        tiny = {"dataset": "digits", "max_train": 200, "max_test": 100, "patch": 4, "dim": 16, "depth": 1, "heads": 2,
                "epochs": 1, "batch_size": 64, "calib_samples": 64, "latency_repeats": 1}
        return [
            {**tiny, "problem": "compression"},
            {**tiny, "problem": "adaptation", "target": "digits", "steps": 6, "retrain_steps": 3},
            {**tiny, "problem": "training"},
        ]

    @property
    def from_scratch(self) -> bool:
        """``problem: training``: the network is trained from scratch by each cell (its compression cells compress
        the dense one); otherwise it is trained once here (cached) and compressed or fine-tuned."""
        return self.params.problem == TRAINING

    def evaluated_dataset(self, ctx) -> data.ImageDataset:
        p = self.params
        return self.dataset(ctx, p.target if p.problem == ADAPTATION else None)

    def build_network(self, ds: data.ImageDataset) -> nn.Module:
        """The untrained network (the built-in ViT, or the ``model`` classifier with a fresh head)."""
        from rankbench_plugins.tasks._networks import ViT

        p = self.params
        if p.model is not None:
            return load_pretrained_classifier(p.model, ds.num_classes)
        return ViT(ds.image_size, p.patch, ds.num_classes, p.dim, p.depth, p.heads, p.mlp_ratio)

    def load_model(self, ctx) -> nn.Module:
        if self.from_scratch:  # the dense network of the training kind (trained like every training cell)
            return trained_dense_network(self, ctx)
        p, ds = self.params, self.dataset(ctx)
        path = Path(ctx.cache_dir) / f"vit-{p.dataset}-{self.network_digest(ctx, 'pretrained')}.pt"
        model = cached_weights(self.seeded_network(ctx), path, lambda m: self.train(ctx, m, ds))
        return model.to(ctx.device).eval()

    def train(self, ctx, model: nn.Module, ds: data.ImageDataset) -> None:
        """Training of the network that the compression and adaptation kinds start from: AdamW with a one-cycle
        schedule (the training kind's cells use the task's constant-rate settings instead)."""
        import torch
        import torch.nn.functional as F

        p = self.params
        model.to(ctx.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.05)
        generator = torch.Generator().manual_seed(derived_seed(ctx.task_seed, "batches"))
        n = ds.train_x.shape[0]
        steps = p.epochs * math.ceil(n / p.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=p.lr, total_steps=max(steps, 1))
        for _ in range(p.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, p.batch_size):
                index = order[start : start + p.batch_size]
                x, y = ds.train_x[index].to(ctx.device), ds.train_y[index].to(ctx.device)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                schedule.step()
        model.cpu().eval()

    def target_sites(self, model: nn.Module) -> dict[str, nn.Linear]:
        from torch import nn

        from rankbench_plugins.tasks._networks import PretrainedImageClassifier

        if isinstance(model, PretrainedImageClassifier):  # every Linear but the head and the embeddings
            head = {id(m) for m in model.head().modules()}
            return {name: m for name, m in model.named_modules()
                    if isinstance(m, nn.Linear) and id(m) not in head and "embed" not in name}
        return {
            f"blocks.{i}.{name}": module
            for i, block in enumerate(model.blocks)
            for name, module in (("attn.qkv", block.attn.qkv), ("attn.proj", block.attn.proj), ("fc1", block.fc1),
                                 ("fc2", block.fc2))
        }

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(epochs=self.params.epochs, lr=self.params.lr, optimizer="adamw", weight_decay=0.05)

    # -- adaptation (``AdaptsCompressionModel``: the trained network, LoRA fine-tuned on ``target``) ------------------
    def trained_beside_adapters(self, model: nn.Module) -> list[nn.Parameter]:
        from rankbench_plugins.tasks._networks import PretrainedImageClassifier

        if not self.params.train_head:
            return []
        return list((model.head() if isinstance(model, PretrainedImageClassifier) else model.head).parameters())

    def training_loss(self, ctx, model: nn.Module) -> torch.Tensor:
        """Cross-entropy on the next minibatch of the target's training split, drawn by a generator seeded per cell
        (so SubLoRA's derivatives, which also call this, are minibatch estimates)."""
        import torch
        import torch.nn.functional as F

        ds, p = self.evaluated_dataset(ctx), self.params
        generator = ctx.memo(("vit_minibatches", ctx.cell_id),
                             lambda: torch.Generator().manual_seed(derived_seed(ctx.task_seed, "finetune", ctx.seed)))
        index = torch.randint(ds.train_x.shape[0], (p.batch_size,), generator=generator)
        x, y = ds.train_x[index].to(ctx.device), ds.train_y[index].to(ctx.device)
        with torch.enable_grad():
            return F.cross_entropy(model(x), y)


# these names live in _networks (torch) and stay importable from here, imported on first access
__getattr__ = lazy_attributes(__name__, "rankbench_plugins.tasks._networks", {"ViT"})


@hookimpl
def rankbench_register_tasks(register):
    register(ViTClassification)
