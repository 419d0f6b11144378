"""What a pip user gets: pyproject's extras name this distribution (not PyPI's unrelated `backdrop`), the licence
files it declares exist, and a feature whose extra is missing says which extra to install, before doing any work."""
import importlib.util
from pathlib import Path

import pytest

from backdrop.cli import main
from backdrop.messages import DISTRIBUTION, require

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_extras_and_licence_files():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    extras = project["optional-dependencies"]
    for name, requirements in extras.items():
        for r in requirements:  # an extra of this package names the package itself, under its distribution name
            if r.split("[")[0] in ("backdrop", DISTRIBUTION):
                assert r.startswith(f"{DISTRIBUTION}["), (name, r)
                assert set(r.split("[")[1].rstrip("]").split(",")) <= set(extras), (name, r)
    assert "test" not in str(extras["all"])  # every runtime feature, not the test tools
    assert any(r.startswith(f"{DISTRIBUTION}[serve") for r in extras["ray"])  # the Ray path serves through ours
    for f in project["license-files"]:
        assert (ROOT / f).is_file(), f
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def test_require_names_the_extra(monkeypatch):
    require("x", "serve", "json", "no_such_module_xyz|json")  # present, or one of the alternatives present
    with pytest.raises(ModuleNotFoundError, match=rf"serving needs no_such_module_xyz: pip install "
                                                 rf"'{DISTRIBUTION}\[serve\]'") as e:
        require("serving", "serve", "json", "no_such_module_xyz|other_missing_xyz")
    assert e.value.name == "no_such_module_xyz"


@pytest.mark.parametrize("command,module,extra", [
    (["export", "onnx", "backdrop-tiny", "--out", "{tmp}/onnx"], "onnx", "export"),
    (["serve", "backdrop-tiny", "--port", "0"], "python_multipart", "serve"),
])
def test_a_missing_extra_is_one_line_before_any_work(command, module, extra, monkeypatch, tmp_path, capsys):
    """As if the extra were not installed: the command says which extra to install, exit status 2, no traceback,
    and nothing written."""
    real = importlib.util.find_spec
    gone = {module, "multipart"} if module == "python_multipart" else {module}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a))
    assert main([c.format(tmp=tmp_path) for c in command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"pip install '{DISTRIBUTION}[{extra}]'" in err and module in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_lazy_public_names_are_listed_and_load_model_knows_the_built_in_model():
    import backdrop

    assert {"Pipeline", "load_model", "load_image", "CheckpointError"} <= set(dir(backdrop))
    assert backdrop.load_model("backdrop-tiny").config == backdrop.Pipeline.from_pretrained("backdrop-tiny").config
