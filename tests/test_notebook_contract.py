"""The committed notebooks follow the notebook contract: one parameters cell of commented literals, no outputs,
no sys.path hacks, a Colab-only install cell."""

from __future__ import annotations

import ast
import io
import json
import tokenize
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
COMMON = {"run_dir", "sync_dir", "seed", "device", "mixed_precision"}


def test_all_four_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_captioning", "02_vae_finetune", "03_sd_finetune", "04_compare"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_commented_literals(path):
    cells = json.loads(path.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    source = "".join(tagged[0]["source"])
    names = set()
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, f"{path.name}: not a plain assignment: {ast.unparse(node)}"
        name = node.targets[0].id
        assert name == name.lower(), f"{path.name}: {name} is not lower_snake_case"
        ast.literal_eval(node.value)  # literals only: no calls, no derived values
        names.add(name)
    assert COMMON <= names, f"{path.name}: missing common parameters {COMMON - names}"
    several = [line for line in source.splitlines() if line.count("=") > 1]
    assert not several, f"{path.name}: papermill cannot parse lines with a second '=' (in the comment): {several}"
    comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    code_lines = [i + 1 for i, line in enumerate(source.splitlines()) if line.strip() and not line.lstrip().startswith("#")]
    missing = [source.splitlines()[i - 1] for i in code_lines if i not in comments]
    assert not missing, f"{path.name}: parameters without a trailing comment: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_sys_path_hacks_and_colab_only_install(path):
    cells = json.loads(path.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "sys.path" not in code
    installs = [c for c in cells if c["cell_type"] == "code" and "pip install" in "".join(c["source"])]
    assert len(installs) == 1 and 'if "google.colab" in sys.modules' in "".join(installs[0]["source"])
