"""The test suite (pytest). Imported before any test module and before torch: the environment below
holds for this process and every process the tests start."""

import os

# Every site of every test shares this machine (and, with scripts/test.sh, another test's sites): one
# torch thread per task. With a thread per core in each task, OpenMP's spinning threads of a few
# tasks at once made a 2 s local round take 47 s, and rounds timed out. Sites with torch_threads = 0
# (kits, the CLI) take FLOWERBED_TORCH_THREADS from the environment (flowerbed.warmexec.THREADS_ENV).
for _name in ("FLOWERBED_TORCH_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_name] = "1"
