"""Session-wide test setup."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter runs our kernels on the CPU. It must be chosen before the first `import triton` anywhere
    # in the session (backdrop.kernels imports triton), so it is set here rather than in the kernel tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box a descheduled worker thread makes
    every op ~20x slower (measured). Modules opt in with pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory, one_thread):
    """Tiny SD1, SD1-inpainting and SD2-shaped models and their Pipelines (tests/pipeline_helpers.py)."""
    from pipeline_helpers import tiny_models
    return tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def ref(models):
    """ref(model, kind, sampler): the diffusers pipeline over the same folder (tests/pipeline_helpers.py)."""
    from pipeline_helpers import diffusers_ref
    return diffusers_ref(models)


@pytest.fixture(scope="module")
def serve_model_dir(tmp_path_factory):
    """The tiny inpainting model folder the server tests serve (tests/serve_helpers.py)."""
    from serve_helpers import save_tiny_inpaint_model
    return save_tiny_inpaint_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def serve_pipe(serve_model_dir):
    """Its float32 CPU Pipeline."""
    from backdrop.diffusion.pipeline import Pipeline
    return Pipeline.from_pretrained(serve_model_dir, device="cpu", dtype=torch.float32)
