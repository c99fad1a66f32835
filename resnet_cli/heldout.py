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
from typing import TYPE_CHECKING, Any

from resnet_cli import checkpoint, engine, metrics
from resnet_cli.runfolder import BEST

if TYPE_CHECKING:
    from resnet_cli.trainer import Trainer

log = logging.getLogger("resnet_cli")


def kept_model(trainer: "Trainer") -> tuple[Any, str] | None:
    """(a copy of the model with best.pt's weights as the tools choose them, which) or None without a best.pt."""
    from resnet_cli.inference import choose_weights

    path = trainer.run_dir / BEST
    if not path.is_file():
        return None
    ck = checkpoint.load(path, map_location=trainer.rt.device)
    chosen = choose_weights(ck, "auto", path)
    model = copy.deepcopy(trainer.parts.raw_model)
    model.load_state_dict(chosen.state)
    return model.eval(), chosen.name


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
    path = trainer.run_dir / BEST
    ck = checkpoint.load(path, map_location="cpu")
    ck["tta"] = tta
    checkpoint.atomic_save(ck, path)
