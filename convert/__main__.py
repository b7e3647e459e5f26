"""`python -m convert [SOURCE] [--revision R] [--out DIR] [--dtype ...] [--force]`; bad input exits 2 with
one `error:` line, an interrupt (Ctrl-C, SIGTERM) 130 or 143 with one line and no partial output."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from convert.core import DTYPES, convert_checkpoint, default_out, is_converted
from convert.sources import BUNDLED, BUNDLED_MODELS
from coreinfer_jax.errors import CoreInferError, interrupted_line, sigterm_interrupts
from coreinfer_jax.paths import output_dir


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert",
                                description="Convert a Hugging Face or GGUF checkpoint for coreinfer_jax.")
    p.add_argument("source", nargs="?", default=None,
                   help=f"Hugging Face checkpoint directory, hub id ORG/NAME, .gguf file, or a bundled model: "
                        f"{', '.join(BUNDLED_MODELS)} (default {BUNDLED})")
    p.add_argument("--revision", default=None, help="hub ids: the branch, tag or commit to convert (default main)")
    p.add_argument("--out", type=output_dir, default=None,
                   help=f"output directory (default for bundled models: {default_out(BUNDLED).parent}/NAME)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="stored parameter dtype")
    p.add_argument("--force", action="store_true", help="replace an earlier checkpoint at --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with sigterm_interrupts():
            source = args.source or BUNDLED
            if source in BUNDLED_MODELS:
                out = args.out or default_out(source)
                if not args.force and is_converted(out, source, args.dtype):
                    print(f"{source} is already converted in {out} (use --force to convert again)")
                    return 0
            out = convert_checkpoint(source, args.out, args.dtype, args.force, args.revision)
    except (CoreInferError, OSError) as e:  # the converter's, the checkpoint's and the paths' errors
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        line, status = interrupted_line(e)
        print(f"error: {line}", file=sys.stderr)
        return status
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
