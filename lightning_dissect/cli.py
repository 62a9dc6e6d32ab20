"""The `lightning-dissect` command.

    lightning-dissect demo                     train a small CNN on the synthetic dataset, dissect it as it learns
    lightning-dissect compare RUN[@STEP] ...   unique concepts per category across layers or saved runs
    lightning-dissect dissect MODEL --layers   dissect a model (module:function or a .pt file) on a Broden
                                               directory or the synthetic dataset: CSVs, JSON, HTML report
    lightning-dissect report RUN_DIR           the HTML report of a run (lightning_dissect.report)

Each subcommand is a thin adapter: it parses arguments, calls the library and prints where the
results are. Errors a user can cause (a missing run, an unknown layer) end with exit status 2 and
one line naming the argument at fault.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_dissect.broden import BrodenError
from lightning_dissect.engine.errors import DissectionError
from lightning_dissect.probe_source import dataset_of
from lightning_dissect.progress import show_progress
from lightning_dissect.synthetic import SYNTHETIC_TASKS


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ demo


def add_demo_command(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="train a small CNN on the synthetic dataset with DissectionCallback and draw the emergence "
                     "figures (default: 500 steps on 1000 images of 64 px, into ./runs/demo)",
        description="Generate the synthetic dataset (cached), train a small CNN from scratch on it with "
                    "DissectionCallback on a log-spaced schedule (steps 0, 1, 2, 4, 9, 20, ...), write TensorBoard "
                    "logs and the paper's emergence figures, and print the numbers found.")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/demo"),
                        help="where logs and figures go (default: ./runs/demo)")
    parser.add_argument("--steps", type=int, default=500, help="training steps (default: 500)")
    parser.add_argument("--images", type=int, default=1000, help="images in the synthetic dataset (default: 1000)")
    parser.add_argument("--image-size", type=int, default=64, help="their size in pixels (default: 64)")
    parser.add_argument("--probe-size", type=int, default=None,
                        help="probe images, drawn from the validation split (default: all of it)")
    parser.add_argument("--task", default="background", choices=list(SYNTHETIC_TASKS),
                        help="the training task: which scene or texture is behind the shapes (background), which "
                             "shapes (objects) or materials (materials) are visible (default: background)")
    parser.add_argument("--width", type=int, default=32, help="the CNN's width (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default: 0)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the dataset is cached (default: $LIGHTNING_DISSECT_CACHE or ~/.cache)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    parser.set_defaults(handler=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    for name in ("steps", "images", "image_size", "width"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be a positive integer")
    try:
        from lightning_dissect.demo import emergence_run
    except ImportError as error:
        raise UsageError(f"the demo needs Lightning and TensorBoard ({error}); pip install "
                         "'lightning-dissect[lightning,tensorboard]'") from error
    import logging
    import warnings

    # The demo prints its own story: Lightning's start-up notes (no GPU, logger tips) and its advice
    # about dataloader workers for in-memory tensors are noise here.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(num_workers|treespec|LeafSpec).*")
        run = emergence_run(args.output, steps=args.steps, num_images=args.images, image_size=args.image_size,
                            probe_size=args.probe_size, task=args.task, width=args.width, seed=args.seed,
                            cache_dir=args.cache_dir, progress=args.progress, echo=print)
    first_step, last_step = run["steps"][0], run["steps"][-1]
    print()
    for layer, (first, last) in run["unique_concepts"].items():
        print(f"{layer}: {first:.0f} unique concepts at step {first_step} -> {last:.0f} at step {last_step} "
              f"({run['detectors'][layer][0]:.0f} -> {run['detectors'][layer][1]:.0f} detectors)")
    print(f"validation accuracy on the {args.task} task: {100 * run['accuracy']:.1f}%")
    print("\nfigures:")
    for path in run["figures"]:
        print(f"  {path}")
    print(f"dissections (JSON, CSV per step, history.jsonl): {run['dissections']}")
    print(f"\nopen TensorBoard:\n  tensorboard --logdir {run['log_root']}")
    print(f"HTML report of the last dissection:\n  lightning-dissect report {run['log_dir']}")
    return 0


# ------------------------------------------------------------------------------------------------ compare


def add_compare_command(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare", help="bar chart of unique concepts per category across layers or saved runs (default: the last "
                        "dissection of each run, into comparison.png)",
        description="Compare dissections: with one RUN, its layers; with several, one bar per run (and layer). "
                    "A RUN is a log directory written by DissectionCallback, its dissections/ folder, or a "
                    "dissection JSON file; RUN@STEP picks a dissection of a run (default: its last), so stages of "
                    "one run compare too.")
    parser.add_argument("runs", nargs="+", metavar="RUN[@STEP]", help="runs or dissection files to compare")
    parser.add_argument("--layer", action="append", default=None,
                        help="layer(s) to show (repeatable; default: every layer of one run, the last layer of "
                             "each of several)")
    parser.add_argument("--names", nargs="+", default=None, help="display names of the runs, in order")
    parser.add_argument("--count", choices=["unique_concepts", "detectors"], default="unique_concepts",
                        help="what the bars count (default: unique_concepts)")
    parser.add_argument("-o", "--output", type=Path, default=Path("comparison.png"),
                        help="the figure to write (default: comparison.png)")
    parser.set_defaults(handler=run_compare)
    return parser


def split_run(spec: str) -> tuple[Path, int | None]:
    """`RUN@STEP` -> `(RUN, STEP)`; a plain `RUN` -> `(RUN, None)`.

    Raises:
        UsageError: a STEP that is not an integer.
    """
    path, separator, step = spec.rpartition("@")
    if not separator or Path(spec).exists():
        return Path(spec), None
    if not step.isdigit():
        raise UsageError(f"{spec!r}: the step after '@' must be an integer, e.g. {path}@1000")
    return Path(path), int(step)


def compared_layers(specs: Sequence[str], layers: Sequence[str] | None = None,
                    names: Sequence[str] | None = None) -> dict[str, Any]:
    """The `LayerDissection`s that `compare` draws, under their bar names.

    One run: each of its layers (or `layers`). Several runs: for each, its last layer (or each
    of `layers`), named after the run (`name:layer` when several layers are shown).

    Raises:
        UsageError: a run, step or layer that does not exist (named), or names of the wrong length.
    """
    from lightning_dissect.analysis import read_run

    if names is not None and len(names) != len(specs):
        raise UsageError(f"--names has {len(names)} names for {len(specs)} runs")
    chosen: dict[str, Any] = {}
    for index, spec in enumerate(specs):
        path, step = split_run(spec)
        try:
            history = read_run(path)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"RUN {spec!r}: {error}") from error
        steps = [saved for saved, _ in history]
        if step is not None and step not in steps:
            raise UsageError(f"RUN {spec!r}: no dissection at step {step}; steps: {steps}")
        found_step, dissection = history[-1] if step is None else history[steps.index(step)]
        wanted = list(layers) if layers else (list(dissection) if len(specs) == 1 else [list(dissection)[-1]])
        missing = [layer for layer in wanted if layer not in dissection]
        if missing:
            raise UsageError(f"RUN {spec!r}: no layer {missing[0]!r}; layers: {list(dissection)}")
        run_name = names[index] if names else (path.name if step is None else f"{path.name}@{found_step}")
        for layer in wanted:
            label = layer if len(specs) == 1 else (run_name if len(wanted) == 1 else f"{run_name}:{layer}")
            if label in chosen:
                label = f"{label} ({index + 1})"
            chosen[label] = dissection[layer]
    return chosen


def run_compare(args: argparse.Namespace) -> int:
    from lightning_dissect.analysis import concept_counts, format_counts, plot_comparison

    layers = compared_layers(args.runs, args.layer, args.names)
    counts = concept_counts(layers, args.count)
    label = args.count.replace("_", " ")
    print(format_counts(counts, "layer" if len(args.runs) == 1 else "run"))
    figure = plot_comparison(counts, args.output, ylabel=label,
                             title=f"{label} per category" + (f" ({args.runs[0]})" if len(args.runs) == 1 else ""))
    print(f"figure: {figure}")
    return 0


# ------------------------------------------------------------------------------------------------ dissect

MODEL_FILE_SUFFIXES = (".pt", ".pth")


def add_dissect_command(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dissect", help="dissect layers of a model (your code's, or a file saved with torch.save) on a Broden "
                        "directory in one pass, writing the CSVs, the JSON and the HTML report (default: the "
                        "synthetic dataset where no --broden is given, into ./dissection)",
        description="Dissect layers of a model on a Broden directory (or, where no --broden is given, the synthetic "
                    "dataset, generated once into the cache): the whole dataset (or --size images) in one pass for "
                    "every layer, the probe read batch by batch. Writes dissection.json, one CSV per layer and the "
                    "HTML report (report/index.html). MODEL is either code of yours that returns the nn.Module, as "
                    "module:function (a function or class called without arguments, or a module-level nn.Module "
                    "attribute; e.g. torchvision.models:resnet18, my_project.nets:build; a module in the current "
                    "directory is found as with python -m: train:Net for ./train.py), or a .pt/.pth file saved "
                    "with torch.save(model) (the whole model: its class must import here, and loading it runs code "
                    "from the file, so load only files you trust). MODEL may come before or after --layers. "
                    "--weights loads a state dict into it (a Lightning checkpoint's state_dict works too).")
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="module:function returning the nn.Module, or a .pt/.pth file saved with "
                             "torch.save(model) (before or after --layers)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a state dict saved with torch.save (or a Lightning .ckpt), loaded with weights_only")
    parser.add_argument("--layers", nargs="+", required=True,
                        help="module names to dissect, as in model.named_modules(), e.g. layer4 layer3.1.conv2")
    parser.add_argument("--broden", default="synthetic",
                        help="a Broden directory, or 'synthetic' for the cached synthetic dataset (default)")
    parser.add_argument("--size", "--probe-size", dest="probe_size", type=int, default=None,
                        help="probe images, a seeded draw (default: every image of the dataset)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize probe images for the model, in pixels (default: the dataset's size; 224 for "
                             "the synthetic dataset)")
    parser.add_argument("--quantile", type=float, default=0.005, help="top activation quantile (default 0.005)")
    parser.add_argument("--iou-threshold", type=float, default=0.04, help="detector IoU threshold (default 0.04)")
    parser.add_argument("--denominator", default="paper", choices=["paper", "lite", "global"],
                        help="the unit area in the IoU (docs/SEMANTICS.md §4): paper (the mask on images where the "
                             "category is annotated), lite (as NetDissect-Lite) or global (every image) "
                             "(default: paper)")
    parser.add_argument("--batch-size", type=int, default=64, help="probe images per forward pass (default: 64)")
    parser.add_argument("--device", default="auto",
                        help="where the model runs: cpu, cuda, cuda:1, ... (default: auto, the first CUDA device "
                             "where there is one, else the CPU)")
    parser.add_argument("--spill-dir", type=Path, default=None,
                        help="folder for the temporary file that holds the layers' outputs beyond 2 GiB between "
                             "the two passes (default: the system's temporary folder, TMPDIR); it has no name "
                             "and is gone when the dissection ends")
    parser.add_argument("--no-spill", dest="spill", action="store_false",
                        help="run the model again for the outputs beyond 2 GiB instead of writing them to disk")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="write the JSON and the CSVs only, not the HTML report with a strip per unit")
    parser.add_argument("-o", "--out", "--output", dest="output", type=Path, default=Path("dissection"),
                        help="folder for dissection.json, <layer>.csv and report/ (default: ./dissection)")
    parser.set_defaults(handler=run_dissect)
    return parser


def is_model_spec(name: str) -> bool:
    """Whether a command-line word names a MODEL: `module:function`, or a `.pt`/`.pth` file."""
    return ":" in name or name.lower().endswith(MODEL_FILE_SUFFIXES)


def model_and_layers(model: str | None, layers: Sequence[str]) -> tuple[str, list[str]]:
    """MODEL and the layer names, whichever order they came in: `--layers A B MODEL` leaves MODEL at the end
    of the layers (argparse's `nargs="+"` takes it); MODEL has a ':' or ends in .pt/.pth, a layer name never.

    Raises:
        UsageError: no MODEL, two of them, or a layer name with a ':'.
    """
    specs = [name for name in layers if is_model_spec(name)]
    layers = [name for name in layers if not is_model_spec(name)]
    if model is None and specs:
        model = specs.pop()  # MODEL after the layers: the last name
    if model is None:
        raise UsageError("MODEL is missing: name it as module:function or a .pt file, before or after --layers "
                         "(e.g. lightning-dissect dissect my_project.nets:build --layers layer4)")
    if specs:
        raise UsageError(f"--layers {specs[0]!r}: layer names have no ':' and no .pt/.pth ending (MODEL is "
                         f"{model!r}); name the modules of model.named_modules()")
    if not layers:
        raise UsageError("--layers names no layer")
    return model, layers


def _built_model(spec: str) -> Any:
    """The object that `module:attribute` names, called when it is a function or class."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"MODEL {spec!r} must be module:function, e.g. torchvision.models:resnet18, or a .pt file")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not module_name.startswith(error.name):
            raise UsageError(f"MODEL {spec!r} does not import ({error})") from error
        raise UsageError(f"MODEL {spec!r}: no module {error.name!r} in the current directory ({Path.cwd()}) or on "
                         f"the path; run from the folder that holds {error.name.replace('.', '/')}.py, add its "
                         "folder to PYTHONPATH, or name the module as your package does (package.module:function)") \
            from error
    except ImportError as error:
        raise UsageError(f"MODEL {spec!r} does not import ({error})") from error
    found: Any = module
    try:
        for part in attribute.split("."):
            found = getattr(found, part)
    except AttributeError as error:
        raise UsageError(f"MODEL {spec!r} does not import ({error})") from error
    import torch

    if isinstance(found, torch.nn.Module):
        return found
    if not callable(found):
        raise UsageError(f"MODEL {spec!r} is a {type(found).__name__}, neither an nn.Module nor a function or class "
                         "that returns one")
    try:
        return found()
    except TypeError as error:
        raise UsageError(f"MODEL {spec!r} cannot be called without arguments ({error}); name a function of yours "
                         "that builds the model with its arguments") from error


def _saved_model(spec: str) -> Any:
    """The model in a file saved with `torch.save(model)`."""
    import torch

    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"MODEL {spec!r} must be module:function (e.g. torchvision.models:resnet18) or a .pt/.pth "
                         f"file saved with torch.save(model); there is no file {path.absolute()}")
    try:
        # The whole model is a pickle of its class: weights_only=True cannot load it (the help says so).
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as error:
        raise UsageError(f"MODEL {spec!r}: the model's code does not import here ({error}); torch.save(model) "
                         "stores its class by module and name: run from the folder of that code or add it to "
                         "PYTHONPATH (a model saved from a script run as __main__ loads only there: name its code "
                         "as module:function and pass the weights with --weights)") from error
    except Exception as error:
        raise UsageError(f"MODEL {spec!r} is not a file saved with torch.save ({error})") from error
    if isinstance(loaded, torch.jit.ScriptModule):
        raise UsageError(f"MODEL {spec!r} is a TorchScript file, whose layers cannot be hooked; save the model with "
                         "torch.save(model), or name its code as module:function")
    if isinstance(loaded, dict):
        raise UsageError(f"MODEL {spec!r} holds a state dict (the weights, without the model): name the code that "
                         f"builds the model as module:function and pass the file as --weights {spec}")
    return loaded


def load_model(spec: str, weights: Path | None = None) -> Any:
    """The model that MODEL names (`module:function`, or a file saved with `torch.save(model)`), with `weights`
    loaded into it.

    Raises:
        UsageError: a spec that does not import, is no file, or does not give an `nn.Module`, or weights that
            are missing or do not fit (the message names which).
    """
    import torch

    model = _built_model(spec) if ":" in spec else _saved_model(spec)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"MODEL {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        if not weights.is_file():
            raise UsageError(f"--weights {str(weights)!r} is not a file")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UsageError(f"--weights {str(weights)!r} is not a state dict saved with torch.save ({error})") \
                from error
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as error:
            raise UsageError(f"--weights {str(weights)!r} do not fit MODEL {spec!r}: "
                             f"{str(error).splitlines()[0]}") from error
    return model


def resolve_device(value: str) -> Any:
    """The `torch.device` of `--device` (`auto`: the first CUDA device where there is one, else the CPU).

    Raises:
        UsageError: not a device name, or a CUDA device this machine does not have.
    """
    import torch

    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise UsageError(f"--device {value!r} is not a device: cpu, cuda, cuda:1, ... or auto ({error})") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {value!r}: this machine has no CUDA device (torch.cuda.is_available() is "
                             "False); use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {value!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    return device


def check_dissect_options(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before anything is loaded, naming the option."""
    for option, value in (("--size", args.probe_size), ("--image-size", args.image_size),
                          ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value} must be a positive integer")
    if not 0 < args.quantile < 1:
        raise UsageError(f"--quantile {args.quantile} must be in (0, 1), e.g. 0.005 for the top 0.5%")
    if not 0 <= args.iou_threshold < 1:
        raise UsageError(f"--iou-threshold {args.iou_threshold} must be in [0, 1), e.g. 0.04")
    if args.spill_dir is not None and not args.spill:
        raise UsageError("--spill-dir and --no-spill contradict each other: give one")
    if args.spill_dir is not None and not args.spill_dir.is_dir():
        raise UsageError(f"--spill-dir {args.spill_dir}: not an existing folder")


def run_dissect(args: argparse.Namespace) -> int:
    import lightning_dissect as ld
    from lightning_dissect.engine.capture import resolve_layers

    check_dissect_options(args)
    model_spec, layers = model_and_layers(args.model, args.layers)
    device = resolve_device(args.device)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: MODEL may be a module of the current directory
    model = load_model(model_spec, args.weights)
    resolve_layers(model, layers)  # an unknown layer is named before the probe is decoded
    dataset = dataset_of(args.broden, args.image_size, info=lambda message: print(message, file=sys.stderr),
                         argument="--broden")
    try:
        probe = ld.ProbeSet(dataset, size=args.probe_size, image_size=args.image_size, progress=show_progress())
    except BrodenError:
        raise
    except ValueError as error:  # the one number of the probe not checked above: more images than there are
        raise UsageError(f"--size {args.probe_size}: {error}") from error
    print(f"dissecting {', '.join(layers)} of {model_spec} on {len(probe)} images of {args.broden} ({device})",
          file=sys.stderr)
    dissection = ld.dissect(model.to(device), probe, layers, quantile=args.quantile,
                            iou_threshold=args.iou_threshold, denominator=args.denominator,
                            batch_size=args.batch_size, device=device, progress=show_progress(),
                            activation_spill=args.spill_dir if args.spill_dir is not None else args.spill)
    args.output.mkdir(parents=True, exist_ok=True)
    dissection.to_json(args.output / "dissection.json")
    for layer, result in dissection.items():
        result.to_csv(args.output / f"{layer}.csv")
        summary = result.summary()
        print(f"{layer}: {summary['unique_concepts']:.0f} unique concepts, {summary['detectors']:.0f} of "
              f"{result.num_units} units are detectors")
    print(f"written: {args.output / 'dissection.json'} and one CSV per layer")
    if args.report:
        index = dissection.to_html(args.output / "report", model=model, probe=probe, device=device,
                                   batch_size=args.batch_size, title=f"{model_spec}: {', '.join(layers)}")
        print(f"HTML report: {index}")
    return 0


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; `report` comes from `lightning_dissect.report` when it imports."""
    parser = argparse.ArgumentParser(
        prog="lightning-dissect", description="Network Dissection (Bau et al., CVPR 2017) in the training loop.")
    from lightning_dissect import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_command(subparsers)
    add_compare_command(subparsers)
    add_dissect_command(subparsers)
    try:  # the report command lives with the report; the others work without it
        from lightning_dissect.report.run import add_report_command
    except ImportError:
        pass
    else:
        add_report_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `lightning-dissect`; returns the exit status (0: done, 2: bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (UsageError, BrodenError, DissectionError) as error:
        print(f"lightning-dissect {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
