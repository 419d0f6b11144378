"""Session-wide test setup."""
import os

import torch

if not torch.cuda.is_available():
    # Triton's interpreter runs our kernels on the CPU. It must be chosen before the first `import triton` anywhere
    # in the session (backdrop.kernels imports triton), so it is set here rather than in the kernel tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")
