import sys

from coreinfer_jax.tools.cli import main

sys.exit(main())
