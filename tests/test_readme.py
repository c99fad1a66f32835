"""Every command and printed example in README.md's fenced blocks is run here, run by a named test, or marked.

A block is run here unless an HTML comment right above it says otherwise:

    <!-- readme-test: not run[ for "PREFIX"]: why -->          (a GPU, a cluster, a server, a benchmark)
    <!-- readme-test: run by PATH[::TEST][ for "PREFIX"][: note] -->

`for "PREFIX"` limits a marker to the block's commands that start with PREFIX. Everything else
must have an entry in CASES below, keyed by the command exactly as the README writes it (a
`console` block's shown output is compared line for line), so an edited example fails here until
it runs again. The training examples run in this process through the console scripts' own entry
functions (pyproject's [project.scripts]) on the embedded `shapes` data with tiny overrides; the
tools share one tiny run trained by the README's own `resnet-train`.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, logging_restored

README = REPO / "README.md"
MARKER = re.compile(r'^\s*<!-- readme-test: (not run|run by (\S+?))(?: for "([^"]+)")?(?:: (.*?))? -->\s*$')
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@dataclass
class Marker:
    """A readme-test comment: `by` is None for `not run`."""

    by: str | None
    prefix: str | None
    note: str

    def covers(self, text: str) -> bool:
        """Whether this marker applies to the example `text` of its block."""
        return self.prefix is None or text.startswith(self.prefix)


@dataclass
class Example:
    """One command (continuation lines joined, its trailing comment apart), or a whole non-shell block."""

    text: str
    comment: str = ""
    output: list[str] = field(default_factory=list)  # a console block's lines after the command
    body: str = ""  # a non-shell block's whole text
    line: int = 0
    markers: list[Marker] = field(default_factory=list)

    @property
    def marker(self) -> Marker | None:
        """The marker that takes this example out of this module, if any."""
        return next((m for m in self.markers if m.covers(self.text)), None)


def _split_comment(line: str) -> tuple[str, str]:
    match = re.search(r"\s+#\s", line)
    return (line[:match.start()].rstrip(), line[match.end():].strip()) if match else (line.rstrip(), "")


def readme_examples(text: str) -> list[Example]:
    """Every example of every fenced block, in README order."""
    lines = text.splitlines()
    examples: list[Example] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        markers, k = [], i - 1
        while k >= 0 and (m := MARKER.match(lines[k])):
            markers.insert(0, Marker(m.group(2), m.group(3), m.group(4) or ""))
            k -= 1
        indent, lang = len(fence.group(1)), fence.group(2)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = [ln[indent:] for ln in lines[i + 1:end]]
        if lang in ("sh", "console"):
            pending = ""
            for n, raw in enumerate(body):
                stripped = raw.strip()
                if not stripped or (stripped.startswith("#") and not pending):
                    continue  # a comment line explains the command above
                if lang == "console" and not stripped.startswith("$ "):
                    examples[-1].output.append(raw)
                    continue
                command = stripped[2:] if lang == "console" else stripped
                if command.endswith("\\"):
                    pending += command[:-1].rstrip() + " "
                    continue
                command, comment = _split_comment(pending + command)
                pending = ""
                examples.append(Example(command, comment, line=i + 2 + n, markers=markers))
        else:
            examples.append(Example(body[0].strip(), body="\n".join(body), line=i + 2, markers=markers))
        i = end + 1
    return examples


EXAMPLES = readme_examples(README.read_text())

# --- running the console scripts in this process ------------------------------------------------------------------

def _console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: name -> "module:function" (read by hand: tomllib is Python 3.11+)."""
    table = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', table, re.M))


SCRIPTS = _console_scripts()


@dataclass
class Result:
    """What a command did: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


def run_script(argv: list[str], cwd: Path) -> Result:
    """Run a console script's entry function (as its installed wrapper does) in cwd, capturing its output."""
    module, _, attr = SCRIPTS[argv[0]].partition(":")
    entry = getattr(importlib.import_module(module), attr)
    out, err = io.StringIO(), io.StringIO()
    environ, saved_argv, saved_cwd, code = dict(os.environ), sys.argv, os.getcwd(), 0
    sys.argv = list(argv)
    os.chdir(cwd)
    try:
        with logging_restored(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(environ)  # resnet-train sets HYDRA_FULL_ERROR for its own process
    return Result(code, out.getvalue(), err.getvalue())


# Tiny data for every training example; a key the example sets itself keeps the example's value.
TINY = {"dataset": "shapes", "dataset.num_train": "200", "dataset.num_val": "100", "dataset.image_size": "16",
        "dataset.batch_size": "50", "dataset.val_batch_size": "100", "model": "resnet20", "trainer.epochs": "1",
        "trainer.device": "cpu", "trainer.progress": "false", "trainer.limit_train_batches": "2",
        "trainer.limit_val_batches": "1"}


class Workspace:
    """A scratch folder, the README's files in it, and the commands run there."""

    def __init__(self, root: Path):
        self.root = root
        self.n = 0

    def sh(self, command: str, *, replace: dict[str, str] | None = None, tiny: bool = True,
           keep: tuple[str, ...] = (), expect: int = 0) -> tuple[Result, Path]:
        """Run a README command in a folder of its own: `replace` swaps whole words, `tiny` adds TINY's
        keys the command does not set (all but `keep`); returns the result and the folder."""
        argv = [(replace or {}).get(word, word) for word in shlex.split(command)]
        argv = [word.replace("outputs/<run>", str(self.trained)) for word in argv] if "<run>" in command else argv
        if tiny and argv[0] in ("resnet-train", "resnet-lr-find"):
            given = {word.partition("=")[0] for word in argv if "=" in word}
            argv += [f"{k}={v}" for k, v in TINY.items() if k not in given and k not in keep]
        self.n += 1
        cwd = self.root / f"cmd{self.n}"
        cwd.mkdir()
        for name in ("photo.jpg", "photos", "class_indices.json"):
            if (self.root / name).exists():
                (cwd / name).symlink_to(self.root / name)
        result = run_script(argv, cwd)
        assert result.code == expect, f"{' '.join(argv)} exited {result.code}:\n{result.out[-3000:]}\n{result.err[-3000:]}"
        return result, cwd

    trained: Path


def run_folders(root: Path) -> list[Path]:
    """Every run folder (one holding metrics.json) under root, sorted."""
    return sorted(p.parent for p in root.rglob("metrics.json"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """One tiny run trained by the README's own command, with EMA (the tools' examples use it), and the images."""
    from torchvision.transforms.v2.functional import to_pil_image

    from resnet_cli.data.synthetic import CLASS_NAMES, generate_shapes

    ws = Workspace(tmp_path_factory.mktemp("readme"))
    _, cwd = ws.sh("resnet-train trainer.epochs=2 trainer.ema_decay=0.9", keep=("trainer.limit_train_batches",))
    (ws.trained,) = run_folders(cwd / "outputs")
    split = generate_shapes(100, 16, 1)  # the val split's images, as the embedded dataset draws them
    (ws.root / "photos").mkdir()
    for i in range(6):
        to_pil_image(split.images[i]).save(ws.root / "photos" / f"img{i}.png")
    to_pil_image(split.images[6]).save(ws.root / "photo.jpg", quality=95)
    (ws.root / "class_indices.json").write_text(json.dumps({str(i): n for i, n in enumerate(CLASS_NAMES)}))
    # A folder of the user's own photos: one folder per class (split 90/10 by resnet-train), 12 images each.
    folder = ws.root / "my_photos"
    labels = split.labels.tolist()
    for c, name in enumerate(CLASS_NAMES):
        (folder / name).mkdir(parents=True)
        for j in [i for i, label in enumerate(labels) if label == c][:12]:
            to_pil_image(split.images[j]).save(folder / name / f"{j}.png")
    return ws


# --- the examples: README text -> how this module runs and checks it ---------------------------------------------

def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _config(run: Path) -> str:
    return (run / ".hydra" / "config.yaml").read_text()


def sweep_four(ws: Workspace, ex: Example) -> None:
    result, cwd = ws.sh(ex.text)
    runs = run_folders(cwd / "outputs")
    assert len(runs) == 4, runs  # "four runs, four folders"
    # outputs/multirun/<date>/<time>/<job number>_<overrides>/, as "What a run leaves" says
    for n, run in enumerate(runs):
        rel = run.relative_to(cwd).as_posix()
        assert re.fullmatch(rf"outputs/multirun/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d/{n}_optimizer=\w+,scheduler=\w+(,.*)?",
                            rel), rel
    swept = {tuple(re.findall(r"(optimizer|scheduler)=(\w+)", run.name)) for run in runs}
    assert len(swept) == 4
    assert "sweep summary:" in result.out + result.err


def degradation(ws: Workspace, ex: Example) -> None:
    # CIFAR-10 is a download: the same four nets on the embedded data.
    _, cwd = ws.sh(ex.text, replace={"dataset=cifar10": "dataset=shapes"})
    runs = run_folders(cwd / "outputs")
    assert [re.search(r"model=(\w+)", r.name)[1] for r in runs] == ["plain20", "plain56", "resnet20", "resnet56"]


def overrides_30_epochs(ws: Workspace, ex: Example) -> None:
    _, cwd = ws.sh(ex.text, replace={"trainer.epochs=30": "trainer.epochs=1"})
    (run,) = run_folders(cwd / "outputs")
    config = _config(run)
    assert "lr: 0.0003" in config and "batch_size: 64" in config


def overrides_recipe(ws: Workspace, ex: Example) -> None:
    _, cwd = ws.sh(ex.text)
    (run,) = run_folders(cwd / "outputs")
    config = _config(run)
    for line in ("grad_clip_norm: 1.0", "label_smoothing: 0.1", "ema_decay: 0.999"):
        assert line in config
    assert "ema_val_acc" in _metrics(run)["history"][0]


def imagefolder(ws: Workspace, ex: Example) -> None:
    result, cwd = ws.sh(ex.text, replace={"dataset.root=/data/my_photos": f"dataset.root={ws.root / 'my_photos'}"},
                        keep=("dataset", "dataset.num_train", "dataset.num_val", "dataset.image_size"))
    (run,) = run_folders(cwd / "outputs")
    names = json.loads((run / "class_names.json").read_text())
    assert len(names) == 10 and (ws.root / "my_photos" / names[0]).is_dir()
    log = (run / "train.log").read_text()
    assert "data:" in log and "plan:" in log  # the start-up lines that say what `auto` chose


def console(ws: Workspace, ex: Example) -> None:
    result, _ = ws.sh(ex.text, tiny=False, expect=2)
    assert result.err.splitlines() == ex.output and result.out == ""


def predict_table_or_csv(ws: Workspace, ex: Example) -> None:
    # "[--json preds.json | --csv -]": the table and preds.json, or CSV on stdout.
    base = ex.text.split(" [", 1)[0]
    result, cwd = ws.sh(f"{base} --json preds.json")
    preds = json.loads((cwd / "preds.json").read_text())
    assert len(preds) == 7 and all(len(p["top"]) == 3 for p in preds)  # photo.jpg and the 6 in photos/
    assert result.out.splitlines()[0].split() == ["file", "top1", "top2", "top3"]
    assert "weights: ema (trainer.ema_decay=0.9" in result.err
    result, _ = ws.sh(f"{base} --csv -")
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert len(rows) == 7 * 3 and [r["class"] for r in rows[:3]] == [t["class"] for t in preds[0]["top"]]


def annotate_one(ws: Workspace, ex: Example) -> None:
    _, cwd = ws.sh(ex.text)
    assert sorted(p.name for p in (cwd / "annotated").iterdir()) == ["photo.png"]


def annotate_many(ws: Workspace, ex: Example) -> None:
    result, cwd = ws.sh(ex.text)
    written = sorted(p.name for p in (cwd / "annotated").iterdir())
    assert written == sorted([f"img{i}.png" for i in range(6)] + ["grid.png"])
    assert "grid.png" in result.err


def evaluate(ws: Workspace, ex: Example) -> None:
    # "[--split val|train] [--json eval.json]": without options, then with both.
    base = ex.text.split(" [", 1)[0]
    result, _ = ws.sh(base)
    assert "confusion matrix" in result.out
    ema_acc = _metrics(ws.trained)["history"][-1]["ema_val_acc"]
    assert f"accuracy {ema_acc:.4f}" in result.out  # the EMA weights, as training validated them
    _, cwd = ws.sh(f"{base} --split train --json eval.json")
    report = json.loads((cwd / "eval.json").read_text())
    assert report["split"] == "train" and report["samples"] == 200 and len(report["per_class_accuracy"]) == 10


def export(ws: Workspace, ex: Example) -> None:
    # The one export test of the suite (ONNX export takes most of this module's time).
    result, _ = ws.sh(ex.text)
    assert result.out.startswith("weights: ema (")
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt"), ("safetensors", ".safetensors")):
        line = next(ln for ln in result.out.splitlines() if ln.startswith(fmt))
        if fmt == "onnx" and "onnxruntime not installed" in line:
            continue  # the `export` extra without onnxruntime: structurally checked only, and the line says so
        assert re.search(r"max \|diff\| vs PyTorch (\S+)$", line) and float(line.rsplit(" ", 1)[1]) <= 1e-4, line
        assert (ws.trained / "export" / f"resnet20{suffix}").is_file()
    assert not list((ws.trained / "export").glob("*.data"))  # one self-contained .onnx file


def lr_find(ws: Workspace, ex: Example) -> None:
    result, _ = ws.sh(ex.text, replace={"200": "20"},
                      keep=("trainer.epochs", "trainer.limit_train_batches", "trainer.limit_val_batches"))
    assert "optimizer.lr=" in result.out and "scheduler.max_lr=" in result.out


def dry_run(ws: Workspace, ex: Example) -> None:
    result, cwd = ws.sh(ex.text, keep=("trainer.limit_train_batches", "trainer.limit_val_batches"))
    text = result.out + result.err
    for shown in ("model: resnet50  parameters: 23,520,842", "GMACs at 16px", "steps/epoch", "dry run: device cpu"):
        assert shown in text, shown
    assert not run_folders(cwd)  # no training


def models_summary(ws: Workspace, ex: Example) -> None:
    result, _ = ws.sh(ex.text)
    assert "Total params: 25,557,032" in result.out and "[1, 2048, 7, 7]" in result.out


def models_print(ws: Workspace, ex: Example) -> None:
    result, _ = ws.sh(ex.text)
    assert "(layer4):" in result.out and "(fc): Linear(in_features=2048, out_features=1000" in result.out


def models_head(ws: Workspace, ex: Example) -> None:
    result, _ = ws.sh(ex.text)
    # The head alone trains: 2048*1024+1024 + 1024*5+5 parameters.
    assert f"Trainable params: {2048 * 1024 + 1024 + 1024 * 5 + 5:,}" in result.out, result.out[-1500:]


def run_leaves(ws: Workspace, ex: Example) -> None:
    import torch

    run = ws.trained
    rel = run.relative_to(run.parents[2]).as_posix()
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d_trainer\.epochs=2,trainer\.ema_decay=0\.9(,.*)?", rel)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "curves.png", "last.pt", "best.pt",
                 "class_names.json", "metrics.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    assert "epoch" in (run / "train.log").read_text()  # the per-epoch table
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "ema", "rng", "config", "class_names"):
        assert ckpt.get(key) is not None, key
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "epochs", "history"):
        assert key in _metrics(run), key


def rmsprop(ws: Workspace, ex: Example) -> None:
    # "configs/optimizer/rmsprop.yaml": one YAML file, no Python. Here on Hydra's search path instead of in the repo.
    extra = ws.root / "extra_configs"
    (extra / "optimizer").mkdir(parents=True)
    (extra / "optimizer" / "rmsprop.yaml").write_text(ex.body + "\n")
    _, cwd = ws.sh(f"resnet-train optimizer=rmsprop hydra.searchpath=[file://{extra}]")
    (run,) = run_folders(cwd / "outputs")
    assert "_target_: torch.optim.RMSprop" in _config(run)


CASES: dict[str, Callable[[Workspace, Example], None]] = {
    "resnet-train -m optimizer=adam,sgd scheduler=onecycle,step": sweep_four,
    "resnet-train trainer.epochs=30 optimizer.lr=3e-4 dataset.batch_size=64": overrides_30_epochs,
    "resnet-train trainer.grad_clip_norm=1.0 trainer.label_smoothing=0.1 trainer.ema_decay=0.999": overrides_recipe,
    "resnet-train dataset=imagefolder dataset.root=/data/my_photos": imagefolder,
    "resnet-train trainer.epoch=3": console,
    "resnet-train model=resnet5": console,
    "resnet-train -m model=plain20,plain56,resnet20,resnet56 dataset=cifar10": degradation,
    "resnet-predict outputs/<run> photo.jpg photos/ --topk 3 [--json preds.json | --csv -]": predict_table_or_csv,
    "resnet-predict outputs/<run> photo.jpg --annotate annotated/": annotate_one,
    "resnet-predict outputs/<run> photos/ --class-names class_indices.json --annotate annotated/": annotate_many,
    "resnet-eval outputs/<run> [--split val|train] [--json eval.json]": evaluate,
    "resnet-export outputs/<run> --formats onnx,torchscript,safetensors": export,
    "resnet-lr-find --steps 200 model=resnet20 dataset=shapes": lr_find,
    "resnet-train trainer.dry_run=true model=resnet50": dry_run,
    "resnet-models resnet50 --summary --size 224": models_summary,
    "resnet-models resnet50 --print": models_print,
    "resnet-models resnet50 --summary head=mlp freeze_backbone=true num_classes=5": models_head,
    "outputs/<date>/<time>_<name,overrides>/   (sweeps: outputs/multirun/<date>/<time>/<job number>_<overrides>/)":
        run_leaves,
    "_target_: torch.optim.RMSprop": rmsprop,
}


def _here() -> dict[str, Example]:
    """The examples this module runs: the first of each text (the same command twice is run once)."""
    found: dict[str, Example] = {}
    for ex in EXAMPLES:
        if ex.marker is None:
            found.setdefault(ex.text, ex)
    return found


def test_every_example_is_run_here_run_elsewhere_or_marked_not_run():
    here = _here()
    assert sorted(set(here) - set(CASES)) == [], "README examples without a case in CASES (add one, or a marker)"
    assert sorted(set(CASES) - set(here)) == [], "CASES for examples no longer in the README (remove them)"
    for ex in EXAMPLES:  # every marker applies to something, and says why or names its test
        for marker in ex.markers:
            assert any(marker.covers(other.text) for other in EXAMPLES if other.markers is ex.markers), marker
            assert marker.by or marker.note, f"README line {ex.line}: a 'not run' marker needs a reason"


@pytest.mark.parametrize("by", sorted({m.by for ex in EXAMPLES for m in ex.markers if m.by}))
def test_run_by_names_a_test_or_script_that_runs_the_examples(by):
    path, _, name = by.partition("::")
    source = (REPO / path).read_text()
    if name:
        assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{by}: no such test"
    else:  # a script: it runs each example it is named for verbatim
        for ex in EXAMPLES:
            if ex.marker is not None and ex.marker.by == by:
                assert ex.text in source, f"{path} does not run: {ex.text}"


@pytest.mark.parametrize("text", list(CASES))
def test_readme_example(text, ws):
    CASES[text](ws, _here()[text])


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    """The Quick start opens with exactly two commands; .ci/run runs the second one verbatim."""
    quick = README.read_text().split("## Quick start", 1)[1].split("Then,", 1)[0]
    commands = readme_examples(quick)
    assert len(commands) == 2, commands
    setup_and_demo, setup_and_test = (ex.text for ex in commands)
    assert setup_and_demo.startswith("python3 -m venv .venv") and "resnet-train experiment=demo" in setup_and_demo
    assert setup_and_test.startswith("python3 -m venv .venv") and "pytest" in setup_and_test
    assert setup_and_test in (REPO / ".ci" / "run").read_text()


def test_readme_links_stay_inside_the_repository():
    """Links and `docs/...` names in the README and docs/ point at files of this repository."""
    for doc in [README, *sorted((REPO / "docs").glob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)\)", text):
            if not re.match(r"[a-z]+:", target):
                assert (doc.parent / target).exists(), f"{doc.name}: link to missing {target}"
        for name in re.findall(r"`((?:docs|bench|tests|configs|resnet_cli)/[\w./-]+\.\w+)`", text):
            if name != "configs/optimizer/rmsprop.yaml":  # the file the "Extending" example asks you to write
                assert (REPO / name).exists(), f"{doc.name}: names missing {name}"


def test_the_repository_stands_alone():
    """No file of the project points outside it: not at a folder beside the clone, nor at notes kept elsewhere."""
    outside = re.compile(r"\.\./shared|\b(?:DESIGN|RECIPES|STYLE)\.md\b")
    files = [REPO / "README.md", REPO / "pyproject.toml", *(REPO / ".ci").iterdir()]
    for folder in ("docs", "bench", "tests", "configs", "resnet_cli"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".md", ".py", ".yaml", ".toml", ".txt")]
    for path in files:
        if path.is_file() and path != Path(__file__).resolve():
            hit = outside.search(path.read_text(errors="replace"))
            assert hit is None, f"{path.relative_to(REPO)} refers outside the repository: {hit[0]}"
