"""Dissect a pretrained torchvision model on the real Broden dataset, as the paper did.

For users who have them: `torchvision` (with its pretrained weights, downloaded by torchvision
on first use) and a Broden directory (`broden1_224/`, see `lightning_dissect.download_broden`).
Where either is missing the script says what is missing and how to get it, and exits with
status 0 without dissecting anything.

It dissects the layer the paper reports for the model (AlexNet `conv5`, VGG16 `conv5_3`, the last
block of a ResNet), prints unique concepts and detectors per category next to the paper's
numbers where there are some (SEMANTICS §7), and writes `dissection.json`, one CSV per layer
and `categories.png` (unique concepts per category) to `--output`.

    python examples/broden_torchvision.py --broden data/broden1_224 --model alexnet
    python examples/broden_torchvision.py --broden data/broden1_224 --model resnet18 --probe-size 2000
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# torchvision module names of the layers the paper dissected, and its numbers for ImageNet
# weights (SEMANTICS §7): unique concepts and detectors, or None where the paper gives none.
# Caffe's conv blobs were rectified in place, so the ReLU after the convolution is dissected.
MODELS = {
    "alexnet": (["features.11"], {"unique_concepts": 61, "detectors": 97}),  # conv5
    "vgg16": (["features.29"], {"unique_concepts": 119, "detectors": None}),  # conv5_3
    "resnet18": (["layer4"], None),
    "resnet50": (["layer4"], None),
    "resnet152": (["layer4"], {"unique_concepts": 242, "detectors": None}),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broden", type=Path, default=os.environ.get("LIGHTNING_DISSECT_BRODEN"),
                        help="the Broden directory (default: $LIGHTNING_DISSECT_BRODEN)")
    parser.add_argument("--model", default="alexnet", help=f"a torchvision model name, e.g. {list(MODELS)}")
    parser.add_argument("--weights", default="DEFAULT", help="torchvision weights name (default: DEFAULT)")
    parser.add_argument("--layers", nargs="+", default=None, help="modules to dissect (default: the paper's)")
    parser.add_argument("--probe-size", type=int, default=None, help="probe images (default: all of Broden)")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="e.g. cuda (default: cuda when available)")
    parser.add_argument("--output", type=Path, default=Path("runs/broden_torchvision"))
    return parser.parse_args(argv)


def missing(args: argparse.Namespace) -> str | None:
    """Why the script cannot run here, or None when torchvision and the Broden directory are there."""
    try:
        importlib.import_module("torchvision")
    except ImportError:
        return "torchvision is not installed (pip install torchvision)"
    if args.broden is None:
        return ("no Broden directory given: pass --broden DIR or set LIGHTNING_DISSECT_BRODEN; download one with "
                "python -c 'import lightning_dissect as ld; ld.download_broden(\"data\")'")
    if not (Path(args.broden) / "index.csv").is_file():
        return f"--broden {args.broden} is not a Broden directory (no index.csv)"
    return None


def main(argv: list[str] | None = None) -> dict | None:
    """Dissect the model on Broden; returns the summaries per layer, or None when skipped."""
    args = parse_args(argv)
    reason = missing(args)
    if reason is not None:
        print(f"broden_torchvision: skipped: {reason}")
        return None
    import torch
    import torchvision

    import lightning_dissect as ld
    from lightning_dissect import analysis

    layers, paper = MODELS.get(args.model, (None, None))
    layers = args.layers or layers
    if layers is None:
        print(f"broden_torchvision: pass --layers for {args.model!r} (known defaults: {list(MODELS)})")
        return None
    try:
        model = torchvision.models.get_model(args.model, weights=args.weights if args.weights != "none" else None)
    except Exception as error:  # unknown name, or weights that cannot be downloaded here
        print(f"broden_torchvision: skipped: torchvision could not build {args.model!r} with weights "
              f"{args.weights!r} ({type(error).__name__}: {error})")
        return None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    probe = ld.ProbeSet(args.broden, size=args.probe_size, image_size=args.image_size, progress=True)
    dissection = ld.dissect(model, probe, layers, batch_size=args.batch_size, progress=True)
    args.output.mkdir(parents=True, exist_ok=True)
    dissection.to_json(args.output / "dissection.json")
    summaries = {}
    for layer, result in dissection.items():
        result.to_csv(args.output / f"{layer}.csv")
        summary = summaries[layer] = result.summary()
        print(f"{args.model} {layer}: {summary['unique_concepts']:.0f} unique concepts, {summary['detectors']:.0f} "
              f"of {result.num_units} units are detectors")
        for category in result.categories:
            print(f"  {category:>10}: {summary[f'unique_concepts/{category}']:.0f} unique concepts, "
                  f"{summary[f'detectors/{category}']:.0f} detectors")
    if paper is not None and len(dissection) == 1:
        found = next(iter(summaries.values()))
        print("paper (ImageNet weights, full Broden): " + ", ".join(
            f"{key.replace('_', ' ')} {value} (here {found[key]:.0f})" for key, value in paper.items()
            if value is not None))
    counts = analysis.concept_counts(dict(dissection.items()))
    figure = analysis.plot_comparison(counts, args.output / "categories.png",
                                      title=f"{args.model}: unique concepts per category")
    print(f"written to {args.output}: dissection.json, one CSV per layer, {figure.name}")
    return summaries


if __name__ == "__main__":
    main()
    sys.exit(0)
