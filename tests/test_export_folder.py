"""What an export folder may be and what may replace it: export_onnx refuses, in one line and before any work,
bad options and an --out it would damage (another folder's files, graphs of an earlier export it would drop, files
put beside an export since: notes, TensorRT engines); the onnxruntime backend names what it cannot run (a missing
or damaged graph file, a model folder, an Optimum folder) with a command that can be followed.
"""
import shutil
from pathlib import Path

import pytest
import torch

from backdrop.export import onnx as E
from backdrop.export.ort_backend import OnnxRuntimeBackend
from backdrop.nn.checkpoint import init_model

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory, one_thread) -> Path:
    return E.export_onnx(init_model("tiny", seed=1), tmp_path_factory.mktemp("export") / "onnx", progress=False)


@pytest.mark.parametrize("args, message", [
    (["--size", "0x0"], "--size 0x0: sides must be at least 8 px"),      # was a deep trace error minutes later
    (["--size", "-64"], "--size -64: sides must be at least 8 px"),      # was a traceback
    (["--components", "unet", "vae"], "--components vae: choose from"),
    (["--opset", "13"], "--opset 13: choose 17 to 20"),
    (["--out", "FILE"], "exists and is not a Backdrop ONNX export"),
    # an earlier export with files put there since: named, not deleted by the swap
    (["--out", "KEEP"], "--out {tmp}/KEEP: holds NOTES.txt, trt/, unet/extra.bin besides a Backdrop ONNX export; "
                        "replacing the folder would delete them"),
    # filesystem errors name --out and the path given, not a temporary folder (were raw OSErrors after loading)
    (["--out", "FILE/sub"], "--out {tmp}/FILE/sub: {tmp}/FILE is a file, not a folder"),
    (["--out", "/proc/backdrop-export"], "--out /proc/backdrop-export: cannot write there (No such file"),
])
def test_cli_bad_options_are_one_line_before_any_work(args, message, tmp_path, capsys):
    from backdrop.cli import main

    (tmp_path / "FILE").write_text("x")
    keep = tmp_path / "KEEP"
    for name in ("scheduler", "trt", "unet", "tokenizer"):
        (keep / name).mkdir(parents=True)
    for name, text in ((E.MANIFEST, '{"format": 1, "components": {"unet": {}}}'), ("NOTES.txt", "mine"),
                       ("trt/unet.plan", "engine"), ("unet/model.onnx", ""), ("unet/extra.bin", ""),
                       ("scheduler/scheduler_config.json", "{}"), ("tokenizer/vocab.json", "{}")):
        (keep / name).write_text(text)
    before = sorted(keep.rglob("*"))
    args = [str(tmp_path / a) if a.split("/")[0] in ("FILE", "KEEP") else a for a in args]
    # a model that does not exist: every refusal here comes before loading it
    assert main(["export", "onnx", str(tmp_path / "no-model"), "--out", str(tmp_path / "onnx"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(tmp=tmp_path) in err[0], err
    assert sorted(keep.rglob("*")) == before


def test_a_smaller_export_does_not_drop_graphs_of_an_earlier_one(tmp_path, capsys):
    from backdrop.cli import main

    out = tmp_path / "onnx"
    out.mkdir()
    (out / E.MANIFEST).write_text('{"format": 1, "components": {"text_encoder": {}, "unet": {}}}')
    assert main(["export", "onnx", "backdrop-tiny", "--out", str(out), "--components", "text_encoder"]) == 2
    assert "with unet too, which writing only text_encoder would delete" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [E.MANIFEST]


def test_export_onnx_never_deletes_files_it_did_not_write(export_folder, tmp_path):
    """export_onnx over an earlier export holding a TensorRT build and notes refuses before any work."""
    out = shutil.copytree(export_folder, tmp_path / "onnx")
    (out / "trt").mkdir()
    (out / "trt" / "unet.plan").write_text("engine")
    (out / "NOTES.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"onnx: holds NOTES.txt, trt/ besides a Backdrop ONNX export"):
        E.export_onnx(init_model("tiny", seed=1), out, progress=False)
    assert (out / "trt" / "unet.plan").is_file() and E.load_export(out).files


def _missing_unet_graph(folder: Path) -> None:
    (folder / "unet" / "model.onnx").unlink()


def _optimum_folder(folder: Path) -> None:
    shutil.rmtree(folder)
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "ORTStableDiffusionPipeline"}')
    (folder / "unet" / "model.onnx").write_text("")


def _model_folder(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')


@pytest.mark.parametrize("damage, message", [
    # a graph the manifest lists but the folder lacks is named by path (was "no unet graph (it holds ... unet")
    (_missing_unet_graph, "{d}/unet/model.onnx is missing; the export is incomplete: export again"),
    # hints that can be followed: never `--out` into the folder given (refused: it is not an export)
    (_model_folder, "{d}: a model, not a Backdrop ONNX export; export it with `backdrop export onnx {d} --out "
                    "{d}-onnx`"),
    (_optimum_folder, "{d}: an Optimum ONNX folder (ORTStableDiffusionPipeline), which Backdrop does not run; "
                      "export the diffusers model it came from with `backdrop export onnx MODEL --out {d}-backdrop`"),
    (shutil.rmtree, "{d}: not a Backdrop ONNX export (no backdrop_export.json); make one with "
                    "`backdrop export onnx MODEL --out {d}`"),
])
def test_folders_the_backend_cannot_run_are_named(export_folder, tmp_path, damage, message):
    folder = shutil.copytree(export_folder, tmp_path / "onnx")
    damage(folder)
    with pytest.raises(FileNotFoundError) as e:
        OnnxRuntimeBackend(folder)
    assert str(e.value) == message.format(d=folder)


def test_a_built_in_model_given_as_an_export_is_told_to_export_outside_the_package():
    from backdrop.nn.resolve import builtin_models

    with pytest.raises(FileNotFoundError, match=r"a built-in model, not a Backdrop ONNX export; export it with "
                                                r"`backdrop export onnx backdrop-tiny --out backdrop-tiny-onnx`"):
        OnnxRuntimeBackend(builtin_models()["backdrop-tiny"])


def test_a_damaged_graph_file_is_one_error_naming_it(export_folder, tmp_path, capsys):
    from backdrop.cli import main

    broken = shutil.copytree(export_folder, tmp_path / "broken")
    graph = broken / "unet" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:2000])  # an interrupted copy
    with pytest.raises(ValueError, match=r"unet/model.onnx: onnxruntime cannot load this graph .*export the model"):
        OnnxRuntimeBackend(broken)
    assert main(["generate", "--model", str(broken), "--backend", "onnxruntime", "--prompt", "x",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unet/model.onnx: onnxruntime cannot load this graph" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    from backdrop.cli import main

    assert main(["export", "onnx", "backdrop-tiny", "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err  # was an AssertionError
