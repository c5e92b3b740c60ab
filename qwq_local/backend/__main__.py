"""`python -m qwq_local.backend --probe-extra-bufts MODEL...`: the extra-buffer-type probe child."""

import sys

from .binding import child_main

sys.exit(child_main(sys.argv[1:]))
