"""`backdrop generate | img2img | inpaint --adapter DIR --adapter-image IMAGE [--adapter-scale S]`: the PNG the
command writes is the image the Pipeline makes with the same T2I-Adapters and scales, its `parameters` record them,
and every misuse is one line on stderr with exit status 2 (no traceback)."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline_helpers import cli_files
from test_controlnet_cli import PROMPT, cli, png
from test_t2i_pipeline import FULL, LIGHT, adapter_folder, sketches

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_thread):
    """The tiny SD1 and SD1-inpainting models, two adapters that fit them, one that does not, sketches (one not of
    the output's size), a product photo and its mask."""
    from dataclasses import replace

    root = tmp_path_factory.mktemp("t2i-cli")
    out = cli_files(root)
    out |= {"full": adapter_folder(FULL, root / "full", 1)[0], "light": adapter_folder(LIGHT, root / "light", 2)[0],
            "wrong": adapter_folder(replace(FULL, channels=(48, 64)), root / "wrong", 3)[0]}
    for name, seed, size in (("sketch-a", 1, (64, 64)), ("sketch-b", 2, (40, 56))):
        sketches(1, seed=seed)[0].resize(size[::-1]).save(root / f"{name}.png")
        out[name] = str(root / f"{name}.png")
    return out


def api(folder, kind: str, adapters: list[str], *args, **kwargs) -> list[np.ndarray]:
    from backdrop.diffusion.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32, adapter=adapters)
    out = getattr(pipe, kind)(*args, prompt=PROMPT, steps=3, progress=False, **kwargs).images
    return [np.asarray(im) for im in out]


def test_generate_with_an_adapter_is_the_pipelines_image(files, capsys, tmp_path):
    code, [path], err = cli(capsys, "generate", "--seed", "5", "--adapter", files["full"], "--adapter-image",
                            files["sketch-b"], "--adapter-scale", "0.7", model=files["tiny"], out=tmp_path)
    assert code == 0 and err == ""
    got, text = png(path)
    sketch = Image.open(files["sketch-b"])
    assert np.array_equal(got, api(files["tiny"], "generate", [files["full"]], seed=5, adapter_image=sketch,
                                   adapter_conditioning_scale=0.7)[0])
    assert not np.array_equal(got, api(files["tiny"], "generate", [], seed=5)[0])
    assert re.search(rf'T2I-Adapter: "{re.escape(files["full"])}:0.7", Adapter image: {re.escape(files["sketch-b"])}',
                     text), text


def test_inpaint_with_two_adapters_keeps_the_product(files, capsys, tmp_path):
    code, [path], err = cli(capsys, "inpaint", files["product"], "--product-mask", files["mask"], "--seed", "3",
                            "--adapter", files["full"], "--adapter", files["light"], "--adapter-image",
                            files["sketch-a"], "--adapter-image", files["sketch-b"], "--adapter-scale", "0.5",
                            "--adapter-scale", "1.5", model=files["tiny-inpaint"], out=tmp_path)
    assert code == 0 and err == "", err
    got, _ = png(path)
    images = [Image.open(files["sketch-a"]), Image.open(files["sketch-b"])]
    want = api(files["tiny-inpaint"], "inpaint", [files["full"], files["light"]], Image.open(files["product"]),
               product_mask=Image.open(files["mask"]), seed=3, adapter_image=images,
               adapter_conditioning_scale=[0.5, 1.5])[0]
    assert np.array_equal(got, want)
    keep = np.asarray(Image.open(files["mask"])) == 255
    assert np.array_equal(got[keep], np.asarray(Image.open(files["product"]))[keep])


def test_misuse_is_one_line(files, capsys, tmp_path):
    def fails(*argv, model=files["tiny"]) -> str:
        code, _, err = cli(capsys, "generate", *argv, model=model, out=tmp_path)
        assert code == 2 and "\n" not in err and "Traceback" not in err, err
        return err

    assert "1 --adapter and 0 --adapter-image" in fails("--adapter", files["full"])
    assert "0 --adapter and 1 --adapter-image" in fails("--adapter-image", files["sketch-a"])
    assert "--adapter-scale is an option of --adapter, which is not given" in fails("--adapter-scale", "0.5")
    assert "--adapter-scale is given 2 times for 1 --adapter" in fails(
        "--adapter", files["full"], "--adapter-image", files["sketch-a"], "--adapter-scale", "1",
        "--adapter-scale", "2")
    assert "--adapter-scale" in fails("--adapter", files["full"], "--adapter-image", files["sketch-a"],
                                      "--adapter-scale", "nan")
    gone = tmp_path / "gone"
    assert f"--adapter {gone}: no such folder" in fails("--adapter", gone, "--adapter-image", files["sketch-a"])
    assert f"--adapter {files['wrong']}: T2I-Adapter 0: features of [48, 64] channels do not fit" in fails(
        "--adapter", files["wrong"], "--adapter-image", files["sketch-a"])
    assert "--adapter-image" in fails("--adapter", files["full"], "--adapter-image", tmp_path / "nope.png")
