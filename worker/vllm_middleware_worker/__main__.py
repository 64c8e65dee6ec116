"""`python -m vllm_middleware_worker`: same as `vllm-mw worker`."""

import sys

from ._cli import main

sys.exit(main())
