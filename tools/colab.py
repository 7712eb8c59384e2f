"""The notebooks' Colab entry, written from the project's home declared once in pyproject.toml ([project.urls]
Repository), and a check that installing it on Colab keeps what Colab has preinstalled.

    python tools/colab.py             rewrite each notebook's badge line and install cell from pyproject.toml
    python tools/colab.py --check     exit 1 naming the notebooks whose badge or install cell is out of date
    python tools/colab.py --simulate  dry-run the install cell's pip command against Colab's preinstalled packages

With no home (none yet), the notebooks carry no badge and the install cell installs from the user's own copy
(uploaded, in Google Drive, or a fork), or stops saying how. A home is written only as given: never guess one, since
an address someone else owns would have Colab users install that owner's code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the `tomli` package (a dev dependency there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FREEZE = Path(__file__).resolve().parent / "colab_pip_freeze.gpu.txt"
COLAB_PYTHON = "3.13"  # googlecolab/backend-info os-info-gpu.txt: Python 3.13.15 (Ubuntu 22.04, glibc 2.35)
COLAB_GLIBC_MINOR = 35
EXTRA = "colab"
BRANCH = "main"
BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"
# the managed line of each notebook's first markdown cell: the badge, or the note that replaces it while there is no home
MANAGED_LINE = re.compile(r"^(\[!\[Open In Colab\]|\*On Colab:)")
NO_BADGE = "*On Colab: upload this notebook and run its first code cell, which says how to install sdnb from your copy.*"
HOME_NO_BADGE = "*On Colab: upload this notebook; its first code cell installs sdnb from {url}.*"

INSTALL_CELL = """\
# Colab only: installs sdnb with its `colab` extra (bitsandbytes: 8-bit AdamW) and keeps Colab's own torch, torchvision
# and ipywidgets. Locally `make demo` has installed sdnb already.
# Written by tools/colab.py from pyproject.toml [project.urls]: change it there and run the script, not here.
import importlib.util
import os
import sys

# {source_comment}
sdnb_source = "{source}"

if "google.colab" in sys.modules:
    copies = [p for p in ("/content/sdnb", "/content/drive/MyDrive/sdnb") if os.path.isfile(f"{{p}}/pyproject.toml")]
    sdnb_source = sdnb_source or (copies[0] if copies else "")
    if sdnb_source:
        sdnb_requirement = f"sdnb[{extra}] @ {{sdnb_source}}" if "://" in sdnb_source else f"{{sdnb_source}}[{extra}]"
        %pip install -q "{{sdnb_requirement}}"
    elif importlib.util.find_spec("sdnb") is None:
        raise RuntimeError(
            "sdnb is not installed, and it has no public home to install from yet. Install your own copy, then run "
            "this cell again: upload the repository's zip in the Files panel and `!unzip -q sdnb.zip -d /content` "
            "(so that /content/sdnb/pyproject.toml exists); or put the repository in Google Drive as MyDrive/sdnb "
            "and mount Drive (`from google.colab import drive; drive.mount('/content/drive')`); or push it to a "
            "repository of yours and set sdnb_source = 'git+https://github.com/<you>/sdnb' above.")"""
NO_HOME_SOURCE = ("Where to install sdnb from: a folder holding your copy (empty: /content/sdnb, else\n"
                  "# /content/drive/MyDrive/sdnb, when there) or your fork: \"git+https://github.com/<you>/sdnb\".")
HOME_SOURCE = "Where to install sdnb from: its home, or a folder holding your copy, or your fork (\"git+https://...\")."


def home(pyproject: Path = ROOT / "pyproject.toml") -> str | None:
    """The project's public home ([project.urls] Repository), or None while there is none."""
    urls = tomllib.loads(pyproject.read_text())["project"].get("urls", {})
    url = urls.get("Repository")
    if url is None:
        return None
    if not re.fullmatch(r"https://[\w.-]+/[\w.-]+/[\w.-]+", url.removesuffix(".git")):
        raise ValueError(f"pyproject.toml [project.urls] Repository = {url!r}: expected https://HOST/OWNER/REPO "
                         "(the address of a repository you own), or no Repository while there is none")
    return url.removesuffix(".git")


def badge_line(url: str | None, notebook: str) -> str:
    """The first markdown cell's managed line: a Colab badge for a GitHub home, else a note."""
    if url is None:
        return NO_BADGE
    if not url.startswith("https://github.com/"):  # Colab opens notebooks from GitHub only
        return HOME_NO_BADGE.format(url=url)
    repo = url.removeprefix("https://github.com/")
    link = f"https://colab.research.google.com/github/{repo}/blob/{BRANCH}/notebooks/{notebook}.ipynb"
    return f"[![Open In Colab]({BADGE_SVG})]({link})"


def install_cell(url: str | None) -> str:
    """The install cell's source: installs from the home when there is one, else from the user's copy."""
    source, comment = ("", NO_HOME_SOURCE) if url is None else (f"git+{url}", HOME_SOURCE)
    return INSTALL_CELL.format(source=source, source_comment=comment, extra=EXTRA)


def requirement(source: str) -> str:
    """What the install cell hands to pip for `source` (the same expression as in the cell)."""
    return f"sdnb[{EXTRA}] @ {source}" if "://" in source else f"{source}[{EXTRA}]"


def _text(cell: dict) -> str:
    """A notebook cell's source as one string (nbformat stores a string or a list of lines)."""
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def _managed_cells(name: str, cells: list[dict]) -> tuple[int, int]:
    """Indices of the first markdown cell and of the install cell (the one code cell that runs pip install)."""
    first = next(i for i, c in enumerate(cells) if c["cell_type"] == "markdown")
    installs = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and "pip install" in _text(c)]
    if len(installs) != 1:
        raise ValueError(f"notebooks/{name}: {len(installs)} code cells run pip install; expected exactly 1")
    return first, installs[0]


def _with_badge(markdown: str, line: str) -> str:
    """`markdown` with its managed line (after the title) replaced by `line`, or inserted there."""
    lines = markdown.split("\n")
    kept = [x for x in lines if not MANAGED_LINE.match(x)]
    return "\n".join(kept[:1] + [line] + kept[1:])


def update(check: bool = False, notebooks: Path = NOTEBOOKS, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Rewrite (or, with `check`, only compare) every notebook's managed cells from the home in `pyproject`; returns
    the names of the notebooks that differ(ed)."""
    url = home(pyproject)
    stale = []
    for path in sorted(notebooks.glob("*.ipynb")):
        nb = json.loads(path.read_text())  # plain JSON: every other cell stays byte for byte as it is
        cells = nb["cells"]
        first, install = _managed_cells(path.name, cells)
        wanted = {first: _with_badge(_text(cells[first]), badge_line(url, path.stem)), install: install_cell(url)}
        if all(_text(cells[i]) == text for i, text in wanted.items()):
            continue
        stale.append(path.name)
        if not check:
            for i, text in wanted.items():
                cells[i]["source"] = text.splitlines(keepends=True)
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return stale


def colab_packages(freeze: Path = FREEZE) -> dict[str, str]:
    """Colab's preinstalled packages from its `pip freeze`: normalized name -> version (local tag kept)."""
    found = {}
    for line in freeze.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "==" in line:
            name, version = line.split("==", 1)
        else:  # `name @ URL`: the version from the file name when it has one
            name, url = line.split(" @ ", 1)
            match = re.search(r"-(\d[\w.+]*?)(?:-py|-cp|\.tar\.gz|\.zip|\.whl)", url.rsplit("/", 1)[-1])
            version = match.group(1) if match else "0"
        found[normalize(name)] = version.strip()
    return found


def normalize(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def colab_like_python() -> str:
    """An interpreter of Colab's Python version when this machine has a working one (pip then evaluates dependencies'
    markers as on Colab), else this one."""
    found = shutil.which(f"python{COLAB_PYTHON}")
    probe = "import sys; print('%d.%d' % sys.version_info[:2])"
    if found and subprocess.run([found, "-c", probe], capture_output=True, text=True).stdout.strip() == COLAB_PYTHON:
        return found
    return sys.executable


def fake_colab_env(where: Path, packages: dict[str, str], python: str) -> Path:
    """A venv of `python` whose site-packages holds Colab's preinstalled packages as metadata only (what pip sees as
    installed); returns its python."""
    subprocess.run([python, "-m", "venv", "--without-pip", str(where)], check=True)
    site = next(where.glob("lib/python*/site-packages"))
    for name, version in packages.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return where / "bin" / "python"


def _copy_of_project(where: Path) -> Path:
    """What a user uploads: the files pip builds sdnb from."""
    where.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, where / name)
    shutil.copytree(ROOT / "sdnb", where / "sdnb", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def pip_command(python: Path, source: str, report: Path) -> list[str]:
    """The install cell's `pip install -q REQUIREMENT`, as a dry run for Colab's Python and platform, with a report."""
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(COLAB_GLIBC_MINOR, 16, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    tag = COLAB_PYTHON.replace(".", "")
    return [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", requirement(source),
            "--dry-run", "--report", str(report), "--only-binary=:all:", "--python-version", COLAB_PYTHON,
            "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none",
            *[arg for p in platforms for arg in ("--platform", p)]]


def simulate(freeze: Path = FREEZE) -> dict:
    """Dry-run the install cell's pip command in a venv holding Colab's preinstalled packages. Returns `installs`
    (name -> version pip would install), `replaced` (of those, the ones Colab has: name -> (colab, new)), `checked`
    (how many preinstalled packages pip saw), `python` (the venv's version: markers are evaluated for it), `seconds`;
    raises RuntimeError with pip's output if pip fails."""
    packages = colab_packages(freeze)
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT", "PIP_EXTRA_INDEX_URL")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip settings (local wheels, caps) are not Colab's
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        python = fake_colab_env(Path(tmp) / "colab", packages, colab_like_python())
        version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        report = Path(tmp) / "report.json"
        run = subprocess.run(pip_command(python, str(_copy_of_project(Path(tmp) / "sdnb")), report),
                             env=env, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"pip could not install sdnb[{EXTRA}] over Colab's packages:\n{run.stderr[-4000:]}")
        items = json.loads(report.read_text())["install"]
    installs = {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    replaced = {n: (packages[n], v) for n, v in installs.items() if n in packages}
    return {"installs": installs, "replaced": replaced, "checked": len(packages), "python": version,
            "seconds": time.monotonic() - start}


def main(argv: list[str] | None = None) -> int:
    """Command line: write (default), --check, or --simulate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report notebooks that are out of date (exit 1)")
    mode.add_argument("--simulate", action="store_true", help="dry-run the Colab install against Colab's packages")
    args = parser.parse_args(argv)
    if args.simulate:
        result = simulate()
        print(f"{result['checked']} preinstalled Colab packages (Python {result['python']}); "
              f"{len(result['installs'])} to install "
              f"({', '.join(f'{n} {v}' for n, v in sorted(result['installs'].items()))}); {result['seconds']:.0f} s")
        for name, (old, new) in sorted(result["replaced"].items()):
            print(f"REPLACED: {name} {old} -> {new}")
        return 1 if result["replaced"] else 0
    stale = update(check=args.check)
    where = home() or "no home yet: no badge, installs from the user's copy"
    print(f"{'out of date' if args.check else 'rewritten'} ({where}): {', '.join(stale) or 'none'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
