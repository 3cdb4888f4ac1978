"""`python -m imgpipe_dagster.cli …` runs the same commands as the `imgpipe` script."""

import sys

from imgpipe_dagster.cli import main

sys.exit(main())
