"""The workloads the cases train: SimpleCNN on CIFAR-format files and Linear 784->10 on MNIST-format files,
written in the real on-disk formats so the runner's own readers run; and (with --full or --only timm) timm's
ResNet-18 on the CIFAR files, a model of the field beside the built-in CNN."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    data: str                  # the runner's data.name; also the preset the runner starts from
    model: str                 # the runner's model.name
    model_kwargs: str          # the runner's model.kwargs
    shape: tuple[int, int, int]
    batch: int                 # per process
    lr: float
    momentum: float
    train_size: int
    warmup_steps: int          # steps left out of the steady-state timing
    guess_img_per_s: float     # per process at one thread, to size the first round's runs

    def write_files(self, root: Path) -> Path:
        from tests.sample_files import write_cifar10, write_mnist

        folder = root / self.name
        if self.data == "mnist":
            write_mnist(folder, n_train=self.train_size, n_test=256)
        else:
            write_cifar10(folder, per_batch=self.train_size // 5, n_test=256)
        return folder

    def load_train_split(self, folder: Path):
        """The training split through the runner's own readers: uint8 images and labels."""
        from runner.data.datasets import load_cifar10, load_mnist_family

        if self.data == "mnist":
            return load_mnist_family("mnist", folder, download=False, train=True)[0]
        return load_cifar10(folder, download=False, train=True)[0]

    def load_normalised(self, folder: Path):
        """The training split as float32 tensors in memory, normalised as the runner does."""
        import torch

        from runner.data.datasets import NORMALISATION

        split = self.load_train_split(folder)
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALISATION[self.data])
        return (split.images.float() / 255 - mean) / std, split.labels

    def make_model(self):
        import torch

        from models.cnn import SimpleCNN
        from models.linear import LinearClassifier
        from runner.model import create_model

        torch.manual_seed(0)
        if self.model.startswith("timm:"):  # built as the runner builds it
            return create_model(self.model, {}, self.shape, 10)
        return LinearClassifier(self.shape) if self.model == "linear" else SimpleCNN(self.shape)

    def make_optimizer(self, params):
        import torch

        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def runner_args(self, folder: Path, processes: int) -> list[str]:
        """train.py's config for this workload, with augmentation, schedule and weight decay off so the
        runner does the same arithmetic as the hand-written loops, and `batch` per process as theirs."""
        return [f"--config={self.data}", f"data.root={folder}", f"model.name={self.model}",
                f"model.kwargs={self.model_kwargs}", f"optim.lr={self.lr}", f"optim.momentum={self.momentum}",
                "optim.weight_decay=0", "schedule.name=constant", f"train.micro_batch_size={self.batch}",
                f"train.global_batch_size={self.batch * processes}",
                "data.crop_padding=0", "data.flip=false"]


WORKLOADS = {
    "cnn": Workload("cnn", "SimpleCNN, batch 64 (CIFAR files)", "cifar10", "simple_cnn", "{}", (3, 32, 32),
                    batch=64, lr=0.01, momentum=0.9, train_size=5000, warmup_steps=5, guess_img_per_s=1000),
    "linear": Workload("linear", "Linear 784->10, batch 32 (MNIST files)", "mnist", "linear", "{in_features: 784}",
                       (1, 28, 28), batch=32, lr=0.01, momentum=0.0, train_size=20000, warmup_steps=50,
                       guess_img_per_s=30000),
    "timm": Workload("timm", "timm:resnet18 at 32x32, batch 64 (CIFAR files)", "cifar10", "timm:resnet18", "{}",
                     (3, 32, 32), batch=64, lr=0.01, momentum=0.9, train_size=5000, warmup_steps=3,
                     guess_img_per_s=150),
}
DEFAULT = ("cnn", "linear")  # `make bench`; --full adds the rest
