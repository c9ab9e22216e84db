"""The documentation site (`python tools/build_docs.py`) and the README generated from nbs/index.ipynb.

The site is built once into a temporary folder with `--no-execute` (nbdev's processors; in the kernels only
the cells nbdev runs for `show_doc`: exports and imports; the lessons are nbdev_test's, and executing every
notebook takes minutes), plus one notebook executed in full to check that its plots come out. The pages are
then opened in headless Chromium: the API reference, the sidebar and the maths are checked in the DOM after
MathJax has run. Chromium: Debian's `chromium` (.ci/run installs it when missing); without it only the browser
checks are skipped.
"""
import functools, importlib.util, inspect, os, re, shutil, subprocess, sys, tempfile
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


@functools.lru_cache(maxsize=None)
def _soup(path: Path):
    "A page's static HTML, parsed once (each page holds JupyterLab's CSS: parsing takes a while)."
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

def _frontmatter_title(nb: Path) -> str:
    "The title nbdev's FrontmatterProc reads from the notebook's first markdown cell."
    first = next(c for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "markdown")
    return re.search(r"^#\s+(.+?)\s*$", first.source, re.M).group(1)


def _api(soup, name):
    "The API entry of `name`: nbdev's show_doc markdown in its box."
    return soup.select_one(f'section.api[data-name="{name}"]')


def _signature(entry) -> str:
    return entry.select_one(".highlight pre").get_text()


def test_pages_in_notebook_order(site):
    nbs = build_docs.notebooks()
    assert nbs[0].name == "index.ipynb" and [p.name for p in nbs[1:]] == sorted(p.name for p in nbs[1:])
    assert {p.name for p in nbs} == {p.name for p in (ROOT / "nbs").glob("*.ipynb")}
    for nb in nbs: assert (site / build_docs.page_name(nb)).is_file(), nb
    assert build_docs.page_name(ROOT / "nbs" / "01_bound.ipynb") == "bound.html"
    assert sorted(p.name for p in site.glob("*.html")) == sorted(build_docs.page_name(p) for p in nbs)


def test_every_exported_name_documented(site):
    """Each exported function and class has nbdev's API entry on the page, under the anchor nbdev links it to
    (mulan_nb/_modidx.py): its signature with every parameter, and its docstring."""
    api = _exported_api()
    assert len(api) > 50, len(api)
    for name, obj, page, anchor in api:
        soup = _soup(site / page)
        entry = _api(soup, name)
        assert entry is not None, f"{page}: no API entry for {name}"
        assert entry.select_one(f'h3[id="{anchor}"]'), f"{page}#{anchor}: the entry of {name} has not that anchor"
        sig = _signature(entry)
        assert re.match(rf"(async )?def {re.escape(name)}\(", sig), sig
        try: params = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
        except (TypeError, ValueError): params = []
        for p in params: assert re.search(rf"(?<![\w.]){re.escape(p)}[:=,)\n]", sig), f"{name}: {p} not in {sig}"
        doc = obj.__doc__ if isinstance(obj.__doc__, str) and not obj.__doc__.startswith(name + "(") else ""
        if doc.strip():
            # (nbdev italicises the first line with `*`, which a `*` inside it upsets: compared without them)
            first = " ".join(inspect.cleandoc(doc).split("\n\n")[0].replace("`", "").replace("*", "").split())
            text = " ".join(entry.get_text("").replace("*", "").split())
            assert first[:60] in text, f"{name}: docstring {first[:60]!r} not in {text[-300:]!r}"


def test_exported_source_shown_after_its_entry(site):
    "`#| export` cells stay on the page (as nbdev shows `#| exports`): the entry, then the source under \"Exported source\"."
    soup = _soup(site / "bound.html")
    entry = _api(soup, "diffusion_loss")
    src = entry.find_next_sibling()
    fold = src.select_one("details.docs-source")
    assert fold is not None and fold.has_attr("open") and fold.summary.get_text(strip=True) == "Exported source"
    assert re.search(r"def\s+diffusion_loss\(", fold.get_text()), fold.get_text()[:300]
    # a dataclass defined in a notebook has no docments in show_doc (fastcore reads no source from __main__):
    # its field comments are read in the exported source next to it
    soup = _soup(site / "model.html")
    fold = _api(soup, "MuLANConfig").find_next_sibling().select_one("details.docs-source")
    assert re.search(r"K: int = 17\s*# number of levels", fold.get_text()), fold.get_text()[:600]
    # hidden cells, nbdev's directives and the show_doc calls are gone
    for page in site.glob("*.html"):
        text = _soup(page).select_one("main").get_text()
        assert not re.search(r"#\s*\|", text), f"{page.name}: a cell option left on the page"
        assert "show_doc(" not in text and "nbdev_export()" not in text, page.name


def test_links_resolve(site):
    "Links between pages and to API entries (nbdev's add_links, made relative; the sidebar) land on an existing anchor."
    ids, links = {}, []
    for page in site.glob("*.html"):
        soup = _soup(page)
        ids[page.name] = {t["id"] for t in soup.select("[id]")}
        links += [(page.name, a["href"]) for a in soup.select("a[href]")]
    assert not [l for l in links if "mulan-nb.github.io" in l[1]], "a link to doc_host left in"
    internal = [(p, h) for p, h in links if not re.match(r"^[a-z]+:", h)]
    prose = [(p, h) for p, h in internal if re.match(r"^\w+\.html#", h) and not h.startswith(p + "#")]
    assert len(prose) > 20, prose  # names in the text linked to their entries on other pages
    for page, href in internal:
        target, _, frag = href.partition("#")
        target = target or page
        if not target.endswith(".html"):  # a file of the repository, relative to the site
            assert (site / target).exists(), f"{page}: link to {href}, no such file"
            continue
        assert target in ids, f"{page}: link to {href}, no such page"
        # nbdev links private names too (they are in _modidx) but documents none: those land on the page
        if frag and not frag.startswith("_"): assert frag in ids[target], f"{page}: link to {href}, no such anchor"


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
    assert soup.select_one("header.docs-title h1").get_text(strip=True) == _frontmatter_title(ROOT / "nbs" / "index.ipynb")
    imgs = [i["src"] for i in soup.select("img")]
    assert "docs_images/samples.png" in imgs and "docs_images/schedules.png" in imgs
    for src in imgs: assert (site / src).is_file(), src


def test_readme_generated_from_index():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text == build_docs.readme_text(), "README.md is stale: run python tools/build_docs.py --readme"
    assert text.startswith(build_docs.README_WARNING + "\n\n# mulan_nb\n\n> ")
    assert 'pip install -e . && mulan_train' in text and 'pip install -e ".[dev]" && nbdev_test && pytest -q tests' in text
    assert "| preset | test bpd (dense ELBO, 128 draws per image) | steps | seeds |" in text
    for img in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text): assert (ROOT / img).is_file(), img


def test_executed_notebook_has_plots(tmp_path):
    "One notebook executed in full: its plots are embedded as PNGs, and its API entries are there too."
    out = tmp_path / "exec"
    _build(out, "--only", "02_schedules")
    soup = _soup(out / "schedules.html")
    assert soup.select('img[src^="data:image/png;base64,"]'), "no plot in the executed page"
    assert _api(soup, "LinearSchedule") is not None
    assert "(executed)" in soup.select_one("footer").get_text()


def _broken_site(tmp_path, *cells, args=()):
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    nb = new_notebook(cells=[new_markdown_cell("# Broken"), *map(new_code_cell, cells)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}})
    nbformat.write(nb, nbs / "00_broken.ipynb")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), "--nbs", str(nbs), "--out", str(tmp_path / "out"), *args],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def test_build_fails_loudly(tmp_path):
    "An error in a notebook stops the build, naming the notebook and the cell."
    r = _broken_site(tmp_path, "x = 1", "#| hide\n1 / 0")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "00_broken.ipynb: cell 2" in r.stderr and "ZeroDivisionError" in r.stderr, r.stderr[-2000:]


def test_no_execute_runs_what_nbdev_runs_for_show_doc(tmp_path):
    """--no-execute: a lesson (cell 2) and a cell mixing imports with lesson code (3) are not run; an exported
    cell (4) is, and its error names it."""
    r = _broken_site(tmp_path, "#| export\ndef f(x:int): return x", "1 / 0", "import math\nmath.sqrt(-1)",
                     "#| export\ny = undefined_name", args=["--no-execute"])
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "00_broken.ipynb: cell 4" in r.stderr and "NameError" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------- in the browser

@needs_chromium
def test_browser_api_reference_and_sidebar(site):
    nbs = build_docs.notebooks()
    dom = rendered_dom(site / "bound.html")
    links = dom.select("nav.docs-sidebar ol.docs-pages > li > a")
    assert [a["href"] for a in links] == [build_docs.page_name(p) for p in nbs]
    assert [a.get_text(strip=True) for a in links] == [_frontmatter_title(p) for p in nbs]
    assert [a.get_text(strip=True) for a in links][2] == "The multivariate variational bound"
    assert [a["href"] for a in dom.select("nav.docs-sidebar a.active")] == ["bound.html"]
    toc = [a["href"] for a in dom.select("nav.docs-sidebar li.active ul.docs-api-toc a")]
    assert toc == ["#" + h3["id"] for h3 in dom.select("section.api h3")] and "#diffusion_loss" in toc, toc
    api = _api(dom, "diffusion_loss")
    assert api is not None and api.h3["id"] == "diffusion_loss"
    from mulan_nb.bound import diffusion_loss
    params = list(inspect.signature(diffusion_loss).parameters)
    sig = _signature(api)
    assert sig.startswith("def diffusion_loss(") and sig.rstrip().endswith(")->Tensor:"), sig
    lines = {l.split(":")[0].strip(): l for l in sig.splitlines()[1:-1]}
    assert list(lines) == params, (params, sig)
    for p in params: assert re.match(rf"\s*{p}:Tensor, # \S", lines[p]), lines[p]  # annotation and docment
    assert "the noise used to make z_t" in lines["eps"]
    assert inspect.getdoc(diffusion_loss).split("`")[0] in api.get_text()
    assert re.search(r"mulan_nb/bound\.py#L\d+$", api.select_one('a[target="_blank"]')["href"])  # nbdev's source link

    dom = rendered_dom(site / "model.html")
    api = _api(dom, "MuLAN")
    assert api is not None and api.h3["id"] == "mulan"
    sig = _signature(api)
    assert sig.startswith("def MuLAN(") and re.search(r"config:\S*MuLANConfig \| None=None, # \S", sig) and "overrides" in sig, sig
    patched = {a["data-name"]: a for a in dom.select("section.api") if "." in a["data-name"]}  # methods added with @patch
    assert {"MuLAN.nelbo", "MuLAN.forward", "MuLAN.encode", "MuLAN.gamma"} <= set(patched), sorted(patched)
    nelbo = patched["MuLAN.nelbo"]
    assert nelbo.h3["id"] == "mulan.nelbo"  # the anchor of MuLAN.nelbo in mulan_nb/_modidx.py
    sig = _signature(nelbo)
    assert sig.startswith("def nelbo(") and "self" not in sig and re.search(r"^\s*x:Tensor, # integer images", sig, re.M), sig
    assert [a["href"] for a in dom.select("nav.docs-sidebar a.active")] == ["model.html"]


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
