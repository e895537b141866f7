"""``pleura search``: the nearest studies to a study, an image or a text."""

from __future__ import annotations

import argparse
import json
import sys

from worker.cli.common import command, require_schema
from worker.settings import Settings


def cmd_search(settings: Settings, args: argparse.Namespace) -> None:
    """Nearest studies to a study or image (``--like``), or to a text (bundles with a text side)."""
    from engines import BundleError
    from worker.bundles.catalogue import bundle
    from worker.embeddings import EmbeddingArchive, SearchError
    from worker.ledger.db import Ledger

    ledger = Ledger(settings.effective_database_url)
    require_schema(ledger)
    archive = EmbeddingArchive(ledger, settings.search_ef_search)
    try:
        if args.like:
            result = archive.like(args.like, args.limit, args.offset, args.bundle)
        else:
            result = archive.text(bundle(settings, args.bundle or settings.model), args.text, args.limit, args.offset)
    except (SearchError, BundleError) as exc:
        sys.exit(f"error: {exc}")
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    print(f"backend {archive.describe()}")
    print(f"query {result.query} ({result.query_images} image(s)), bundle {result.bundle_name} "
          f"{result.bundle_version}, results {result.offset + 1}-{result.offset + len(result.hits)}")
    print(f"{'rank':>4}  {'score':>6}  {'study instance uid':<64}  sop instance uid")
    for hit in result.hits:
        print(f"{hit.rank:>4}  {hit.score:>6.3f}  {hit.study_instance_uid:<64}  {hit.sop_instance_uid}")
    if not result.hits:
        print("(no studies)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``search`` to the ``pleura`` subcommands."""
    p = command(sub, "search", "find studies like a given study or image, or a text", cmd_search)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--like", metavar="UID", help="a Study or SOP Instance UID already processed")
    query.add_argument("--text", help="a description (bundles with a text encoder only)")
    p.add_argument("--limit", type=int, default=10, help="results per page (default 10)")
    p.add_argument("--offset", type=int, default=0, help="results to skip (default 0)")
    p.add_argument("--bundle", help="bundle name (default: the query's latest; for --text the configured model)")
    p.add_argument("--json", action="store_true", help="print the result as a JSON document")
