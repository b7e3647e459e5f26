"""`python -m convert [SOURCE] [--out DIR] [--dtype ...] [--force]`; bad input exits 2 with one `error:` line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from convert.core import DTYPES, convert_checkpoint, default_out, is_converted
from convert.errors import ConversionError
from convert.sources import BUNDLED
from coreinfer_jax.models.checkpoint import CheckpointError
from coreinfer_jax.models.config import ConfigError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m convert",
                                description="Convert a Hugging Face or GGUF checkpoint for coreinfer_jax.")
    p.add_argument("source", nargs="?", default=None,
                   help=f"Hugging Face checkpoint directory, .gguf file, or {BUNDLED!r} (the default)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default for {BUNDLED}: {default_out(BUNDLED)})")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="stored parameter dtype")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.source is None:
            out = args.out or default_out(BUNDLED)
            if not args.force and is_converted(out, BUNDLED, args.dtype):
                print(f"{BUNDLED} is already converted in {out} (use --force to convert again)")
                return 0
        out = convert_checkpoint(args.source or BUNDLED, args.out, args.dtype, args.force)
    except (ConversionError, ConfigError, CheckpointError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
