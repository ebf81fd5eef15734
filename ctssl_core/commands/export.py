"""`ctssl export`: a pretrained encoder as safetensors + a JSON card, ready to share."""

from __future__ import annotations

HELP = ("export a run's encoder as safetensors plus a JSON card (strategy, config, data, metrics); a torchvision-"
        "shaped ResNet also as encoder.torchvision.safetensors (torchvision/timm key names)")


def add_arguments(p) -> None:
    p.add_argument("run_id", metavar="RUN_ID", help="a run id in the store, a run folder or a checkpoint file")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write encoder.safetensors and card.json into")
    p.add_argument("--store", default=None, help="store folder (default: $CTSSL_STORE or data/store)")


def run(args) -> int:
    from ctssl_core.export import export_run

    import json

    weights, card = export_run(args.run_id, args.out, store_root=args.store)
    print(f"wrote {weights}")
    interop = json.loads(card.read_text())["interop"]
    if interop["file"]:
        print(f"wrote {weights.parent / interop['file']} (torchvision/timm key names; "
              f"load: {interop['timm']['load']})")
    else:
        print(f"no torchvision/timm weights: {interop['reason']}")
    print(f"wrote {card}")
    return 0
