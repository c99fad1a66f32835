"""What a finished run measures once, with the weights it kept: flip test-time augmentation, the held-out test split.

The kept weights are best.pt's, as the tools use them (the EMA average when the run kept one).
Flip TTA (each image's logits averaged with its mirror's) is measured on val only where mirroring
keeps the class (dataset.flip resolved on); the decision is written into best.pt, so resnet-predict,
-eval and -export use it (`--tta auto`) only where it helped. A `test/` split is evaluated once,
after every choice was made on val, with the same weights and TTA the tools would use; for datasets
whose validation split is their official test set (CIFAR, MNIST), the test numbers are the final
epoch's, so no epoch is picked on the data they report.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from resnet_cli import checkpoint, engine, metrics
from resnet_cli.fileio import atomic_link
from resnet_cli.runfolder import BEST, LAST

if TYPE_CHECKING:
    from resnet_cli.trainer import Trainer

log = logging.getLogger("resnet_cli")


def kept_model(trainer: "Trainer") -> tuple[Any, str] | None:
    """(a copy of the model with best.pt's weights as the tools choose them, which) or None without a best.pt.

    Under torchrun only rank 0 reads best.pt (it wrote it; other nodes may not share its disk) and
    broadcasts the weights, so every rank evaluates the same model or, with no best.pt, none does.
    """
    from resnet_cli.inference import choose_weights

    rt = trainer.rt
    chosen = None
    if rt.is_main:
        path = trainer.run_dir / BEST
        if path.is_file():
            chosen = choose_weights(checkpoint.load(path, map_location=rt.device), "auto", path)
    which = [chosen.name if chosen is not None else None]
    if rt.distributed:
        dist.broadcast_object_list(which, src=0)
    if which[0] is None:
        return None
    model = copy.deepcopy(trainer.parts.raw_model)
    if chosen is not None:
        model.load_state_dict(chosen.state)
    if rt.distributed:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    return model.eval(), which[0]


def measure(trainer: "Trainer") -> dict:
    """Flip TTA and the test split for a finished run (every rank: evaluation is a collective); rank 0 records it.

    Returns {"tta": ..., "test": ...} (either may be absent) for metrics.json.
    """
    from resnet_cli.inference import flip_average

    data, rt, names = trainer.data, trainer.rt, trainer.class_names
    kept = kept_model(trainer)
    if kept is None:
        return {}
    model, which = kept
    found: dict[str, Any] = {}
    use_tta = False
    if data.mirror_ok is not None:
        tta: dict[str, Any] = {"mirror": bool(data.mirror_ok), "flip": False, "weights": which}
        if data.mirror_ok:
            plain = _evaluate(model, data.val, rt, names)
            flipped = _evaluate(flip_average(model), data.val, rt, names)
            use_tta = flipped["acc"] > plain["acc"]  # a gain of at least one image, or it costs a second forward
            tta.update(flip=use_tta, val_acc=plain["acc"], val_acc_flip=flipped["acc"])
        found["tta"] = tta
        if rt.is_main:
            _record_tta(trainer, tta)
    if data.test is not None:
        net = flip_average(model) if use_tta else model
        result = _evaluate(net, data.test, rt, names)
        found["test"] = {"acc": result["acc"], "loss": result["loss"],
                         "balanced_acc": result["classes"]["balanced_accuracy"],
                         "macro_f1": result["classes"]["macro_f1"], "per_class": result["classes"]["per_class"],
                         "weights": f"best.pt ({which}{', flip TTA' if use_tta else ''})"}
    elif data.val_is_test and trainer.progress.history:
        last = trainer.progress.history[-1]
        found["test"] = {"acc": last["val_acc"], "loss": last["val_loss"],
                         "balanced_acc": last["val_balanced_acc"], "macro_f1": last["val_macro_f1"],
                         "weights": "final epoch (the validation split is the official test set: none picked on it)"}
    return found


def _evaluate(model: Any, source: Any, rt: Any, names: list[str]) -> dict:
    out = engine.gather_samples(engine.evaluate(model, source.iter_from(0), rt, num_classes=len(names),
                                                collect=True), rt)
    out["classes"] = metrics.classification(out["pred"], out["target"], names)
    return out


def _record_tta(trainer: "Trainer", tta: dict) -> None:
    # Into best.pt (the weights it was measured with), so a checkpoint sent on alone carries the decision.
    # Where best.pt is a second name for last.pt (the best epoch was the last), both names keep one file.
    path, last = trainer.run_dir / BEST, trainer.run_dir / LAST
    shared = last.is_file() and os.path.samefile(path, last)
    ck = checkpoint.load(path, map_location="cpu")
    ck["tta"] = tta
    checkpoint.atomic_save(ck, path)
    if shared:
        try:
            atomic_link(path, last)
        except OSError:  # no hard links here: last.pt keeps its own (equal but for "tta") bytes
            pass
