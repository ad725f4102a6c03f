"""`python -m cli ...` is `sparse-interp ...`."""

import sys

from cli.main import main

sys.exit(main())
