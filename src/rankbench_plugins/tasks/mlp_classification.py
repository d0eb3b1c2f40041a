"""Task ``mlp-classification``: a fully connected classifier trained from scratch, as in the rank-adaptive training
papers (Hawkins & Zhang, arXiv 1905.10478 and Hawkins, Liu & Zhang, SIMODS 2022: a 784-512-10 network on MNIST with
tensorized layers; Schotthöfer et al., NeurIPS 2022: DLRT's fully connected MNIST runs).

Network (``_networks.MLP``): the image flattened, then ``Linear(pixels, hidden[0])``, ReLU, ...,
``Linear(hidden[-1], classes)``; PyTorch's default initialisation from a seed derived from the task seed. Every Linear
is a site (``layers.0``, ``layers.1``, ...), the output layer included, as in DLRT's fully connected runs.

Problem kind ``training`` only (``rankbench.kinds.training``): Adam (``lr``; the Bayesian MNIST script's
optimiser and rate) for ``epochs`` epochs of minibatches of ``batch_size`` in an order seeded by task seed and
epoch, cross-entropy loss. The dense reference trains every weight; compression selectors of the same task compress
that dense network at the suite's ``param_ratio`` budgets. Data, metrics (``accuracy``, ``test_loss``,
``latency_ms``) and calibration batches as in ``vit-classification`` (``_image_classification``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from rankbench.api import PluginParams, hookimpl
from rankbench.kinds.training import TrainingSettings
from rankbench_plugins.tasks import _vision_data as data
from rankbench_plugins.tasks._image_classification import ImageClassificationTask

if TYPE_CHECKING:
    from torch import nn


class MLPParams(PluginParams):
    dataset: Literal["digits", "mnist", "fashion-mnist"] = "mnist"
    max_train: int | None = Field(None, ge=10, description="cap on training images (stratified subset)")
    max_test: int | None = Field(None, ge=10, description="cap on test images (stratified subset)")
    hidden: list[int] = Field([512], min_length=1, description="hidden layer widths")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    calib_samples: int = Field(256, ge=1, description="training images used as calibration data (compression)")
    latency_repeats: int = Field(5, ge=1)
    problem: Literal["training"] = "training"


class MLPClassification(ImageClassificationTask):
    name = "mlp-classification"
    version = "1"
    description = "Fully connected classifier trained from scratch on MNIST / Fashion-MNIST / digits"
    Params = MLPParams
    # device auto keeps it on the CPU: a few small dense layers at batch 64-128 are launch-bound on a GPU (a small
    # ViT, a larger model, trained 2.4-15x slower on an H200 than on 8 CPU threads); --device cuda still runs it there
    gpu_benefit = False

    @classmethod
    def conformance_params(cls) -> list[dict]:
        # training only (its compression cells compress the dense network trained here)
        return [{"dataset": "digits", "max_train": 200, "max_test": 100, "hidden": [16], "epochs": 2,
                 "batch_size": 64, "calib_samples": 64, "latency_repeats": 1}]

    def build_network(self, ds: data.ImageDataset) -> nn.Module:
        from rankbench_plugins.tasks._networks import MLP

        return MLP(ds.image_size**2, list(self.params.hidden), ds.num_classes)

    def target_sites(self, model: nn.Module) -> dict[str, nn.Linear]:
        return {f"layers.{i}": layer for i, layer in enumerate(model.layers)}

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(epochs=self.params.epochs, lr=self.params.lr, optimizer="adam")


@hookimpl
def rankbench_register_tasks(register):
    register(MLPClassification)
