"""`python -m tl_depass` is the `tl-depass` command (see `tl_depass.app.cli`)."""

import sys

from tl_depass.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
