"""Write the compose stack's secret files with fresh random passwords.

    python3 docker/make_secrets.py              # docker/secrets/, once, before the first `docker compose up`
    python3 docker/make_secrets.py --out DIR    # somewhere else

Each password appears in two files that must agree (the server's and the client's URL), so the
files are written together or not at all: existing files are never overwritten. PostgreSQL and
RabbitMQ take their password at the first start of their volume only; changing one later is the
procedure in docs/operations.md ("Secrets"). Standard library only: runs with any python3 >= 3.9.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "secrets"
DB_USER = "pleura"
BROKER_USER = "pleura"


def secret_files(db: str, broker: str, orthanc_admin: str, orthanc_viewer: str) -> dict[str, str]:
    """File name -> content, for these passwords (URL-safe: no quoting needed anywhere)."""
    viewer_basic = base64.b64encode(f"viewer:{orthanc_viewer}".encode()).decode()
    return {
        "postgres_password": f"{db}\n",
        "pleura_database_url": f"postgresql+psycopg2://{DB_USER}:{db}@postgres:5432/pleura\n",
        "rabbitmq_defaults.conf": f"default_user = {BROKER_USER}\ndefault_pass = {broker}\n",
        "pleura_broker_url": f"amqp://{BROKER_USER}:{broker}@rabbitmq:5672//\n",
        "orthanc_users.json": json.dumps({"admin": orthanc_admin, "viewer": orthanc_viewer}) + "\n",
        "ohif_orthanc_auth.conf": f'proxy_set_header Authorization "Basic {viewer_basic}";\n',
    }


def write_secrets(out: Path) -> list[Path]:
    """Create every secret file in ``out`` (mode 0644 in a 0700 folder); refuse if any already exists."""
    files = secret_files(*(secrets.token_urlsafe(24) for _ in range(4)))
    present = sorted(name for name in files if (out / name).exists())
    if present:
        raise FileExistsError(
            f"{out} already holds {', '.join(present)}; secrets are written all together or not at all "
            "(see docs/operations.md, Secrets, to change a password)"
        )
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)  # the host's other users stay out ...
    written = []
    for name, content in files.items():
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # ... containers' own users read
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        written = write_secrets(args.out)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print("Orthanc's web login: user 'admin', password in orthanc_users.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
