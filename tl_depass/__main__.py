"""`python -m tl_depass` is the `tl-depass` command (see `tl_depass.cli`)."""

import sys

from tl_depass.cli import main

if __name__ == "__main__":
    sys.exit(main())
