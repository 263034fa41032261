"""How hard each training loss pulls: the gradient norm of every loss term on chosen parameters.

Loads a checkpoint, runs one training forward on the first ``--images`` training images of its config,
and prints, per loss term, its value and the L2 norm of its gradient on each parameter named with
``--params`` (dotted names from ``model.named_parameters()``). A term whose gradient is orders of
magnitude above the others' dominates the step (and, with gradient clipping, shrinks theirs): its
weight needs calibrating.

Usage: .venv/bin/python bench/bench_loss_gradients.py CHECKPOINT [--images 4]
       [--params rpn.head.bbox_pred.weight backbone.body.layer4.0.conv1.weight]
"""

from __future__ import annotations

import argparse

import torch

from rsiseg.checkpoint import load_checkpoint
from rsiseg.data.coco import CocoInstanceDataset
from rsiseg.inference.predictor import stored_config, without_initial_weights
from rsiseg.models.registry import build_model

DEFAULT_PARAMS = ["rpn.head.bbox_pred.weight", "rpn.head.cls_logits.weight", "backbone.body.layer4.0.conv1.weight"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--params", nargs="+", default=DEFAULT_PARAMS)
    parser.add_argument("--seed", type=int, default=0, help="of the RPN and RoI sampling")
    args = parser.parse_args()
    state = load_checkpoint(args.checkpoint)
    cfg = stored_config(state, args.checkpoint)
    model = build_model(without_initial_weights(cfg.model))
    model.load_state_dict(state["model"])
    model.train()
    named = dict(model.named_parameters())
    unknown = [p for p in args.params if p not in named]
    if unknown:
        raise SystemExit(f"unknown parameter(s) {', '.join(unknown)}; e.g. {', '.join(list(named)[:5])}")
    data = CocoInstanceDataset(cfg.data.train_ann, cfg.data.train_images, in_channels=cfg.model.in_channels)
    items = [data[i] for i in range(args.images)]
    torch.manual_seed(args.seed)
    losses = model([image for image, _ in items], [target for _, target in items])
    params = [named[p] for p in args.params]
    print(f"{cfg.model.name}, {args.checkpoint}, {args.images} training images")
    print("| loss | value | " + " | ".join(f"grad norm {p}" for p in args.params) + " |")
    print("|---" * (len(params) + 2) + "|")
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms = ["0" if g is None else f"{g.norm().item():.4f}" for g in grads]
        print(f"| {name} | {loss.item():.4f} | " + " | ".join(norms) + " |")


if __name__ == "__main__":
    main()
