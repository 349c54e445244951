"""Each component of a method's default profile switched off in turn, on compare.py's protocol: where
the default's gain over ITQ comes from (issue 14's ablation), in one run with ITQ beside it.

The components are the shared ones the default profile switches on (the student, the mirror average,
feature blocks, the neighbourhood embedding, the calibrated similarity target, the shared loss
terms), plus the method's own in ``OWN_COMPONENTS``. Each row trains the default with that one
component off, on the protocol's 5,000 training images, and scores the 1,000 queries against the
69,000-image database (an encoder with a tuned backbone encodes the database from images through
Dask, as compare.py does). ITQ runs on the pooled head, the protocol's features, and on the
method's feature blocks when it has them.

    python bench/ablation.py                            # UHGA, the best unsupervised default, 32 bits
    python bench/ablation.py --method nrdh --bits 16 --seed 1

Writes ``results/ablation_{method}_{bits}bits[_seed{N}].json``, ``.md`` and ``.png`` (mAP@all per
row, ITQ's first), after every row, so an interrupted run keeps its rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import _short_commit, measure, row_name, row_summary  # noqa: E402
from machine import machine_info  # noqa: E402

import hashindex  # noqa: E402
from hashindex.backbones import BackboneSpec  # noqa: E402
from hashindex.build import method_backbone  # noqa: E402
from hashindex.methods import METHODS, create_method  # noqa: E402
from hashindex.methods.deep import SHARED_TERMS, DeepHashMethod  # noqa: E402
from hashindex.plots import plot_bars  # noqa: E402

# components of a method's own (not shared by the others) worth a row: {method: {name: params that switch it off}}
OWN_COMPONENTS = {"uhga": {"gradient attention": {"gradient_attention": False}}}


def components(hasher: DeepHashMethod) -> dict[str, dict]:
    """``{component: params that switch it off}`` for what a method's profile switches on."""
    off = {}
    if hasher.student:
        off["student"] = {"student": False}
    if hasher.mirror_average:
        off["mirror average"] = {"mirror_average": False}
    if hasher.feature_blocks is not None:
        off["feature blocks"] = {"feature_blocks": None}
    if hasher.neighbourhood:
        off["neighbourhood"] = {"neighbourhood": False}
    similarity = hasher.config.get("similarity") or "cosine"
    if (similarity if isinstance(similarity, str) else similarity.get("name")) != "cosine":
        off["calibration"] = {"similarity": {"name": "cosine"}}
    for term in SHARED_TERMS:
        if hasher.config["loss_weights"].get(term):
            off[f"{term} term"] = {"loss_weights": {term: 0}}
    off.update(OWN_COMPONENTS.get(hasher.name, {}))
    return off


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="uhga", choices=sorted(m for m in METHODS
                                                                   if issubclass(METHODS[m], DeepHashMethod)))
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="training seed of every row (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers for encoding from images")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    source = hashindex.open_source("fashion-mnist")
    split = hashindex.protocol_split(source, seed=0)
    spec = BackboneSpec("efficientnet-lite0", 64)
    default = create_method(args.method, args.bits)
    if not components(default):
        parser.error(f"{args.method}'s default profile ({default.profile}) switches on no shared component to ablate")
    variants = {"pooled head": ("itq", {})}
    if default.feature_blocks is not None:
        variants["same blocks"] = ("itq", {"feature_blocks": list(default.feature_blocks)})
    variants["default"] = (args.method, {})
    variants.update({f"no {name}": (args.method, params) for name, params in components(default).items()})
    stem = os.path.join(args.out, f"ablation_{args.method}_{args.bits}bits" + (f"_seed{args.seed}" if args.seed else ""))
    os.makedirs(args.out, exist_ok=True)
    caches, rows = {}, []
    for label, (method, params) in variants.items():
        method_spec = method_backbone(method, spec, params)
        if method_spec not in caches:
            caches[method_spec] = hashindex.cached_features(source, method_spec)
        row = measure(source, split, caches[method_spec], spec, method, args.bits, params, seed=args.seed,
                      workers=args.workers)
        row.update({"label": label, "switched": params})
        rows.append(row)
        print(row_summary(row), flush=True)
        write(rows, stem, args, wall)
    print(f"written: {stem}.json, .md and .png ({(time.perf_counter() - wall) / 60:.1f} min)")
    return 0


def write(rows: list[dict], stem: str, args, wall: float) -> None:
    itq = {row_name(r): r["map@all"] for r in rows if r["method"] == "itq"}
    record = {"command": "python bench/ablation.py " + " ".join(sys.argv[1:]), "method": args.method,
              "bits": args.bits, "seed": args.seed, "machine": machine_info(),
              "wall_seconds": round(time.perf_counter() - wall, 1),
              "rows": [{k: v for k, v in r.items() if k not in ("pr", "precision@n")} for r in rows]}
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    ratios = " | ".join(f"× {name}" for name in itq)
    lines = [f"python bench/ablation.py --method {args.method} --bits {args.bits} --seed {args.seed}: one component "
             f"of the default profile off per row; {args.bits} bits, mAP@all over the protocol's 1,000 queries and "
             f"69,000-image database (commit {_short_commit(record['machine']['git_commit'])}).\n",
             f"| row | switched | mAP@all | mAP@1000 | {ratios} | train s |",
             "|---|---|---|---|" + "---|" * len(itq) + "---|"]
    for r in rows:
        cells = " | ".join(f"{r['map@all'] / value:.3f}" for value in itq.values())
        lines.append(f"| {row_name(r)} | `{json.dumps(r['switched'])}` | {r['map@all']:.4f} | {r['map@1000']:.4f} | "
                     f"{cells} | {r['train_seconds']:.1f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_bars({row_name(r): r["map@all"] for r in rows}, stem + ".png",
              title=f"{args.method} ({args.bits} bits): one component off per bar, mAP@all", ylabel="mAP@all")


if __name__ == "__main__":
    sys.exit(main())
