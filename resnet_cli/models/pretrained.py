"""Starting weights for fine-tuning: torchvision's ImageNet weights or a file, and backbone freezing."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from resnet_cli.checkpoint import mismatch
from resnet_cli.errors import UserError, first_line
from resnet_cli.fileio import regular_file

HEAD = "fc"  # the classifier attribute every model shares (resnet_cli/optim.py reads the same name)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classifier's parameters: `model.head_parameters()` where a model defines it, else `model.fc`'s."""
    if hasattr(model, "head_parameters"):
        return list(model.head_parameters())
    return list(getattr(model, HEAD).parameters())


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Stop gradients everywhere but the classifier (the optimizer then skips the frozen parameters).

    BatchNorm running statistics still follow the new data in train mode, which is what a small
    fine-tuning set wants when its images differ from ImageNet's.
    """
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
    return model


def load_pretrained(model: nn.Module, name: str, pretrained: bool | str) -> nn.Module:
    """Load starting weights into `model` (built as `name`); the classifier is kept only if its shape fits.

    Args:
        pretrained: True for torchvision's ImageNet weights of the same variant, or the path of a
            state_dict file or of a resnet-cli checkpoint (a dict whose "model" entry is the state_dict).
    """
    if pretrained is True or str(pretrained).lower() == "true":
        state, source = torchvision_state_dict(name), f"torchvision's ImageNet weights for {name}"
    else:
        path = Path(str(pretrained)).expanduser()
        state, source = read_state_dict(path), str(path)
    _assign(model, state, source, name)
    return model


def torchvision_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights for `name` (downloaded once into the torch hub cache)."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"model.pretrained=true: torchvision ships no ImageNet weights for {name}; "
                        f"give model.pretrained the path of a state_dict instead")
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        # check_hash: the file name carries the SHA-256 prefix that torch.hub verifies after downloading.
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise UserError(f"model.pretrained=true: cannot get {weights.url} for {name} ({first_line(exc)}); "
                        f"download it into the torch hub cache or pass a file path") from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file: a bare state_dict or a resnet-cli checkpoint's "model" entry."""
    if not path.exists():
        raise UserError(f"model.pretrained: no such file {path}")
    regular_file(path, "model.pretrained file")  # a FIFO would block torch.load forever
    try:
        # weights_only=True: tensors and plain containers only; a pickled code payload is refused.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"model.pretrained: cannot read {path} as a PyTorch state_dict ({first_line(exc)})") from exc
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise UserError(f"model.pretrained: {path} holds no state_dict (a dict of tensors, or a checkpoint with 'model')")
    return data


def _assign(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    own = model.state_dict()
    head = f"{HEAD}."
    # A different class count gives a differently shaped classifier: keep the fresh one.
    state = {k: v for k, v in state.items()
             if not (k.startswith(head) and (k not in own or own[k].shape != v.shape))}
    # The fresh head may stay; older files lack BatchNorm's num_batches_tracked, which BatchNorm fills in itself.
    problems = mismatch(model, state, optional=lambda k: k.startswith(head) or k.endswith("num_batches_tracked"))
    if problems:
        hint = " (at <= 64 px stem=auto picks the CIFAR stem: set model.stem=imagenet)" if "shape" in problems else ""
        raise UserError(f"model.pretrained: {source} does not fit {name}: {problems}{hint}")
    model.load_state_dict(state, strict=False)
