"""Command line: `python -m alip.eval {retrieval,zeroshot,linear-probe} ...` (or under torchrun).

Every run writes one results JSON (model, checkpoint sha256, datasets with split and sample
counts, templates hash, precision, package versions, every metric) and prints a table.
Under torchrun the images and prompts are sharded over the ranks and gathered exactly; rank 0
writes the results.

Every dataset of a run is loaded and checked before the first feature is extracted. A user error
(a missing dataset, class names that do not fit it, an empty template file, a bad checkpoint) is
one `error: ...` line and exit status 2; `--debug` or ALIP_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from alip.cli import add_debug_flag, guarded
from alip.distributed import init_distributed
from alip.eval.datasets import TORCHVISION_LAYOUTS, ClassificationData, load_classification
from alip.eval.features import FEATURE_STAGES, PRECISIONS, cached, extract_features, image_encoder
from alip.eval.linear_probe import DEFAULT_C_GRID, linear_probe, probe_summary
from alip.eval.metrics import TIE_RULES, paper_metric
from alip.eval.protocol import (
    LOGIT_RULES,
    PROTOCOLS,
    EvalProtocol,
    imagenet_padded_rows,
    load_protocol_classification,
    parse_padding,
    resolve_protocol,
)
from alip.eval.results import build_record, format_table, model_record, write_record
from alip.eval.retrieval import evaluate_retrieval
from alip.eval.retrieval_formats import RetrievalData, load_retrieval
from alip.eval.zeroshot import evaluate_zeroshot

logger = logging.getLogger("alip.eval")

EPILOG = (
    """
where the data goes (nothing is downloaded; a missing dataset says what it expected):
  retrieval   --annotations dataset_coco.json --images <coco>/   (Karpathy JSON; images at <coco>/val2014/*.jpg)
              --annotations dataset_flickr30k.json --images <flickr30k-images>/
              also ALBEF's coco_test.json / flickr30k_test.json (what the release reads), CLIP_benchmark's
              coco_test_karpathy.json / flickr30k_test_karpathy.txt, a CSV/JSONL with image,caption columns
              (several rows per image), or a CLIP_benchmark webdataset folder.
              An image listed without captions cannot be an image-to-text query: it is left out of both
              directions, with a warning and a count under "notices" in the results JSON.
  zeroshot / linear-probe  --data ROOT with one --dataset: ROOT holds that dataset's torchvision layout;
              with several --dataset names: ROOT/<name>/ holds each. --classnames must give one name per
              class (the class folders in sorted order); --templates must not be empty. Layouts:
"""
    + "\n".join(f"     {k:14s} {v}" for k, v in TORCHVISION_LAYOUTS.items())
    + """
     any other name: an ImageFolder (<root>/<class>/*.jpg + classnames.txt) or a CLIP_benchmark webdataset
                    (<root>/<split>/nshards.txt, <root>/<split>/0.tar, classnames.txt,
                    zeroshot_classification_templates.txt)
protocols (--protocol; every option it sets can also be given on its own, all go into the results JSON):
  clip_benchmark  (default) CLIP_benchmark 1.6.2's figures: its tie breaking, float logits, CLIP's splits
  release         the official release's (the paper's tables): 'a photo of ' before every caption,
                  its tie breaking, int64-truncated logits, ImageNet resized to 256 and cropped to 224 with
                  the release's padded rows counted, Caltech-101 and SUN397 on its random splits
examples:
  python -m alip.eval zeroshot --model ViT-B-32 --checkpoint ALIP_YFCC15M_B32.pt --data /data/eval \\
      --dataset cifar10 cifar100 food101 pets flowers sun397 cars dtd caltech101 fgvc_aircraft
  torchrun --nproc_per_node 8 -m alip.eval retrieval --checkpoint ckpt.pt --dataset coco \\
      --annotations /data/coco/dataset_coco.json --images /data/coco
  python -m alip.eval linear-probe --checkpoint ckpt.pt --data /data/eval --dataset cifar10 --cache-dir feats/
"""
)


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and run")
    g.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32)")
    g.add_argument("--checkpoint", default=None, help="local checkpoint: ALIP release, open_clip, ours, safetensors")
    g.add_argument("--device", default=None, help="default: this rank's GPU if any, else cpu")
    g.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="feature precision (default fp32)")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--workers", type=int, default=4, help="data loader workers per rank")
    g.add_argument("--output", default=None, help="results JSON (default: eval_results/<task>-<model>-<time>.json)")
    g.add_argument("--log-level", default="INFO")
    add_debug_flag(g)


def _padding_arg(value: str) -> tuple[int, int] | None | str:
    if value == "default":
        return value
    try:
        return parse_padding(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _protocol_options(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group("protocol (see alip.eval.protocol)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="clip_benchmark", help="default: clip_benchmark")
    g.add_argument(
        "--ties",
        choices=TIE_RULES,
        default=None,
        help="how tied scores rank: as CLIP_benchmark's code (torch.topk), as the release's (stable ranks, "
        "topk(1)), or pessimistic (ties count against the query); default: the protocol's",
    )
    if task == "retrieval":
        g.add_argument("--caption-prefix", default=None, help="text put before every caption (default: the protocol's)")
        return
    g.add_argument(
        "--logits", choices=LOGIT_RULES, default=None, help="float, or int64-truncated (default: the protocol's)"
    )
    g.add_argument(
        "--imagenet-padding",
        type=_padding_arg,
        default="default",
        metavar="{none,RANKSxBATCH}",
        help="count the padded rows of the release's ImageNet run on RANKS x BATCH (default: the protocol's)",
    )


def _resolve_protocol(args: argparse.Namespace) -> EvalProtocol | None:
    if args.task == "linear-probe":
        return None
    return resolve_protocol(
        args.protocol,
        ties=args.ties,
        caption_prefix=getattr(args, "caption_prefix", None),
        logits=getattr(args, "logits", None),
        imagenet_padding=getattr(args, "imagenet_padding", "default"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m alip.eval",
        description="ALIP evaluation: zero-shot retrieval, zero-shot classification, linear probe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="task", required=True)

    r = sub.add_parser(
        "retrieval",
        help="image-text retrieval R@1/5/10 (MSCOCO 5k, Flickr30k 1k)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(r)
    r.add_argument("--dataset", default=None, help="name in the results (default: from the annotation file)")
    r.add_argument("--annotations", required=True, help="Karpathy JSON, CLIP_benchmark file, CSV/JSONL or wds folder")
    r.add_argument("--images", default=None, help="image root the annotations are relative to")
    r.add_argument("--format", default="auto", choices=["auto", "karpathy", "albef", "coco", "flickr", "table", "wds"])
    r.add_argument("--split", default="test")
    _protocol_options(r, "retrieval")

    for name, helptext in (
        ("zeroshot", "zero-shot classification top-1/top-5/mean-per-class recall"),
        ("linear-probe", "logistic-regression probe on frozen image features (CLIP protocol)"),
    ):
        c = sub.add_parser(name, help=helptext, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(c)
        c.add_argument("--dataset", nargs="+", required=True, help=f"names: {', '.join(TORCHVISION_LAYOUTS)}, or any")
        c.add_argument("--data", required=True, help="dataset root (several datasets: parent folder of <name>/)")
        c.add_argument("--format", default="auto", choices=["auto", "torchvision", "imagefolder", "wds"])
        c.add_argument("--classnames", default=None, help="file, one class name per line (overrides the default)")
        c.add_argument("--templates", default=None, help="file, one template per line with {c} (overrides)")
        if name == "zeroshot":
            c.add_argument("--split", default="test")
            _protocol_options(c, "zeroshot")
        else:
            c.add_argument("--train-split", default="train")
            c.add_argument("--test-split", default="test")
            c.add_argument(
                "--feature",
                choices=FEATURE_STAGES,
                default="projected",
                help="image features after the projection (default) or before it",
            )
            c.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the features")
            c.add_argument("--cache-dir", default=None, help="cache extracted features here")
            c.add_argument("--val-fraction", type=float, default=0.2, help="train fraction held out to pick C")
            c.add_argument("--c-grid", type=float, nargs="+", default=list(DEFAULT_C_GRID), help="coarse C grid")
            c.add_argument("--refine-steps", type=int, default=6, help="log-bisection steps after the grid")
            c.add_argument("--max-iter", type=int, default=1000)
            c.add_argument("--probe-device", default=None, help="device for the L-BFGS fit (default: GPU if any)")
            c.add_argument("--seed", type=int, default=0)
    return parser


def _dataset_root(args: argparse.Namespace, name: str) -> Path:
    root = Path(args.data)
    return root / name if len(args.dataset) > 1 else root


def _describe(data: ClassificationData) -> dict[str, Any]:
    return {
        "name": data.name,
        "split": data.split,
        "num_samples": len(data),
        "num_classes": len(data.classnames),
        "num_templates": len(data.templates),
        "templates_sha256": data.templates_sha256,
        "source": data.source,
    }


def _run_retrieval(
    args: argparse.Namespace,
    data: RetrievalData,
    model: Any,
    tokenizer: Any,
    preprocess: Any,
    device: str,
    protocol: EvalProtocol,
) -> list[dict]:
    metrics = evaluate_retrieval(
        model,
        tokenizer,
        data,
        preprocess,
        device=device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        precision=args.precision,
        caption_prefix=protocol.caption_prefix,
        ties=protocol.ties,
    )
    desc = {
        "name": data.name,
        "split": data.split,
        "annotations": str(Path(args.annotations).resolve()),
        "num_images": len(data.images),
        "num_texts": len(data.captions),
    }
    if data.notices:
        desc["notices"] = data.notices
    return [{**desc, "metrics": metrics}]


def _load(
    args: argparse.Namespace, name: str, split: str, preprocess: Any, protocol: EvalProtocol | None = None
) -> ClassificationData:
    root = _dataset_root(args, name)
    if protocol is not None:
        return load_protocol_classification(
            protocol, name, root, split, preprocess, args.format, args.classnames, args.templates
        )
    return load_classification(name, root, split, preprocess, args.format, args.classnames, args.templates)


def _run_zeroshot(
    args: argparse.Namespace,
    sets: list[ClassificationData],
    model: Any,
    tokenizer: Any,
    device: str,
    protocol: EvalProtocol,
) -> list[dict]:
    out = []
    for data in sets:
        padding = protocol.imagenet_padding if data.name == "imagenet1k" else None
        metrics = evaluate_zeroshot(
            model,
            tokenizer,
            data,
            device=device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            precision=args.precision,
            ties=protocol.ties,
            logits=protocol.logits,
            padded_rows=imagenet_padded_rows(len(data), *padding) if padding else 0,
        )
        out.append({**_describe(data), "metrics": metrics})
    return out


def _run_linear_probe(
    args: argparse.Namespace, sets: list[dict[str, ClassificationData]], model: Any, device: str, ckpt: dict
) -> list[dict]:
    out = []
    encode = image_encoder(model, stage=args.feature, normalize=not args.no_normalize)
    for name, by_role in zip(args.dataset, sets, strict=True):
        splits = {}
        for role, data in by_role.items():
            key = {
                "model": args.model,
                "checkpoint_sha256": ckpt["checkpoint_sha256"],
                "dataset": name,
                "split": data.split,
                "num_samples": len(data),
                "feature": args.feature,
                "normalize": not args.no_normalize,
                "precision": args.precision,
                "root": str(data.source),
            }

            def compute(data: ClassificationData = data, role: str = role) -> dict[str, torch.Tensor]:
                x, y = extract_features(
                    data.dataset,
                    encode,
                    device=device,
                    batch_size=args.batch_size,
                    num_workers=args.workers,
                    precision=args.precision,
                    with_labels=True,
                    desc=f"{data.name} {role}",
                )
                return {"features": x, "labels": y}

            splits[role] = (data, cached(args.cache_dir, key, compute))
        (train, tr), (test, te) = splits["train"], splits["test"]
        metric = paper_metric(name)
        result = linear_probe(
            tr["features"],
            tr["labels"],
            te["features"],
            te["labels"],
            num_classes=len(train.classnames),
            select_metric=metric,
            c_grid=args.c_grid,
            refine_steps=args.refine_steps,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_iter=args.max_iter,
            device=args.probe_device,
        )
        desc = _describe(test)
        desc.update(
            train_split=train.split,
            num_train=len(train),
            feature=args.feature,
            normalize=not args.no_normalize,
            val_fraction=args.val_fraction,
        )
        out.append({**desc, "metrics": probe_summary(result, metric)})
    return out


_COLUMNS = {
    "retrieval": [
        "name",
        "num_images",
        "num_texts",
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        "t2i_R@1",
        "t2i_R@5",
        "t2i_R@10",
    ],
    "zeroshot": ["name", "split", "num_samples", "top1", "top5", "mean_per_class_recall", "paper_metric"],
    "linear-probe": [
        "name",
        "num_train",
        "num_samples",
        "top1",
        "top5",
        "mean_per_class_recall",
        "paper_metric",
        "best_C",
    ],
}


def _check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Ranges argparse's types cannot say: a usage error (exit 2) before anything is loaded."""
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be >= 1 and --workers >= 0")
    if args.task == "linear-probe":
        if not 0.0 < args.val_fraction < 1.0:
            parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
        if any(not c > 0.0 for c in args.c_grid) or args.refine_steps < 0 or args.max_iter < 1:
            parser.error("--c-grid values must be > 0, --refine-steps >= 0 and --max-iter >= 1")


def _load_data(args: argparse.Namespace, preprocess: Any, protocol: EvalProtocol | None) -> Any:
    """Every dataset of the run, loaded and checked before any feature is extracted."""
    if args.task == "retrieval":
        return load_retrieval(args.annotations, args.images, split=args.split, fmt=args.format, name=args.dataset)
    if args.task == "zeroshot":
        return [_load(args, name, args.split, preprocess, protocol) for name in args.dataset]
    return [
        {
            role: _load(args, name, split, preprocess)
            for role, split in (("train", args.train_split), ("test", args.test_split))
        }
        for name in args.dataset
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one evaluation and return its results record; user errors raise (see `cli`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_numbers(parser, args)
    protocol = _resolve_protocol(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = init_distributed()
    device = args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    import alip  # the public API; imported here so `--help` stays fast

    model, _, preprocess = alip.create_model(args.model, pretrained=args.checkpoint, device=device)
    model.eval()
    ckpt = model_record(args.model, args.checkpoint)
    data = _load_data(args, preprocess, protocol)
    if args.task == "retrieval":
        datasets = _run_retrieval(args, data, model, alip.get_tokenizer(args.model), preprocess, device, protocol)
    elif args.task == "zeroshot":
        datasets = _run_zeroshot(args, data, model, alip.get_tokenizer(args.model), device, protocol)
    else:
        datasets = _run_linear_probe(args, data, model, device, ckpt)
    settings = {"precision": args.precision, "batch_size": args.batch_size, "world_size": env.world_size}
    if args.task == "linear-probe":
        settings.update(feature=args.feature, c_grid=args.c_grid, refine_steps=args.refine_steps)
    else:
        settings.update(protocol.record(args.task))
    record = build_record(args.task, ckpt, datasets, **settings)
    if env.is_main:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        output = args.output or f"eval_results/{args.task}-{args.model}-{stamp}.json"
        write_record(record, output)
        rows = [
            {"name": d["name"], **{k: v for k, v in d.items() if not isinstance(v, dict)}, **d["metrics"]}
            for d in datasets
        ]
        print(format_table(rows, _COLUMNS[args.task]))
        for d in datasets:
            for kind, count in d.get("notices", {}).items():
                print(f"notice: {d['name']}: {count} {kind.replace('_', ' ')} left out")
        print(f"results: {output}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return record


@guarded
def cli(argv: list[str] | None = None) -> int:
    """`python -m alip.eval`: a user error is one `error: ...` line and exit status 2."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
