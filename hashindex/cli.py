"""``hashindex`` command line: every subcommand is a thin layer over the Python API.

User errors print one line ``hashindex: error: …`` and exit 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

from .catalogue import METHOD_SUMMARIES, methods_help
from .errors import HashindexError


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet-lite0", help="backbone name (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="input resolution in pixels (default: %(default)s)")
    p.add_argument("--weights", help="local weights file for torchvision backbones (never downloaded)")


def _feature_blocks(text: str) -> list[int] | str:
    if text == "head":
        return text
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers like 10,12,14 or 'head', got {text!r}") from None


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="folder, list file, IDX folder, CIFAR folder, 'digits', "
                   "'fashion-mnist' (or an fsspec URL of a folder or list file)")
    p.add_argument("--root", help="folder that a list file's paths are relative to")
    p.add_argument("--extensions", metavar="EXT,EXT", help="folder sources: list only these file types, e.g. "
                   "jpg,png (default: every still-image format Pillow reads, GIF's first frame included)")


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="the backbone's arithmetic (default: the encoder's own, fp32 unless set): bf16 on a CPU "
                        "with native bfloat16 (~1.7x faster here) or a GPU, fp16 on a GPU. Part of the "
                        "encoder's id, so indexes of different precisions are never mixed")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", help="address of a running Dask scheduler (default: start a LocalCluster)")
    p.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per core)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hashindex", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an encoder on a source's images",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="methods (--method):\n" + methods_help() + "\n\ndeep methods (uhga dpfah nrdh lagnh "
                              "ucsh) take --profile, --config, --epochs and --mode;\nprofiles and their settings: "
                              "README, section 'Methods'.")
    p.add_argument("--method", required=True, choices=tuple(METHOD_SUMMARIES), metavar="METHOD",
                   help="hashing method: " + ", ".join(METHOD_SUMMARIES) + " (listed below)")
    p.add_argument("--bits", type=int, default=32, help="code length, a multiple of 8 (default: %(default)s)")
    _add_source_args(p)
    p.add_argument("--sample", type=int, help="train on this many randomly drawn images (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", help="deep methods: a named parameter set of the method's config: 'paper' (the paper's "
                        "own settings), 'head-cpu', 'frozen' (default: the method's default_profile, 'frozen'; "
                        "'paper' in finetune mode)")
    p.add_argument("--config", help="deep methods: JSON file of parameters overriding the profile")
    p.add_argument("--epochs", type=int, help="deep methods: override the number of training epochs")
    p.add_argument("--feature-blocks", metavar="N,N,…|head", type=_feature_blocks,
                   help="train and encode on the pooled outputs of these backbone blocks instead of the pooled "
                        "head, e.g. 10,12,14 (the default of uhga, nrdh and ucsh), or 'head' (default of the others)")
    p.add_argument("--mode", choices=("head", "finetune"), default="head",
                   help="head: train on cached features of the frozen backbone (default); finetune: train "
                        "the backbone end to end too (deep methods; slow on a CPU)")
    p.add_argument("--tags", metavar="FILE", help="lagnh: user tags, lines 'ID 0 1 0 …' (default: the "
                   "backbone's ImageNet predictions)")
    p.add_argument("--validation", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this fraction of the training images and report their mAP (default: 0)")
    p.add_argument("--cache-dir", help="feature cache folder (default: $HASHINDEX_CACHE or ~/.cache/hashindex)")
    p.add_argument("--out", required=True, help="encoder file to write")
    _add_backbone_args(p)
    _add_cluster_args(p)

    p = sub.add_parser("encode", help="encode a source into a Zarr index with Dask")
    p.add_argument("--encoder", required=True, help="encoder file")
    _add_source_args(p)
    p.add_argument("--out", required=True, help="index folder or fsspec URL")
    p.add_argument("--chunk-rows", type=int, help="images per task and Zarr chunk (default: 4096, fewer for small sources)")
    _add_precision_arg(p)
    _add_cluster_args(p)

    p = sub.add_parser("update", help="bring an index up to date with its source (the nightly job)")
    p.add_argument("--encoder", required=True, help="encoder file (a different encoder re-encodes everything)")
    _add_source_args(p)
    p.add_argument("--out", required=True, help="index folder or fsspec URL (created when missing)")
    p.add_argument("--keep", type=int, default=3, help="complete versions to keep (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, help="images per task for a new index (an update keeps the index's)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    _add_precision_arg(p)
    _add_cluster_args(p)

    p = sub.add_parser("query", help="search an index")
    p.add_argument("index")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", metavar="PATH", help="image files, encoded with the index's encoder")
    what.add_argument("--code", nargs="+", metavar="HEX", help="codes as hex strings of bits/4 digits")
    what.add_argument("--id", nargs="+", metavar="ID", help="ids of images in the index")
    p.add_argument("-k", type=int, default=10, help="number of neighbours (default: %(default)s)")
    p.add_argument("--radius", type=int, help="return every row within this Hamming distance instead of k")
    p.add_argument("--searcher", choices=("auto", "numpy", "linear", "mih", "mih-compact"), default="auto",
                   help="numpy scan, numba linear scan, multi-index hashing (compact: ids-only tables, "
                        "less memory, slower), or chosen by cost (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--show", metavar="PNG", help="write a contact sheet: per query, its image and its results' "
                   "thumbnails with rank, distance and id (read from the index's source)")
    p.add_argument("--source", help="with --show: where the images are, if not where the index was built from")
    p.add_argument("--root", help="with --show and a list file --source: the folder its paths are relative to")

    p = sub.add_parser("info", help="describe an index")
    p.add_argument("index")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="retrieval quality of query codes against a database index (both labelled)")
    p.add_argument("index", help="database index")
    p.add_argument("queries", help="index holding the query codes and labels")
    p.add_argument("--topk", type=int, default=1000, help="k of mAP@k besides mAP@all (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plots", metavar="DIR", help="write eval.json (every metric and curve) and, beside it, "
                   "pr_radius.png (precision-recall over Hamming radius) and precision_at_n.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except HashindexError as exc:
        print(f"hashindex: error: {exc}", file=sys.stderr)
        # a failed Zarr read leaves zarr's sibling chunk reads pending; asyncio would log each one at
        # exit ("Task was destroyed but it is pending!") under the one error that explains them
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("hashindex: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- commands
def _train(args) -> None:
    from .backbones import BackboneSpec
    from .build import train_encoder
    from .sources import open_source, read_tags

    source = open_source(args.source, root=args.root, extensions=args.extensions)
    if args.sample:
        if args.sample > len(source):
            raise HashindexError(f"--sample {args.sample} is more than the {len(source)} images of {args.source}")
        rows = np.sort(np.random.default_rng(args.seed).choice(len(source), args.sample, replace=False))
        source = source.subset(rows)
    spec = BackboneSpec(args.backbone, args.image_size, args.weights)
    params = {k: v for k, v in (("profile", args.profile), ("config", args.config), ("epochs", args.epochs))
              if v is not None}
    if args.feature_blocks is not None:
        params["feature_blocks"] = None if args.feature_blocks == "head" else args.feature_blocks
    tags = None
    if args.tags:
        if args.method != "lagnh":
            raise HashindexError(f"--tags is for lagnh; {args.method} uses no tags")
        tags = read_tags(args.tags, list(source.ids))
    started = time.perf_counter()
    encoder = train_encoder(source, args.method, args.bits, backbone=spec, seed=args.seed, params=params,
                            mode=args.mode, tags=tags, validation=args.validation, cache_dir=args.cache_dir,
                            scheduler=args.scheduler, n_workers=args.workers)
    encoder.save(args.out)
    print(f"{encoder} trained ({args.mode} mode) on {encoder.training['images']:,} images in "
          f"{time.perf_counter() - started:.1f} s → {args.out}")
    if "validation" in encoder.training:
        print(f"validation: {encoder.training['validation']}")


def _encode(args) -> None:
    from .indexing import encode
    from .sources import open_source

    encoder = _job_encoder(args)
    source = open_source(args.source, root=args.root, extensions=args.extensions)
    started = time.perf_counter()
    index = encode(source, encoder, args.out, chunk_rows=args.chunk_rows, scheduler=args.scheduler,
                   n_workers=args.workers)
    print(f"{index.attrs['valid']:,} images encoded, {index.attrs['rejected']:,} rejected, "
          f"in {time.perf_counter() - started:.1f} s → {args.out} (version {index.version})")
    for image_id, reason in index.rejects[:20]:
        print(f"  rejected {image_id}: {reason}")
    if len(index.rejects) > 20:
        print(f"  … and {len(index.rejects) - 20} more (hashindex info {args.out} --json)")


def _job_encoder(args):
    """The encoder of an encode or update job: read without torch, unless --precision makes a new one."""
    from .encoder_file import EncoderFile

    encoder = EncoderFile.read(args.encoder)
    if args.precision and args.precision != encoder.config.get("precision", "fp32"):
        return encoder.load().with_precision(args.precision)
    return encoder


def _update(args) -> None:
    from .sources import open_source
    from .update import update

    encoder = _job_encoder(args)
    source = open_source(args.source, root=args.root, extensions=args.extensions)
    result = update(source, encoder, args.out, keep=args.keep, chunk_rows=args.chunk_rows,
                    scheduler=args.scheduler, n_workers=args.workers)
    if args.json:
        print(json.dumps({"action": result.action, "version": result.index.version, "added": result.added,
                          "changed": result.changed, "removed": result.removed, "unchanged": result.unchanged,
                          "rejected": result.rejected, "seconds": round(result.seconds, 2),
                          "pruned": result.pruned}, indent=1))
        return
    print(result.summary())
    for name in result.pruned:
        print(f"  deleted old version {name}")


def parse_hex_codes(codes: list[str], bits: int) -> np.ndarray:
    """Hex strings → packed uint8 codes, each exactly ``bits`` long."""
    out = []
    for text in codes:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise HashindexError(f"code {text!r} is not hexadecimal") from None
        if len(raw) * 8 != bits:
            raise HashindexError(f"code {text!r} has {len(raw) * 8} bits, the index has {bits} "
                                 f"({bits // 4} hex digits)")
        out.append(np.frombuffer(raw, dtype=np.uint8))
    return np.stack(out)


def _query(args) -> None:
    from .index import open as open_index

    if args.radius is None and args.k <= 0:
        raise HashindexError(f"-k must be at least 1, got {args.k}")
    if args.radius is not None and args.radius < 0:
        raise HashindexError(f"--radius must be 0 or more, got {args.radius}")
    index = open_index(args.index, searcher=args.searcher, warm=False)  # one-off: nothing to warm
    if args.code:
        names, codes = args.code, parse_hex_codes(args.code, index.bits)
    elif args.id:
        names, codes = args.id, index.codes[index.rows_of(args.id)]
    else:
        if index.encoder is None:
            raise HashindexError(f"{args.index}: this index holds no encoder; query it with --code or --id")
        from .indexing import encode_images  # torch and dask: only a query by image needs them

        names, codes = args.image, encode_images(index.encoder, args.image)
    if args.radius is not None:
        lims, dist, rows = index.radius_search(codes, args.radius)
        results = [(dist[lims[q]:lims[q + 1]], rows[lims[q]:lims[q + 1]]) for q in range(len(codes))]
    else:
        dist, rows = index.search(codes, args.k)
        results = [(dist[q][rows[q] >= 0], rows[q][rows[q] >= 0]) for q in range(len(codes))]
    found = np.concatenate([rq for _, rq in results]) if results else np.empty(0, np.int64)
    ids = dict(zip(found.tolist(), index.ids_at(found)))  # only the returned rows' ids are read
    report = [{"query": name, "code": code.tobytes().hex(),
               "results": [{"rank": r + 1, "distance": int(d), "id": ids[int(i)], "row": int(i)}
                           for r, (d, i) in enumerate(zip(dq, rq))]}
              for name, code, (dq, rq) in zip(names, codes, results)]
    if args.show:
        print(f"contact sheet → {_contact_sheet(index, args, codes, report)}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for item in report:
        print(f"query {item['query']} (code {item['code']}): {len(item['results'])} results")
        for hit in item["results"]:
            print(f"  {hit['rank']:>4}  d={hit['distance']:<4} {hit['id']}")


SHEET_RESULTS = 50  # thumbnails per query at most (a --radius search may return thousands)


def _contact_sheet(index, args, codes: np.ndarray, report: list[dict]) -> str:
    from .images import ImageError, decode_image
    from .plots import contact_sheet
    from .sources import SourceError, open_source, read_by_id

    spec = open_source(args.source, root=args.root).spec() if args.source else index.attrs.get("source_spec")
    if spec is None:
        raise HashindexError(f"{args.index}: this index does not record where its images are "
                             "(built before it did, or by write_index); give --source with --show")
    wanted = list(dict.fromkeys(hit["id"] for item in report for hit in item["results"][:SHEET_RESULTS]))
    if args.id:
        wanted = list(dict.fromkeys([*args.id, *wanted]))
    pixels = {}
    if wanted:
        try:
            decoded = read_by_id(spec, wanted)
        except (SourceError, OSError) as exc:
            raise HashindexError(f"--show: cannot read the images of {spec.get('location')}: {exc}") from None
        pixels = dict(zip([i for i, ok in zip(wanted, decoded.ok) if ok], decoded.pixels))
    rows = []
    for q, item in enumerate(report):
        if args.image:
            try:
                with open(args.image[q], "rb") as f:
                    query_pixels = decode_image(f.read())
            except (OSError, ImageError):
                query_pixels = None
        else:
            query_pixels = pixels.get(item["query"]) if args.id else None
        label = item["query"] if not args.code else codes[q].tobytes().hex()
        tiles = [(query_pixels, ["query", label], True)]
        tiles += [(pixels.get(hit["id"]), [f"#{hit['rank']}  d={hit['distance']}", hit["id"]], False)
                  for hit in item["results"][:SHEET_RESULTS]]
        rows.append(tiles)
    return str(contact_sheet(rows, args.show))


def _info(args) -> None:
    from .index import open as open_index

    index = open_index(args.index, warm=False)
    info = index.info()
    rejects = index.rejects
    if args.json:
        print(json.dumps({**info, "rejects": [{"id": i, "reason": r} for i, r in rejects]}, indent=1, default=str))
        return
    config = info.get("encoder_config") or {}
    backbone = config.get("backbone") or {}
    print(f"index     {info['path']}  (version {info['version']})")
    print(f"rows      {info['rows']:,}  searchable {info['searchable']:,}  rejected {len(rejects):,}  "
          f"removed {int(index.removed.sum()):,}")
    print(f"bits      {info['bits']}  searcher {info['searcher']}")
    if config:
        print(f"encoder   {info.get('encoder_id')}  method {config.get('method')}  backbone "
              f"{backbone.get('name')} @ {backbone.get('image_size')} px")
    print(f"source    {info.get('source', '?')}")
    print(f"created   {info.get('created')}  finished {info.get('finished')}")
    if info["versions"]:
        print("versions  (newest first; * = published)")
        for v in info["versions"]:
            state = "" if v["complete"] else "  (unfinished build)"
            print(f"  {'*' if v['current'] else ' '} {v['name']}  {v['finished'] or v['created'] or '?'}  "
                  f"rows {v['rows'] if v['rows'] is not None else '?':,}  removed {v['removed'] or 0:,}  "
                  f"encoder {v['encoder_id']}{state}")


def _eval(args) -> None:
    from . import metrics
    from .index import open as open_index

    database, queries = open_index(args.index, warm=False), open_index(args.queries, warm=False)
    for name, idx in (("database", database), ("queries", queries)):
        if idx.labels is None:
            raise HashindexError(f"{idx.path}: the {name} index has no labels to evaluate with")
    if database.bits != queries.bits:
        raise HashindexError(f"the query index has {queries.bits}-bit codes, the database {database.bits}")
    qv, dv = queries.searchable, database.searchable
    result = metrics.evaluate(queries.codes[qv], database.codes[dv], queries.labels[qv], database.labels[dv],
                              topks=(None, args.topk))
    summary = {"queries": int(qv.sum()), "database": int(dv.sum()), "bits": database.bits,
               "map@all": result["map@all"], f"map@{args.topk}": result[f"map@{args.topk}"],
               "precision@r2": result["precision@r2"]}
    if args.plots:
        from pathlib import Path

        from .plots import plot_pr_curves, plot_precision_at_n

        folder = Path(args.plots)
        folder.mkdir(parents=True, exist_ok=True)
        label = f"{database.attrs.get('encoder_config', {}).get('method', 'codes')} {database.bits} bits"
        (folder / "eval.json").write_text(json.dumps(
            {**summary, "index": database.path, "queries_index": queries.path,
             "precision@n": result["precision@n"], "pr": result["pr"]}, indent=1, default=_plain))
        plot_pr_curves({label: result["pr"]}, folder / "pr_radius.png",
                       f"Precision-recall over Hamming radius ({summary['queries']:,} queries)")
        plot_precision_at_n({label: result["precision@n"]}, folder / "precision_at_n.png",
                            f"Precision@N ({summary['queries']:,} queries)")
        print(f"plots → {folder}/pr_radius.png, {folder}/precision_at_n.png (data: {folder}/eval.json)",
              file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({**summary, "precision@n": result["precision@n"]}, indent=1, default=float))
    else:
        for key, value in summary.items():
            print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")


def _plain(value):
    """JSON for numpy arrays and scalars."""
    return value.tolist() if isinstance(value, np.ndarray) else float(value)


COMMANDS = {"train": _train, "encode": _encode, "update": _update, "query": _query, "info": _info, "eval": _eval}

if __name__ == "__main__":
    sys.exit(main())
