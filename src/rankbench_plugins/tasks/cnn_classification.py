"""Task ``cnn-classification``: a convolutional classifier trained from scratch -- the setting of the rank-adaptive
Tucker training paper (Zangrando et al., "Geometry-aware training of factorized layers in tensor Tucker format",
NeurIPS 2024) and of DLRT's LeNet5 runs (Schotthöfer et al., NeurIPS 2022).

Network (``network: lenet5``): LeCun's LeNet5 layer sizes -- conv 6@5x5, 2x2 max pool, conv 16@5x5, 2x2 max pool,
fc 120, fc 84, fc 10, ReLU after every conv and hidden fc. Padding as LeCun's setup: the 28x28 images are treated as
the 32x32 input of the original (the first conv has ``padding=2``, the second none), so the feature maps are
6@28x28 -> 6@14x14 -> 16@10x10 -> 16@5x5 and the first fc has 400 inputs. (DLRT's reference LeNet5 uses wider
layers, 20@5x5 / 50@5x5 / fc 500, unpadded; not this one.) Images of another side (``digits``: 8x8) are resized
bilinearly to 28x28 inside the network. PyTorch's default initialisation from a seed derived from the task seed.

Network (``network: lenet5-dlrt``): the LeNet5 of DLRT's reference code (COMPiLELab/DLRT-Net,
``models_folder/Lenet5.py``) -- conv 20@5x5, 2x2 max pool, conv 50@5x5, 2x2 max pool, fc 500, fc 10, ReLU after each
conv and the hidden fc, no padding (28 -> 24 -> 12 -> 8 -> 4: the first fc has 800 inputs). As in that code the output
layer is not low-rank: the sites are ``conv1``, ``conv2`` and ``fc1`` (the paper's published ranks are of these
three), and ``fc2`` trains with the task's optimiser.

Network (``network: vgg``): a small VGG-style network for 28x28 Fashion-MNIST (ours, no paper's exact layout): two
blocks of two 3x3 convs (``padding=1``, ReLU) and a 2x2 max pool, 32 then 64 channels (28 -> 14 -> 7), then fc 256
and fc 10 (``features.0``, ``features.1``, ``features.3``, ``features.4`` are the convs; ``classifier.0``,
``classifier.2`` the Linears).

Sites (``sites``): ``all`` -- the conv kernels (``conv1``, ``conv2``: 4-mode tensors out x in x kh x kw) and the
Linear layers (``fc1``, ``fc2``, ``fc3``); ``conv`` -- the kernels only; ``linear`` -- the Linear layers only. Trainers
take conv kernels in their own format: ``tdlrt`` as 4-mode Tucker tensors, ``dlrt`` as the out x in kh kw matrix of
the flattened filters (its reference code's ``Conv2d_lr``); a trainer without conv support needs ``sites: linear``. Every site a training cell does not replace trains with the
task's optimiser.

Problem kinds: ``training`` (``rankbench.kinds.training``: Adam at ``lr`` for ``epochs`` epochs of minibatches of
``batch_size`` in an order seeded by task seed and epoch, cross-entropy), and ``compression`` of the dense network
the reference cell trained. With conv kernels among the sites (``sites: all`` / ``conv``) the compression cells need
a format that factorises 4-mode kernels -- ``tucker`` (Tucker-2, Kim et al. 2016) or ``cp`` (Lebedev et al. 2015);
matrix factorizations (svd, ...) and tt / ttm need ``sites: linear``. Data, metrics (``accuracy``, ``test_loss``,
``latency_ms``) and calibration batches as in ``mlp-classification`` (``_image_classification``).

The networks (``LeNet5``, ``DLRTLeNet5``, ``SmallVGG``) are in ``_networks``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from rankbench.api import COMPRESSION, TRAINING, PluginParams, hookimpl
from rankbench.kinds.training import RankAdaptiveTrainer, TrainingSettings
from rankbench_plugins.tasks import _vision_data as data
from rankbench_plugins.tasks._image_classification import ImageClassificationTask

if TYPE_CHECKING:
    from torch import nn


class CNNParams(PluginParams):
    dataset: Literal["digits", "mnist", "fashion-mnist"] = Field(
        "mnist", description="digits (8x8, resized to 28x28 in the network), MNIST-5k or Fashion-MNIST 60k")
    max_train: int | None = Field(None, ge=10, description="cap on training images (stratified subset)")
    max_test: int | None = Field(None, ge=10, description="cap on test images (stratified subset)")
    network: Literal["lenet5", "lenet5-dlrt", "vgg"] = Field(
        "lenet5", description="the architecture: LeNet5 (LeCun's layer sizes), DLRT's reference LeNet5 (20@5x5, "
                              "50@5x5, fc 500; its output layer is no site) or a small VGG-style network")
    sites: Literal["all", "conv", "linear"] = Field(
        "all", description="which layers are sites: conv kernels and Linears, conv kernels only, Linears only "
                           "(compression of conv kernels: tucker / cp)")
    epochs: int = Field(10, ge=1, description="training epochs of every training cell")
    batch_size: int = Field(128, ge=1, description="minibatch size (training, evaluation, calibration)")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    calib_samples: int = Field(256, ge=1, description="training images used as calibration data (compression)")
    latency_repeats: int = Field(5, ge=1, description="forward passes timed for latency_ms")
    problem: Literal["training"] = Field(
        "training", description="the kind of the trainers' cells (the other selectors' cells compress the trained "
                                "dense network)")


class CNNClassification(ImageClassificationTask):
    name = "cnn-classification"
    version = "1"
    description = "Convolutional classifier (LeNet5, small VGG) trained from scratch on MNIST / Fashion-MNIST / digits"
    Params = CNNParams

    problem_kinds = frozenset({TRAINING, COMPRESSION})

    def skip(self, selector, factorization) -> str | None:
        if self.params.sites == "linear":
            return None
        if isinstance(selector, RankAdaptiveTrainer):
            if not selector.conv_sites:
                return (f"{selector.name} trains Linear sites only; with sites: {self.params.sites} the conv kernels "
                        "are sites too (use sites: linear)")
            return None
        if factorization is not None and not getattr(factorization, "conv_kernels", False):
            return (f"{factorization.name} does not factorise conv kernels; with sites: {self.params.sites} compress "
                    "with tucker or cp, or use sites: linear")
        return None

    @classmethod
    def conformance_params(cls) -> list[dict]:
        tiny = {"dataset": "digits", "max_train": 200, "max_test": 100, "epochs": 1, "batch_size": 64,
                "calib_samples": 64, "latency_repeats": 1}
        return [tiny, {**tiny, "sites": "linear"}]

    def build_network(self, ds: data.ImageDataset) -> nn.Module:
        from rankbench_plugins.tasks._networks import DLRTLeNet5, LeNet5, SmallVGG

        network = {"lenet5": LeNet5, "lenet5-dlrt": DLRTLeNet5, "vgg": SmallVGG}[self.params.network]
        return network(ds.image_size, ds.num_classes)

    def target_sites(self, model: nn.Module) -> dict[str, nn.Module]:
        from torch import nn

        kinds = {"all": (nn.Conv2d, nn.Linear), "conv": (nn.Conv2d,), "linear": (nn.Linear,)}[self.params.sites]
        dense = getattr(model, "dense_output", None)  # a layer the network's own protocol keeps dense
        return {name: module for name, module in model.named_modules() if isinstance(module, kinds) and name != dense}

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings(epochs=self.params.epochs, lr=self.params.lr, optimizer="adam")


@hookimpl
def rankbench_register_tasks(register):
    register(CNNClassification)
