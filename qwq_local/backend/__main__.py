"""`python -m qwq_local.backend --probe-extra-bufts MODEL...`: the extra-buffer-type probe child;
`python -m qwq_local.backend --rpc-probe HOST:PORT`: the RPC worker probe child (backend/rpc.py)."""

import sys

if sys.argv[1:2] == ["--rpc-probe"] and len(sys.argv) == 3:
    from .rpc import probe_child_main

    sys.exit(probe_child_main(sys.argv[2]))

from .binding import child_main

sys.exit(child_main(sys.argv[1:]))
