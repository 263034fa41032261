"""``rsiseg data class-weights``: inverse pixel-frequency class weights of dense training labels."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rsiseg data class-weights``."""
    parser.add_argument("--labels", required=True, metavar="DIR", help="folder of the training label maps")
    parser.add_argument("--format", choices=["index", "potsdam_rgb"], default="index",
                        help="index: uint8 class indices (255 = ignore); potsdam_rgb: the ISPRS colour labels")
    parser.add_argument("--num-classes", type=int, required=True, help="classes of the model (model.num_classes)")
    parser.add_argument("--ignore-index", type=int, default=255, help="label value of unlabelled pixels (255)")
    parser.add_argument("--out", required=True, metavar="WEIGHTS.json",
                        help="where to write the weights; point model.seg.class_weights at it")


def run(args: argparse.Namespace) -> int:
    """Count the pixels of each class, write the weights, print them."""
    from rsiseg.data.class_weights import compute_class_weights, write_class_weights

    if args.num_classes <= 0:
        raise ValueError(f"--num-classes must be > 0, got {args.num_classes}")
    result = compute_class_weights(args.labels, args.format, args.num_classes, args.ignore_index)
    write_class_weights(args.out, result)
    for name, count, weight in zip(result["names"], result["counts"], result["weights"]):
        print(f"{name:>24}: {count:>12} px  weight {weight:.4f}")
    print(f"wrote {args.out}")
    return 0
