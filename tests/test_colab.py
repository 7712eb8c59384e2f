"""The Colab entry: the notebooks' badges and install cells are the ones tools/colab.py writes from the home declared in
pyproject.toml, no file names an address someone else owns, the install cell does what it says on Colab, and
installing `sdnb[colab]` over Colab's preinstalled packages replaces none of them (a pip dry run against Colab's
published `pip freeze`)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("colab_tool", ROOT / "tools" / "colab.py")
colab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(colab)

# Files a user reads or installs from. Addresses that must be the project's own: Colab links, pip's `git+` sources,
# and any repository named sdnb.
PUBLIC_FILES = [*sorted((ROOT / "notebooks").glob("*.ipynb")), ROOT / "README.md", ROOT / "pyproject.toml",
                ROOT / "requirements.txt"]
OWN_ADDRESS = re.compile(r"colab\.research\.google\.com/github/[^\s)\"'\\]+|git\+https?://[^\s)\"'\\]+|"
                         r"https?://[\w.-]+/[\w.-]+/sdnb\b[^\s)\"'\\]*|github\.com/sdnb\b")
# written to a temporary copy only: a home for the tests of the badge (not a committed address)
TEST_HOME = "https://github.com/owner-of-a-test-copy/sdnb"


def test_notebooks_carry_the_cells_the_script_writes():
    stale = colab.update(check=True)
    assert not stale, f"{stale}: badge or install cell out of date; run `python tools/colab.py` and commit"


def test_no_file_names_an_address_someone_else_owns():
    home = colab.home()
    found = {}
    for path in PUBLIC_FILES:
        for address in OWN_ADDRESS.findall(path.read_text()):
            if "<you>" in address or (home and home.removeprefix("https://") in address):
                continue  # a placeholder the user fills in, or the declared home
            found.setdefault(path.name, []).append(address)
    assert not found, f"addresses that are not the project's declared home ({home}): {found}"


def test_a_home_gives_badges_and_installs_from_it_and_leaves_other_cells_alone(tmp_path):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", notebooks)
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    pyproject.write_text(text.replace("[project.urls]\n", f'[project.urls]\nRepository = "{TEST_HOME}.git"\n'))
    assert colab.home(pyproject) == TEST_HOME
    assert len(colab.update(notebooks=notebooks, pyproject=pyproject)) == 4
    assert colab.update(check=True, notebooks=notebooks, pyproject=pyproject) == []
    for path in sorted(notebooks.glob("*.ipynb")):
        new, old = (json.loads(p.read_text())["cells"] for p in (path, ROOT / "notebooks" / path.name))
        changed = [i for i, (a, b) in enumerate(zip(new, old)) if a != b]
        assert len(new) == len(old) and len(changed) == 2, f"{path.name}: cells {changed} changed"
        first, install = ("".join(new[i]["source"]) for i in changed)
        assert f"colab.research.google.com/github/owner-of-a-test-copy/sdnb/blob/main/notebooks/{path.name})" in first
        assert f'sdnb_source = "git+{TEST_HOME}"' in install
    pyproject.write_text(text)  # no home again: back to the committed notebooks, byte for byte
    colab.update(notebooks=notebooks, pyproject=pyproject)
    for path in sorted(notebooks.glob("*.ipynb")):
        assert path.read_bytes() == (ROOT / "notebooks" / path.name).read_bytes()


def test_a_home_off_github_installs_from_it_without_a_badge():
    home = "https://git.example.invalid/you/sdnb"  # RFC 2606: .invalid names no one's host
    assert "Open In Colab" not in colab.badge_line(home, "03_sd_finetune") and home in colab.badge_line(home, "x")
    assert f'sdnb_source = "git+{home}"' in colab.install_cell(home)
    assert "Open In Colab" not in colab.badge_line(None, "03_sd_finetune")


@pytest.mark.parametrize("url", ["github.com/you/sdnb", "https://github.com/you", "http://github.com/you/sdnb"])
def test_a_home_that_is_not_a_repository_address_is_refused(tmp_path, url):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "sdnb"\n\n[project.urls]\nRepository = "{url}"\n')
    with pytest.raises(ValueError, match=r"\[project.urls\] Repository"):
        colab.home(pyproject)


def run_install_cell(monkeypatch, source: str, installed: bool) -> list[str]:
    """Run a committed install cell in IPython as on Colab (google.colab imported), with `sdnb_source` set as a user
    would and sdnb importable or not; returns the lines given to %pip (recorded, not run)."""
    from IPython.core.interactiveshell import InteractiveShell

    cells = json.loads((ROOT / "notebooks" / "03_sd_finetune.ipynb").read_text())["cells"]
    cell = "".join(cells[colab._managed_cells("03_sd_finetune.ipynb", cells)[1]]["source"])
    assert 'sdnb_source = ""\n' in cell
    shell = InteractiveShell.instance()
    calls = []
    monkeypatch.setitem(shell.magics_manager.magics["line"], "pip", calls.append)
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sdnb" and not installed else find_spec(name, *a))
    result = shell.run_cell(cell.replace('sdnb_source = ""\n', f"sdnb_source = {source!r}\n"))
    monkeypatch.undo()
    if result.error_in_exec:
        raise result.error_in_exec
    return calls


def test_install_cell_on_colab(tmp_path, monkeypatch):
    folder, fork = str(tmp_path / "sdnb"), "git+https://github.com/<you>/sdnb"
    assert run_install_cell(monkeypatch, folder, installed=True) == [f'install -q "{folder}[colab]"']
    assert run_install_cell(monkeypatch, fork, installed=True) == [f'install -q "sdnb[colab] @ {fork}"']
    assert colab.requirement(folder) == f"{folder}[colab]" and colab.requirement(fork) == f"sdnb[colab] @ {fork}"
    assert run_install_cell(monkeypatch, "", installed=True) == []  # already installed (pip, upload): go on
    if not any(Path(p, "pyproject.toml").is_file() for p in ("/content/sdnb", "/content/drive/MyDrive/sdnb")):
        with pytest.raises(RuntimeError, match=r"unzip.*MyDrive/sdnb.*git\+https://github.com/<you>/sdnb"):
            run_install_cell(monkeypatch, "", installed=False)


def test_requirements_txt_is_pyprojects_dependencies():
    declared = colab.tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(listed) == sorted(d.replace(" ", "") for d in declared)


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/bitsandbytes/", timeout=10).close()
        return True
    except OSError:
        return False


def test_installing_on_colab_replaces_nothing_colab_has(tmp_path, capsys):
    if not pypi_reachable():
        pytest.skip("PyPI unreachable: the Colab install simulation asks it what pip would install")
    result = colab.simulate()
    with capsys.disabled():
        print(f"\nColab simulation (Python {result['python']}): {result['checked']} preinstalled packages in view, "
              f"installs {sorted(result['installs'])}, {result['seconds']:.0f} s")
    assert result["checked"] > 500 and {"sdnb", "bitsandbytes"} <= set(result["installs"])
    assert not result["replaced"], f"the Colab install would replace preinstalled packages: {result['replaced']}"
    # the check can fail: a Colab whose Pillow is older than sdnb's lower bound gets a new one
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(re.sub(r"(?m)^pillow==.*$", "pillow==9.5.0", colab.FREEZE.read_text()))
    assert set(colab.simulate(freeze)["replaced"]) == {"pillow"}
