"""The documentation site (`python tools/build_docs.py`) and the README generated from nbs/index.ipynb.

The site is built once into a temporary folder with `--no-execute` (the API cells, exports and imports run;
the lessons do not: nbdev_test runs them, and executing every notebook takes minutes), plus one notebook
executed in full to check that its plots come out. The pages are then opened in headless Chromium: the API
reference, the sidebar and the maths are checked in the DOM after MathJax has run. Chromium: Debian's
`chromium` (.ci/run installs it when missing); without it only the browser checks are skipped.
"""
import importlib.util, inspect, os, re, shutil, subprocess, sys, tempfile
from pathlib import Path

import nbformat, pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_docs", ROOT / "tools" / "build_docs.py")
build_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_docs)

bs4 = pytest.importorskip("bs4")  # a dependency of nbconvert


def _chromium():
    for c in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if c and shutil.which(c): return shutil.which(c)
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: apt-get install chromium (.ci/run tries)")


def _build(out: Path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), "--out", str(out), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"build_docs {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    _build(out, "--no-execute")
    return out


def _soup(path: Path):
    return bs4.BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def rendered_dom(page: Path) -> "bs4.BeautifulSoup":
    "The page's DOM after its scripts (MathJax) ran, from headless Chromium."
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--disable-extensions", f"--user-data-dir={profile}", "--virtual-time-budget=30000",
                            "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "<body" in r.stdout, f"chromium failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return bs4.BeautifulSoup(r.stdout, "html.parser")


def _visible_text(soup) -> str:
    "Text a reader sees as text: no scripts (MathJax keeps the TeX there), styles, code or folded source."
    soup = bs4.BeautifulSoup(str(soup), "html.parser")
    for t in soup.select("script, style, pre, code, details, .MathJax, .MathJax_Display, .MathJax_Preview"):
        t.decompose()
    return soup.get_text(" ")


_TEX = re.compile(r"\$\$|\$\\|\\(frac|tfrac|gamma|mathbb|mathcal|mathrm|sum|int|left|right|operatorname|underbrace|varepsilon|sigma|alpha)\b")


def _exported_api():
    "Every exported function and class, with the page and anchor nbdev gives it (mulan_nb/_modidx.py)."
    from mulan_nb._modidx import d
    out = []
    for mod, syms in d["syms"].items():
        m = importlib.import_module(mod)
        for full, (link, _) in syms.items():
            name = full[len(mod) + 1:]
            if "." in name or name not in getattr(m, "__all__", ()): continue
            obj = getattr(m, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((name, obj, *link.split("#")))
    return out


# ---------------------------------------------------------------- static checks of the built HTML

def test_pages_in_notebook_order(site):
    nbs = build_docs.notebooks()
    assert nbs[0].name == "index.ipynb" and [p.name for p in nbs[1:]] == sorted(p.name for p in nbs[1:])
    for nb in nbs: assert (site / build_docs.page_name(nb)).is_file(), nb
    assert build_docs.page_name(ROOT / "nbs" / "01_bound.ipynb") == "bound.html"


def test_every_exported_name_documented(site):
    "Each exported function and class has its entry, signature and docstring on the page nbdev links it to."
    api = _exported_api()
    assert len(api) > 50, len(api)
    soups = {}
    for name, obj, page, anchor in api:
        soup = soups.setdefault(page, _soup(site / page))
        div = soup.find("div", class_="api", id=anchor)
        assert div is not None and div["data-name"] == name, f"{page}#{anchor}: no API entry for {name}"
        sig = div.select_one("pre.api-sig").get_text()
        assert re.search(rf"\b(def|class) {re.escape(name)}\b", sig), sig
        try: params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        except (TypeError, ValueError): params = []
        for p in params: assert re.search(rf"\b{re.escape(p)}\b", sig), f"{name}: {p} not in {sig}"
        doc = obj.__doc__ if isinstance(obj.__doc__, str) and not obj.__doc__.startswith(name + "(") else ""
        if doc.strip():
            first = " ".join(inspect.cleandoc(doc).split("\n\n")[0].replace("`", "").split())
            text = " ".join(div.select_one(".api-doc").get_text().split())
            assert first[:60] in text, f"{name}: docstring {first[:60]!r} not in {text[:200]!r}"


def test_offline_and_local_mathjax(site):
    assert (site / "mathjax" / "MathJax.js").is_file() and (site / "docs.css").is_file()
    for page in site.glob("*.html"):
        soup = _soup(page)
        remote = [t.get("src") or t.get("href") for t in soup.select("script[src], link[href], img[src]")
                  if re.match(r"^(https?:)?//", t.get("src") or t.get("href") or "")]
        assert not remote, f"{page.name} loads from the network: {remote}"
        assert soup.select_one('script[src^="mathjax/MathJax.js"]'), page.name


def test_index_page_and_pictures(site):
    soup = _soup(site / "index.html")
    text = soup.get_text("")
    assert "test bpd (dense ELBO, 128 draws per image)" in text and "pip install -e . && mulan_train" in text
    imgs = [i["src"] for i in soup.select("img")]
    assert "docs_images/samples.png" in imgs and "docs_images/schedules.png" in imgs
    for src in imgs: assert (site / src).is_file(), src


def test_readme_generated_from_index():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text == build_docs.readme_text(), "README.md is stale: run python tools/build_docs.py --readme"
    assert text.startswith(build_docs.README_WARNING)
    assert 'pip install -e . && mulan_train' in text and 'pip install -e ".[dev]" && nbdev_test && pytest -q tests' in text
    assert "| preset | test bpd (dense ELBO, 128 draws per image) | steps | seeds |" in text
    for img in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text): assert (ROOT / img).is_file(), img


def test_executed_notebook_has_plots(tmp_path):
    "One notebook executed in full: its plots are embedded as PNGs, and its API entries are there too."
    out = tmp_path / "exec"
    _build(out, "--only", "02_schedules")
    soup = _soup(out / "schedules.html")
    assert soup.select('img[src^="data:image/png;base64,"]'), "no plot in the executed page"
    assert soup.find("div", class_="api", id="linearschedule")
    assert "(executed)" in soup.select_one("footer").get_text()


def test_build_fails_loudly(tmp_path):
    "An error in a notebook stops the build, naming the notebook and the cell."
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    nb = new_notebook(cells=[new_markdown_cell("# Broken"), new_code_cell("x = 1"), new_code_cell("#| hide\n1 / 0")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    nbformat.write(nb, nbs / "00_broken.ipynb")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), "--nbs", str(nbs), "--out", str(tmp_path / "out")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "00_broken.ipynb: cell 2" in r.stderr and "ZeroDivisionError" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------- in the browser

@needs_chromium
def test_browser_api_reference_and_sidebar(site):
    nbs = build_docs.notebooks()
    dom = rendered_dom(site / "bound.html")
    links = dom.select("nav.docs-sidebar ol.docs-pages > li > a")
    assert [a["href"] for a in links] == [build_docs.page_name(p) for p in nbs]
    assert [a.get_text(strip=True) for a in links] == [build_docs.title_of(nbformat.read(p, as_version=4)) for p in nbs]
    assert [a.get_text(strip=True) for a in links][2] == "The multivariate variational bound"
    assert [a["href"] for a in dom.select("nav.docs-sidebar a.active")] == ["bound.html"]
    api = dom.select_one("div.api#diffusion_loss")
    assert api is not None
    from mulan_nb.bound import diffusion_loss
    params = list(inspect.signature(diffusion_loss).parameters)
    sig = api.select_one("pre.api-sig").get_text()
    assert sig.startswith("def diffusion_loss(") and all(f"{p}: Tensor" in sig for p in params) and sig.endswith("-> Tensor"), sig
    assert inspect.getdoc(diffusion_loss).split("`")[0] in api.select_one(".api-doc").get_text()
    assert [td.get_text(strip=True) for td in api.select("table.api-params tbody td:first-child")][:len(params)] == params
    assert "the noise used to make z_t" in api.select_one("table.api-params").get_text()  # docments

    dom = rendered_dom(site / "model.html")
    api = dom.select_one("div.api#mulan")
    assert api is not None and api["data-name"] == "MuLAN"
    sig = api.select_one("pre.api-sig").get_text()
    assert sig.startswith("class MuLAN(") and "config: MuLANConfig | None = None" in sig and "**overrides" in sig
    patched = {a["data-name"]: a for a in dom.select("div.api[data-kind=method]")}   # methods added with @patch, each after its own cell
    assert {"MuLAN.nelbo", "MuLAN.forward", "MuLAN.encode", "MuLAN.gamma"} <= set(patched), sorted(patched)
    nelbo = patched["MuLAN.nelbo"].select_one("pre.api-sig").get_text()
    assert nelbo.startswith("def MuLAN.nelbo(") and "self" not in nelbo and "x: Tensor" in nelbo, nelbo
    assert [a["href"] for a in dom.select("nav.docs-sidebar a.active")] == ["model.html"]
    rows = {tr.td.get_text(strip=True): tr.find_all("td")[-1].get_text(strip=True)
            for tr in dom.select("div.api#mulanconfig table.api-params tbody tr")}
    assert "levels" in rows["K"] and rows["data_shape"], rows  # a dataclass's field comments


@needs_chromium
def test_browser_maths_rendered(site):
    dom = rendered_dom(site / "bound.html")
    typeset = dom.select("span.MathJax, div.MathJax_Display")
    sources = dom.select('script[type^="math/tex"]')
    assert len(typeset) >= 20 and len(sources) >= 20, (len(typeset), len(sources))
    for sc in sources:  # every formula went through MathJax: its output stands right before its TeX source
        prev = sc.find_previous_sibling()
        assert prev is not None and {"MathJax", "MathJax_Display"} & set(prev.get("class", [])), sc.get_text()[:80]
    assert not dom.select(".MathJax_Error, .noError, merror"), "TeX errors on the page"
    text = _visible_text(dom)
    assert "The multivariate variational bound" in text and "Dividing by" in text
    raw = _TEX.findall(text)
    assert not raw, f"raw TeX left in the visible text: {raw[:10]}"
    assert "$" not in text, text[text.find("$") - 80: text.find("$") + 80]
