"""The notebooks are stored as `tools/clean.py` leaves them (nbdev_clean's output plus the metadata JupyterLab writes),
and open in a real JupyterLab without being marked modified."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import clean  # noqa: E402

NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))


def test_every_notebook_is_clean():
    assert NOTEBOOKS, "no notebooks found in nbs/"
    stale = [p.name for p in NOTEBOOKS if p.read_text(encoding="utf-8") != clean.cleaned(p)]
    assert not stale, f"run python tools/clean.py: {stale}"


def test_clean_differs_from_nbdev_clean_only_in_the_display_name(tmp_path):
    "nbdev_clean agrees with what is stored except the one field it cannot keep (kernelspec.display_name)."
    nb = tmp_path / NOTEBOOKS[0].name
    shutil.copy(NOTEBOOKS[0], nb); shutil.copy(ROOT / "settings.ini", tmp_path / "settings.ini")
    subprocess.run([sys.executable, "-c", "from nbdev.clean import nbdev_clean; nbdev_clean.__wrapped__(fname=%r)" % str(nb)],
                   cwd=tmp_path, check=True, capture_output=True)
    ours, nbdevs = json.loads(NOTEBOOKS[0].read_text()), json.loads(nb.read_text())
    assert nbdevs["metadata"]["kernelspec"]["display_name"] == "python3"
    nbdevs["metadata"]["kernelspec"]["display_name"] = clean.JUPYTERLAB_METADATA["kernelspec"]["display_name"]
    assert nbdevs == ours


def test_check_names_a_stale_notebook(tmp_path, capsys):
    nb = tmp_path / "x.ipynb"
    stored = json.loads(NOTEBOOKS[0].read_text())
    stored["metadata"]["kernelspec"]["display_name"] = "python3"   # what nbdev_clean alone leaves
    nb.write_text(json.dumps(stored))
    assert clean.main(["--check", str(nb)]) == 1 and "x.ipynb" in capsys.readouterr().err
    assert clean.main([str(nb)]) == 0 and clean.main(["--check", str(nb)]) == 0


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("jupyter"),
                    reason="needs Chromium and jupyter lab")
def test_notebooks_open_unmodified_in_jupyterlab():
    "A real JupyterLab in headless Chromium: open, wait for the kernel, check the dirty flag, save, compare the file."
    pick = [ROOT / "nbs" / "00_diffusion.ipynb", ROOT / "nbs" / "12_training.ipynb"]
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "jupyterlab_check.py"), *map(str, pick)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("nothing (byte-identical)") == len(pick), r.stdout
