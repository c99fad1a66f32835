"""Typed schemas for every config node (no torch import).

`TrainConfig` (the top level and its `trainer`) is named first in ``configs/train.yaml``'s
defaults list. Each dataset and model YAML names its own schema first in its defaults list
(``- /<name>_schema@_here_``): the keys shared by a whole family and their defaults live once
in a dataclass here, the YAML keeps only what is its own. So a misspelt key, a wrong type or an
invalid choice fails while Hydra composes the config, before any data is read, with one line
naming the key (and, for an enum, the allowed values). The ranges and the relations between
keys are checked right after, by resnet_cli/validate.py. The optimizer and scheduler groups
stay untyped: their keys are the constructor arguments of their ``_target_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Word(str, Enum):
    """An enum of plain words that builders read as the strings they are.

    Hydra hands a typed node's enum members to the builders as they are; str() and format() give
    the word itself here (a plain `str, Enum` gives 'Loader.memory' before Python 3.11's StrEnum),
    so builders compare, lower() and print them like any other string.
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Precision(Word):
    """Autocast precision; auto = bf16 where the device supports it, else fp16 on CUDA, else fp32."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Monitor(Word):
    """The validation metric that picks best.pt and drives early stopping and a metric-driven schedule.

    auto: val_balanced_acc when the training classes are imbalanced (resnet_cli.metrics.resolve_monitor),
    else val_acc.
    """

    auto, val_acc, val_loss = "auto", "val_acc", "val_loss"
    val_balanced_acc, val_macro_f1 = "val_balanced_acc", "val_macro_f1"

    @property
    def goal(self) -> str:
        """max when a better value is a higher one (every metric but the loss), else min."""
        return "min" if self is Monitor.val_loss else "max"


@dataclass
class TrainerConfig:
    """How to train: device, precision, loop options, checkpoints, resume."""

    epochs: int = 10
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    channels_last: str = "auto"  # auto | true | false
    num_threads: str = "auto"  # CPU compute threads: auto (cores minus loader workers, or OMP_NUM_THREADS) | N
    compile: bool = False  # torch.compile the model (opt-in: compile time dominates short runs)
    deterministic: bool = False  # deterministic algorithms; bitwise-repeatable runs on CPU
    grad_clip_value: float = 0.0  # clip each gradient element to +-value; 0 = off
    grad_clip_norm: float = 0.0  # clip the global L2 norm; 0 = off
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # weight EMA per optimizer step; 0 = off, e.g. 0.999
    precise_bn_images: int = 256  # before each validation, BN statistics from this many train images (<= 1/4); 0 = off
    warmup_epochs: float = 0.0  # linear warm-up before an epoch/step schedule (not OneCycle)
    weight_decay_norm_bias: bool = True  # false = no weight decay on norm weights and biases
    backbone_lr_scale: float = 1.0  # lr multiplier for everything but the classifier (fine-tuning)
    monitor: Monitor = Monitor.auto
    early_stop_patience: int = 0  # epochs without improvement before stopping; 0 = off
    log_every_n_steps: int = 20  # the only steps that synchronise host and device
    progress_every_n_steps: int = 0  # without a progress bar: a log line every N steps; 0 = about 10 per epoch
    checkpoint_every_n_steps: int = 0  # mid-epoch checkpoints; 0 = at epoch ends only
    save_top_k: int = 0  # keep the k best epochs as topk/*.pt besides best.pt; 0 = off
    resume: Optional[str] = None  # null | auto | path to a checkpoint or run folder
    overwrite: bool = False  # true: a new run may replace the run already in hydra.run.dir
    max_bad_steps: int = 0  # skip up to N steps with a non-finite loss; 0 = stop at the first
    limit_train_batches: int = 0  # batches per epoch; 0 = all (for smoke tests)
    limit_val_batches: int = 0
    sync_batchnorm: bool = False  # SyncBatchNorm under torchrun
    log_graph: bool = False  # write the model graph to TensorBoard
    progress: str = "auto"  # auto (a bar on a terminal, else log lines) | true (bar) | lines | false
    dry_run: bool = False  # build data and model, print the plan, do not train


@dataclass
class TrainConfig:
    """The composed run: one node per config group plus run-level keys."""

    model: Any = MISSING
    dataset: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_root: str = "outputs"  # where run folders go; trainer.resume=auto searches here
    name: str = "resnet"  # a label for the run (TensorBoard hparams, sweep summaries)


class Loader(Word):
    """How batches are made: auto | memory (uint8 tensor on the device) | dataloader (per-image workers)."""

    auto, memory, dataloader = "auto", "memory", "dataloader"


class Crop(Word):
    """The training crop: auto (pad up to 64 px, resized above) | pad | resized."""

    auto, pad, resized = "auto", "pad", "resized"


class PadMode(Word):
    """How crop=pad fills the border."""

    reflect, constant, edge = "reflect", "constant", "edge"


class AugmentPreset(Word):
    """The augmentation presets (resnet_cli.data.transforms.PRESETS); dataset.augment joins them with '+'."""

    none, standard = "none", "standard"  # the geometry only (crop + flip): what the memory loader offers
    trivialaugment, randaugment, autoaugment = "trivialaugment", "randaugment", "autoaugment"
    colorjitter, randomerasing = "colorjitter", "randomerasing"


class Flip(Word):
    """dataset.flip: auto (on unless the training images say the classes are not mirror-symmetric) | true | false.

    The key itself is typed `str`: a Word enum node refuses the bool that `dataset.flip=false` parses to,
    so validate.py checks the word against this enum's values.
    """

    auto, true, false = "auto", "true", "false"


class Balance(Word):
    """Imbalanced classes: auto (sampler at 3:1 or more uneven, else off) | off | sampler | loss (weighted)."""

    auto, off, sampler, loss = "auto", "off", "sampler", "loss"


class OnBadImage(Word):
    """An unreadable image: error (stop, naming the file) | skip (log, count, go on)."""

    error, skip = "error", "skip"


class CifarLabels(Word):
    """CIFAR-100's labels: fine (100 classes) | coarse (the 20 superclasses)."""

    fine, coarse = "fine", "coarse"


class HeldOutSplit(Word):
    """Oxford 102 Flowers' split evaluated each epoch."""

    val, test = "val", "test"


@dataclass
class IdxMd5:
    """md5 of each gzip'd idx file a download fetches; null: torchvision's pinned value (<Class>.resources)."""

    train_images: Optional[str] = None  # train-images-idx3-ubyte.gz
    train_labels: Optional[str] = None  # train-labels-idx1-ubyte.gz
    test_images: Optional[str] = None  # t10k-images-idx3-ubyte.gz
    test_labels: Optional[str] = None  # t10k-labels-idx1-ubyte.gz


# true | false, left untyped on purpose: OmegaConf's bool node would turn `yes`, `on` or 1 into true,
# and the dataset's switches have always refused those (validate.py's Bool rule checks them).
StrictBool = Any
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DatasetConfig:
    """The loader keys every dataset takes (resnet_cli.data.pipeline.make_bundle), with their shared defaults.

    The defaults are those of a folder of your own images; a dataset's YAML sets only what differs.
    """

    _target_: str = MISSING  # the builder, resnet_cli.data.<name>
    _partial_: bool = True  # the runner adds device, seed, rank and world_size
    image_size: Union[int, str] = "auto"  # pixels | auto: the images' median short side, at most auto_max_size
    # eval: shorter side resized to this, then the centre crop; auto: image_size (crop=pad), image_size/0.875 (resized)
    resize: Optional[Union[int, str]] = "auto"
    crop: Crop = Crop.auto  # auto: pad up to 64 px, resized above | pad: pad + random crop | resized: RandomResizedCrop
    pad: Union[int, str] = "auto"  # crop=pad: pixels of padding; auto: image_size/8 (4 at 32 px)
    pad_mode: PadMode = PadMode.reflect
    scale: List[float] = field(default_factory=lambda: [0.5, 1.0])  # crop=resized: area range of the random box
    batch_size: Union[int, str] = "auto"  # auto: 64, halved (down to 16) until an epoch has at least 16 steps
    val_batch_size: Optional[int] = 256  # null: batch_size
    num_workers: Union[int, str] = "auto"  # loader=dataloader only; auto: one per core beyond the first
    loader: Loader = Loader.auto  # auto: memory when the decoded uint8 cache fits memory_budget, else dataloader
    memory_budget: float = 0.25  # loader=auto: the fraction of RAM (or GPU memory) the uint8 cache may take
    augment: str = "standard"  # AugmentPreset names joined by '+'; the memory loader offers none and standard
    # random horizontal flip: auto = on unless mirrored train images are classified worse (docs/DATA.md) | true | false
    flip: str = "auto"
    vflip: StrictBool = False  # random vertical flip (aerial, microscope images); never chosen by auto
    cutout: int = 0  # side of a cutout square in pixels; 0 = off
    mixup_alpha: float = 0.0  # 0 = off; > 0 gives soft targets [N, C]
    cutmix_alpha: float = 0.0
    # three numbers | auto (image folders: computed once on the train split, cached in the manifest)
    mean: Any = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: Any = field(default_factory=lambda: list(IMAGENET_STD))
    drop_last: StrictBool = True  # train only; validation never drops samples
    # auto: at 3:1 or more uneven training classes, draw each class equally often (docs/DATA.md), else off |
    # off | sampler (draws with replacement in inverse proportion to the class sizes) | loss (class-weighted)
    balance: Balance = Balance.auto


@dataclass
class ArrayDataset(DatasetConfig):
    """Datasets held as 32-px uint8 arrays (CIFAR, shapes): trained in memory at their native size."""

    image_size: Union[int, str] = 32
    crop: Crop = Crop.pad
    batch_size: Union[int, str] = 128
    val_batch_size: Optional[int] = 512
    loader: Loader = Loader.memory


@dataclass
class ShapesDataset(ArrayDataset):
    """dataset=shapes: the embedded procedural images (resnet_cli.data.shapes)."""

    num_train: int = 5000
    num_val: int = 1000


@dataclass
class Cifar10Dataset(ArrayDataset):
    """dataset=cifar10: the official python-format archive (resnet_cli.data.cifar10)."""

    root: str = MISSING
    download: StrictBool = True
    url: str = MISSING
    md5: Optional[str] = None  # a download needs a pinned md5, otherwise it is refused


@dataclass
class Cifar100Dataset(Cifar10Dataset):
    """dataset=cifar100: CIFAR-10's format with fine or coarse labels (resnet_cli.data.cifar100)."""

    labels: CifarLabels = CifarLabels.fine


@dataclass
class MnistDataset(ArrayDataset):
    """dataset=mnist: the four idx files (train 60k / test 10k), read by torchvision's readers (resnet_cli.data.mnist).

    root holds them directly (gzip'd or not: Debian's /usr/share/datasets layout) or in torchvision's
    <root>/<Class>/raw/; a download (torchvision's mirrors and md5s unless overridden) goes to the latter.
    """

    image_size: Union[int, str] = 28
    channels: int = 1  # the idx images are grayscale; the model's first conv follows (model.in_channels)
    root: str = MISSING
    download: StrictBool = True
    mirrors: Optional[List[str]] = None  # URL prefixes tried in order; null: torchvision's <Class>.mirrors
    md5s: IdxMd5 = field(default_factory=IdxMd5)
    num_train: Optional[int] = None  # the first N training images; null: all
    num_val: Optional[int] = None  # the first N of the official test set (the split evaluated each epoch); null: all


@dataclass
class FashionMnistDataset(MnistDataset):
    """dataset=fashion_mnist: Zalando's Fashion-MNIST in MNIST's format (resnet_cli.data.fashion_mnist)."""


@dataclass
class KmnistDataset(MnistDataset):
    """dataset=kmnist: Kuzushiji-MNIST, cursive Japanese in MNIST's format (resnet_cli.data.kmnist)."""


@dataclass
class FolderDataset(DatasetConfig):
    """Keys of every class-folder dataset (resnet_cli.data.imagefolder.files_bundle): bad files, the decoded cache."""

    root: Optional[str] = None
    auto_max_size: int = 224  # image_size=auto: the largest side chosen
    cache_size: Optional[int] = None  # memory loader only: the cached side in pixels; null = what the geometry needs
    on_bad_image: OnBadImage = OnBadImage.error
    max_bad_images: int = 0  # skip mode: stop once more than this many files were bad
    verify_images: StrictBool = False  # true: fully decode every image at start-up (else only headers are read)


@dataclass
class ImageFolderDataset(FolderDataset):
    """dataset=imagefolder: your own class folders under root (resnet_cli.data.imagefolder)."""

    val_fraction: float = 0.1  # used only when root has no val/ folder; stratified per class
    split_seed: int = 0  # the split's own seed (independent of trainer.seed)


@dataclass
class FlowersDataset(ImageFolderDataset):
    """dataset=flowers: TensorFlow's flower_photos, downloaded, then split once (resnet_cli.data.flowers)."""

    download: StrictBool = True
    url: str = MISSING
    sha256: Optional[str] = None  # a download needs a pinned checksum, otherwise it is refused


@dataclass
class Flowers102Dataset(FolderDataset):
    """dataset=flowers102: Oxford 102 Flowers with its official splits (resnet_cli.data.flowers102)."""

    download: StrictBool = True
    url_prefix: str = MISSING
    val_split: HeldOutSplit = HeldOutSplit.val


class Stem(Word):
    """The first layers: auto (cifar when image_size <= 64) | imagenet (7x7/2 conv + max-pool) | cifar (3x3/1)."""

    auto, imagenet, cifar = "auto", "imagenet", "cifar"


class Shortcut(Word):
    """A shape-changing block's shortcut: projection (B) | pad (A) | avg (ResNet-D) | none (plain net)."""

    projection, pad, avg, none = "projection", "pad", "avg", "none"


class Attention(Word):
    """Channel attention on each residual branch (null: none)."""

    se = "se"


class Head(Word):
    """The classifier: linear (one fc) | mlp (dropout, head_hidden ReLU units, dropout, fc)."""

    linear, mlp = "linear", "mlp"


@dataclass
class ModelConfig:
    """The keys every model takes (resnet_cli.models.create_model and every builder), with their defaults."""

    _target_: str = "resnet_cli.models.create_model"
    _partial_: bool = True  # the runner adds num_classes
    name: str = MISSING  # a registered model (resnet-models lists them)
    image_size: Any = "${dataset.image_size}"  # replaced by the resolved training size before the build
    # the images' channels: a dataset node that declares `channels` (mnist: 1) sets it, every other one gives 3
    in_channels: int = "${oc.select:dataset.channels,3}"  # type: ignore[assignment]
    drop_rate: float = 0.0  # dropout before the classifier fc
    pretrained: Any = False  # false | true: torchvision's ImageNet weights (where it ships them) | a weights file
    freeze_backbone: bool = False  # train only fc (fine-tuning)
    head: Head = Head.linear
    head_hidden: int = 1024  # units of the mlp head's hidden layer
    head_dropout: float = 0.5  # dropout of the mlp head (before and after the hidden layer)


@dataclass
class ResNet9Model(ModelConfig):
    """resnet9 (resnet_cli.models.small.ResNet9)."""

    zero_init_residual: bool = False  # start every residual branch at zero (identity blocks)


@dataclass
class AttentionModel(ModelConfig):
    """The Residual Attention nets (resnet_cli.models.attention.ResidualAttentionNet)."""

    stem: Stem = Stem.auto


@dataclass
class CifarResNetModel(ResNet9Model):
    """The CIFAR nets of the papers on the one ResNet trunk (resnet_cli.models.cifar): the stem is always cifar."""

    attn: Optional[Attention] = None
    shortcut: Shortcut = Shortcut.projection
    shortcut_kernel: int = 1  # kernel of a projection shortcut (odd; the R1 tutorial used 3)


@dataclass
class CifarBottleneckModel(CifarResNetModel):
    """CIFAR nets of bottleneck blocks, which also take ResNeXt's grouped 3x3 conv."""

    groups: int = 1  # cardinality of the grouped 3x3 conv (ResNeXt)
    width_per_group: int = 64  # bottleneck width per group; 128 with groups=1 gives the wide ResNets


@dataclass
class ResNetModel(CifarResNetModel):
    """The ImageNet-style nets of basic blocks on the ResNet trunk (resnet_cli.models.resnet.ResNet)."""

    stem: Stem = Stem.auto
    deep_stem: bool = False  # three 3x3 convs instead of the ImageNet stem's 7x7 one (ResNet-C)


@dataclass
class BottleneckModel(ResNetModel):
    """The ImageNet-style nets of bottleneck blocks (ResNet-50 and deeper, ResNeXt, wide, SE, ResNeSt)."""

    groups: int = 1  # cardinality of the grouped 3x3 conv (ResNeXt)
    width_per_group: int = 64  # bottleneck width per group; 128 with groups=1 gives the wide ResNets


# ConfigStore name -> schema; a dataset or model YAML names one first in its defaults list (`- /<name>@_here_`).
SCHEMAS: dict[str, type] = {
    "cifar10_schema": Cifar10Dataset,
    "cifar100_schema": Cifar100Dataset,
    "shapes_schema": ShapesDataset,
    "mnist_schema": MnistDataset,
    "fashion_mnist_schema": FashionMnistDataset,
    "kmnist_schema": KmnistDataset,
    "imagefolder_schema": ImageFolderDataset,
    "flowers_schema": FlowersDataset,
    "flowers102_schema": Flowers102Dataset,
    "model_schema": ModelConfig,
    "resnet9_schema": ResNet9Model,
    "attention_schema": AttentionModel,
    "cifar_resnet_schema": CifarResNetModel,
    "cifar_bottleneck_schema": CifarBottleneckModel,
    "resnet_schema": ResNetModel,
    "bottleneck_schema": BottleneckModel,
}
# A dataset builder -> its schema: the keys a node without a schema (a YAML of your own, a checkpoint's
# config) is checked against.
DATASET_SCHEMAS: dict[str, type] = {
    f"resnet_cli.data.{name.removesuffix('_schema')}": schema
    for name, schema in SCHEMAS.items() if issubclass(schema, DatasetConfig)
}


# Overrides that say where or how a run is watched, not what it trains: left out of run folder names.
UNLABELLED = {"output_root", "trainer.device", "trainer.progress", "trainer.progress_every_n_steps",
               "trainer.log_every_n_steps", "trainer.resume", "trainer.num_threads", "trainer.dry_run",
               "trainer.checkpoint_every_n_steps", "dataset.root", "dataset.url", "dataset.md5", "dataset.sha256",
               "dataset.num_workers", "dataset.download"}
LABEL_MAX = 80  # characters of a run folder's label (file names stop at 255 bytes)


def run_label(name: Any, overrides: Any) -> str:
    """'_<name>,<key overrides>' for a run folder name (so TensorBoard's legend tells runs apart), or ''.

    The overrides keep their command-line order (what a sweep varies is usually typed first); those
    of paths and of how the run is watched are left out, characters unsafe in a folder name are replaced, and the
    label keeps the whole items that fit in LABEL_MAX characters.
    """
    items = []
    for item in list(overrides or ()):
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key in UNLABELLED or key.startswith("hydra") or "/" in value or "\\" in value:
            continue
        if key == "name" or (key == "experiment" and value == str(name)):
            continue  # the name leads the label already
        items.append(f"{key}={value}")
    parts = ([] if str(name) in ("", "default") else [str(name)]) + items
    label = ",".join(parts)
    label = "".join(c if c.isalnum() or c in "=,.-+_" else "_" for c in label)
    if len(label) > LABEL_MAX:  # whole items only, as many as fit
        cut = label.rfind(",", 0, LABEL_MAX + 1)
        label = label[:cut] if cut > 0 else label[:LABEL_MAX]
    return f"_{label}" if label else ""


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore and the run_label resolver (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, schema in SCHEMAS.items():
        cs.store(name=name, node=schema)
    if not OmegaConf.has_resolver("run_label"):
        OmegaConf.register_new_resolver("run_label", run_label)


register_configs()
