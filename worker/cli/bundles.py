"""``pleura models``: list, verify, pin, sign, build and import model bundles (:mod:`worker.bundles`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worker.settings import Settings

#: engines.backends.KINDS, named here so that parsing the command line imports no engine
BACKEND_KINDS = ("tensorrt", "onnxruntime", "torch")


def cmd_models(settings: Settings, args: argparse.Namespace) -> None:
    """list / verify / pin / sign / build / import model bundles."""
    from engines import BackendUnavailable, BundleError, ParityError
    from worker.bundles import catalogue

    try:
        if args.action == "list":
            rows = catalogue.listing(settings)
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                detail = row.get("error") or f"{row['version']}  {', '.join(row['findings']) or 'no findings'}"
                print(f"{row['name']:<20} {row['origin']:<9} {detail}")
        elif args.action == "verify":
            report = catalogue.verify(settings, args.name, args.backend)
            print(json.dumps(report, indent=2) if args.json else "\n".join(catalogue.describe(report)))
            if not report["passed"]:
                failed = [c["kind"] for c in report["backends"] if c["status"] == "failed"]
                parts = [k for k in ("pins", "signature") if report[k]["status"] == "failed"] + failed
                sys.exit(f"error: bundle verify FAILED ({', '.join(parts) or 'no backend could run here'}); "
                         "it must not serve patients until this passes")
        elif args.action == "pin":
            path, count = catalogue.pin(settings, args.name)
            print(f"pinned {count} files of {path}; sign it again if it is to be trusted")
        elif args.action == "sign":
            path, signer = catalogue.sign(settings, args.name, args.key)
            print(f"signed {path} with key {signer}")
        elif args.action == "build":
            from engines.build import build

            report = build(catalogue.bundle(settings, args.name), backend=args.backend,
                           progress=lambda message: print(message, file=sys.stderr))
            print(report.describe())
        elif args.action == "import":
            from engines.importers import import_model

            out = args.out or settings.effective_models_dir / args.name
            options = {key: _option_value(value) for key, value in (o.split("=", 1) for o in args.option)}
            path = import_model(args.kind, args.source, out, name=args.name, version=args.version,
                                progress=lambda message: print(message, file=sys.stderr), **options)
            print(f"imported {args.kind} model as bundle {args.name} {args.version} at {path}")
    except (ParityError, BundleError, BackendUnavailable, FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")


def _option_value(text: str) -> str | bool:
    """``true``/``false`` become booleans (``allow_pickle=false`` must not read as truthy)."""
    return {"true": True, "false": False}.get(text.lower(), text)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` to the ``pleura`` subcommands."""
    p = sub.add_parser("models", help="model bundles: list, verify, pin, sign, build, import")
    models = p.add_subparsers(dest="action", required=True)
    m = models.add_parser("list", help="built-in and installed bundles")
    m.add_argument("--json", action="store_true")
    m = models.add_parser("verify", help="check the pins, the signature and the parity gate on every backend here")
    m.add_argument("name", help="bundle name or path")
    m.add_argument("--backend", default="all", choices=["all", *BACKEND_KINDS], help="check this backend only")
    m.add_argument("--json", action="store_true")
    m = models.add_parser("pin", help="record the SHA-256 of every file of an installed bundle in its manifest")
    m.add_argument("name", help="bundle name or path")
    m = models.add_parser("sign", help="sign a pinned bundle's manifest with an Ed25519 private key")
    m.add_argument("name", help="bundle name or path")
    m.add_argument("--key", type=Path, required=True, help="PEM private key (openssl genpkey -algorithm ed25519)")
    m = models.add_parser("build", help="prebuild/cache the engine (TensorRT plan) and warm it up")
    m.add_argument("name", help="bundle name or path")
    m.add_argument("--backend", default="auto", help="auto, tensorrt, onnxruntime or torch")
    m = models.add_parser("import", help="make a bundle from an operator-downloaded checkpoint")
    m.add_argument("kind", help="torchxrayvision, dinov2 or open_clip")
    m.add_argument("source", type=Path, help="checkpoint file or folder")
    m.add_argument("--name", required=True)
    m.add_argument("--version", required=True)
    m.add_argument("--out", type=Path, help="bundle directory (default: PLEURA_MODELS_DIR/NAME)")
    m.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="importer-specific option, e.g. prompts=prompts.json")
    p.set_defaults(func=cmd_models)
