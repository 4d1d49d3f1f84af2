"""forklb's benchmark harness: forklb, nginx and HAProxy side by side.

Run it from the repository root::

    python -m bench                      # every scenario, every proxy, 3 rounds
    python -m bench --quick              # smoke run: 1 round of 3 s
    python -m bench --scenario keepalive-small --proxy forklb,nginx

The modules:

* :mod:`bench.procs`     - starting/stopping processes, CPU/RSS readings from /proc, affinity;
* :mod:`bench.configs`   - the equivalent forklb, nginx and HAProxy configurations;
* :mod:`bench.load`      - load generators (wrk with a Lua reporter, curl upload, idle sockets);
* :mod:`bench.scenarios` - what each scenario runs and measures;
* :mod:`bench.report`    - medians, forklb/nginx ratios, the table and ``results.json``;
* :mod:`bench.sink`      - the upload sink backend (splices request bodies into /dev/null).

Only loopback addresses are used; every process started is stopped by pid.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# tests/harness.py provides free_port, wait_port and kill_tree; reuse them, as lb01.py did.
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
