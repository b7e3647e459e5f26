import sys

from coreinfer_jax.cli import main

sys.exit(main())
