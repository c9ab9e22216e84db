"""The API entry of one exported name, computed inside the notebook's own kernel.

`tools/build_docs.py` prepends this file's source to each notebook it builds (as a hidden cell) and,
after every `#| export` cell, adds one hidden cell `_mulan_docs_api(NAME, 'NAME')` per public
function or class the cell defines -- the names nbdev's `add_show_docs` would document. Each such cell
displays one output of type `application/vnd.mulan-nb.api+json`: the signature (from `inspect.signature`),
the docstring and the parameters' documentation (from `fastcore.docments`, nbdev's own source of it),
which the builder renders to HTML. Running in the kernel documents the notebook's definitions, not
whatever version of the package happens to be installed.

Self-contained on purpose: it is executed as cell source, so it imports what it needs itself.
"""


def _mulan_docs_api(obj, name, src=None):
    "Display the API entry of `obj`; `src`: the source of the cell that defines it (for what `inspect` can't read)."
    import ast, dataclasses, inspect, io, re, tokenize, typing
    from IPython.display import display

    empty = inspect.Parameter.empty

    class _Txt:  # an annotation or default that `inspect` prints verbatim
        def __init__(self, s): self.s = s
        def __repr__(self): return self.s

    def short(s):  # `torch.Tensor | None` -> `Tensor | None`, `mulan_nb.model.MuLANConfig` -> `MuLANConfig`
        return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", s)

    def anno(a):
        if a is empty or a is inspect.Signature.empty or isinstance(a, inspect._ParameterKind): return None
        if isinstance(a, str): return short(a)
        if isinstance(a, type) and not typing.get_args(a): return a.__qualname__
        return short(repr(a))

    def default(d):
        if d is empty: return None
        r = repr(d)
        return r if len(r) <= 60 else r[:57] + "..."

    def clean(doc):
        return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else ""

    def signature(f, drop_first=False, drop_none_return=False):
        "(one-line signature, its parts for a multi-line layout, the parameters)"
        try: sig = inspect.signature(f)
        except (TypeError, ValueError): return None, None, []
        ps = list(sig.parameters.values())
        if drop_first and ps and ps[0].name in ("self", "cls"): ps = ps[1:]
        new = []
        for p in ps:
            a, d = anno(p.annotation), default(p.default)
            new.append(p.replace(annotation=_Txt(a) if a else empty, default=_Txt(d) if d is not None else empty))
        ra = anno(sig.return_annotation)
        if drop_none_return and ra == "None": ra = None
        sig = sig.replace(parameters=new, return_annotation=_Txt(ra) if ra else inspect.Signature.empty)
        parts, kinds = [], [p.kind for p in new]
        for i, p in enumerate(new):
            if p.kind == p.KEYWORD_ONLY and inspect.Parameter.VAR_POSITIONAL not in kinds and (i == 0 or kinds[i - 1] != p.KEYWORD_ONLY):
                parts.append("*")
            parts.append(str(p))
            if p.kind == p.POSITIONAL_ONLY and (i + 1 == len(new) or kinds[i + 1] != p.POSITIONAL_ONLY):
                parts.append("/")
        return str(sig), {"params": parts, "returns": ra}, ps

    is_class = inspect.isclass(obj)
    patched = "." in name and not is_class   # `Class.method`, added by `@patch`: documented without `self`
    if isinstance(obj, property): obj = obj.fget
    sig, parts, ps = signature(obj, drop_first=patched, drop_none_return=is_class)
    try:
        from fastcore.docments import docments
        dm = docments(obj, full=True, returns=True)
    except Exception:
        dm = {}
    def field_comments():
        "`field: T = v  # doc` of a class defined in a notebook (`inspect.getsource` can't find classes of __main__)."
        try:
            tree = ast.parse(src)
            cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == obj.__name__)
            toks = tokenize.generate_tokens(io.StringIO(src).readline)
            comments = {t.start[0]: t.string.lstrip("#").strip() for t in toks if t.type == tokenize.COMMENT}
        except Exception:
            return {}
        lines, out = src.splitlines(), {}
        for n in cls.body:
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                c = comments.get(n.end_lineno)
                if not c and n.lineno > 1 and lines[n.lineno - 2].strip().startswith("#"): c = comments.get(n.lineno - 1)
                if c: out[n.target.id] = c
        return out

    if is_class and src and not any((v or {}).get("docment") for v in dm.values()):
        dm = {k: {"docment": v} for k, v in field_comments().items()}
    params = []
    for p in ps:
        if p.name in ("self", "cls"): continue
        star = "*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else ""
        params.append({"name": star + p.name, "anno": anno(p.annotation), "default": default(p.default),
                       "doc": (dm.get(p.name) or {}).get("docment")})
    ret = dm.get("return") or {}
    returns = None if is_class else {"anno": parts["returns"] if parts else None, "doc": ret.get("docment")}

    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
    if is_class and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "("): doc = ""  # the generated one

    methods = []
    if is_class:
        for k, v in vars(obj).items():
            if k.startswith("_"): continue
            if isinstance(v, property): f, kind = v.fget, "property"
            elif isinstance(v, staticmethod): f, kind = v.__func__, "staticmethod"
            elif isinstance(v, classmethod): f, kind = v.__func__, "classmethod"
            elif inspect.isfunction(v): f, kind = v, "method"
            else: continue
            msig = None if kind == "property" else signature(f, drop_first=kind != "staticmethod")[0]
            methods.append({"name": k, "kind": kind, "signature": msig, "doc": clean(getattr(f, "__doc__", None))})

    data = {"name": name, "kind": "class" if is_class else "method" if patched else "async function" if inspect.iscoroutinefunction(obj) else "function",
            "module": getattr(obj, "__module__", None), "signature": sig, "parts": parts, "doc": clean(doc),
            "params": params, "returns": returns, "methods": methods}
    display({"application/vnd.mulan-nb.api+json": data, "text/plain": f"<API entry of {name}>"}, raw=True)
