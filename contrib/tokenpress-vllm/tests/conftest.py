"""The test engines need vLLM's CPU settings before anything of vLLM is imported."""

import os

from reference import CPU_ENV

os.environ.update(CPU_ENV)
