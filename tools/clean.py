#!/usr/bin/env python
"""`nbdev_clean`, then the notebook metadata JupyterLab writes, so that a notebook opens unmodified.

    python tools/clean.py                  # clean every notebook in nbs/ (run it before a commit, in place of nbdev_clean)
    python tools/clean.py nbs/05_model.ipynb
    python tools/clean.py --check          # change nothing; exit 1 naming the notebooks that are not clean

Why a step after nbdev_clean: JupyterLab, on opening a notebook, writes the running kernel's `kernelspec`
(display name "Python 3 (ipykernel)") and `language_info` into it, and marks it modified when either differs from
what is stored. nbdev 2.4.14's `clean_nb` always sets `kernelspec.display_name` to the kernel's name ("python3",
nbdev/clean.py) and has no setting to keep it; `language_info` it keeps because settings.ini lists it in
`allowed_metadata_keys`. So this script runs nbdev's own clean and then stores exactly what JupyterLab 4 writes for
the default `python3` kernel (checked in a real browser by `tools/jupyterlab_check.py`). Everything else is
nbdev_clean's output, byte for byte.

The stored `language_info.version` is the Python of the reference environment (CI's); JupyterLab on another
Python version writes its own version, so there a notebook shows one changed line.
"""
import argparse, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JUPYTERLAB_METADATA = {   # what JupyterLab 4.6 writes for ipykernel's default kernel on the reference Python 3.11.7
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py", "mimetype": "text/x-python",
                      "name": "python", "nbconvert_exporter": "python", "pygments_lexer": "ipython3", "version": "3.11.7"},
}


def cleaned(path: Path) -> str:
    "The text of the notebook at `path` after nbdev's clean and JupyterLab's metadata."
    from execnb.nbio import loads, nb2str
    from nbdev.clean import _nbdev_clean
    nb = loads(path.read_text(encoding="utf-8"))
    _nbdev_clean(nb, path=path)
    nb["metadata"].update(JUPYTERLAB_METADATA)
    return nb2str(nb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="notebooks to clean (default: every notebook in nbs/)")
    ap.add_argument("--check", action="store_true", help="change nothing: exit 1 naming the notebooks that are not clean")
    a = ap.parse_args(argv)
    paths = a.notebooks or sorted((ROOT / "nbs").glob("*.ipynb"))
    stale = []
    for p in paths:
        if not p.is_file(): ap.error(f"no notebook {p}")
        text = cleaned(p)
        if p.read_text(encoding="utf-8") != text:
            stale.append(p)
            if not a.check: p.write_text(text, encoding="utf-8")
    if a.check and stale:
        print(f"clean.py: not clean (run python tools/clean.py): {', '.join(str(p) for p in stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
