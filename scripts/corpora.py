"""
Writes the corpora beside Lee on which the defaults and the diffusion model were checked
(docs/results.md), from text on this machine:
- corpora/pydocs.jsonl: the docstrings of Python's standard library of 300+ characters, one document
  each (read with ast: nothing is imported; docstrings with doctests are left out);
- corpora/nodedocs.jsonl: the sections of Node.js's API reference (Debian's nodejs package puts its
  markdown in /usr/share/doc/nodejs/api), one document per section of 300+ characters, code blocks
  and tables left out;
- corpora/pyref.jsonl: the prose of Python's documentation (Debian's python3-doc: the
  reStructuredText sources of the tutorial, library reference, HOWTOs, What's New), a document
  per section; corpora/pyref_long.jsonl: the same a document per file, long documents: the first 250
  files of 60 sentences or more (by their full stops);
- corpora/kernel.jsonl: the prose of the Linux kernel's documentation (Debian's linux-doc-6.1), one
  document per section, the first 20,000 sections in path order;
- corpora/kernel_long.jsonl: the same a document per file, the first 400 files of 60 sentences or more;
- corpora/web_long.jsonl: narrative prose, the World English Bible (public domain, modern English,
  Debian's sword-text-web, read with pysword): a book's chapters in order, a document each time 60
  sentences or more are reached, footnotes left out.
$ sudo apt-get install python3-doc linux-doc-6.1 sword-text-web   # for pyref, kernel and web_long
$ pip install pysword                                             # for web_long
$ python scripts/corpora.py
$ python embed.py --dataset=corpora/pyref.jsonl      # and so on for each
"""
import ast, glob, gzip, importlib.util, json, os, re, sysconfig

def write(name, docs, limit=None):
    docs = list(dict.fromkeys(" ".join(d.split()) for d in docs if len(d) >= 300))[:limit]
    if not docs:
        print(f"corpora/{name}.jsonl: no source text on this machine, skipped")
        return
    os.makedirs("corpora", exist_ok=True)
    with open(f"corpora/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    print(f"corpora/{name}.jsonl: {len(docs)} documents, {sum(map(len, docs))} characters")

stdlib, docstrings = sysconfig.get_paths()["stdlib"], []
for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
    if re.search(r"/(tests?|idle_test|site-packages|lib2to3)/", path[len(stdlib):]):
        continue
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (SyntaxError, UnicodeDecodeError):
        continue
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in [tree] + [n for n in ast.walk(tree) if isinstance(n, kinds)]:
        doc = ast.get_docstring(node)
        if doc and ">>>" not in doc:
            docstrings.append(doc)
write("pydocs", docstrings)

sections = []
for path in sorted(glob.glob("/usr/share/doc/nodejs/api/*.md")):
    text = re.sub(r"```.*?```|<!--.*?-->", "", open(path, encoding="utf-8").read(), flags=re.S)
    for section in re.split(r"\n#+ [^\n]*", text):
        # tables, lists and tags left out
        lines = [line for line in section.splitlines() if line.strip()]
        sections.append(" ".join(line for line in lines if line.lstrip()[0] not in "|*-<>"))
write("nodedocs", sections)

# directives whose bodies are prose (an API entry's description, a note); other directives (code,
# tables, images, tables of contents) and literal blocks (after '::') are left out
PROSE = {"function", "class", "method", "attribute", "data", "exception", "decorator",
         "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod",
         "describe", "option", "cmdoption", "envvar", "note", "warning", "important", "tip", "hint",
         "caution", "attention", "seealso", "versionadded", "versionchanged", "deprecated",
         "impl-detail", "c:function", "c:macro", "c:type", "c:member", "c:var"}
RULE = re.compile(r"([=\-~^\"'`#*+])\1{2,}")

def rst_sections(text):
    """reStructuredText -> the prose of each section (headings split it): the text of paragraphs, list
    items and prose directives; code, literal blocks, tables, field lists and comments left out;
    inline markup keeps its text (:func:`len` -> len, `name <url>`_ -> name)."""
    out = [[]]
    skip = None  # lines indented deeper than this belong to a block that is not prose
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip is not None and (not stripped or indent > skip):
            continue
        skip = None
        if RULE.fullmatch(stripped) or i + 1 < len(lines) and RULE.fullmatch(lines[i + 1].strip()):
            out.append([])
        elif stripped.startswith(".."):
            directive = re.match(r"\.\. ([\w:-]+)::", stripped)
            if not directive or directive.group(1) not in PROSE:
                skip = indent
        elif stripped.endswith("::"):
            out[-1].append(stripped.rstrip(":") + ".")
            skip = indent
        elif stripped and stripped[0] not in "|+:" and not stripped.startswith(">>>"):
            out[-1].append(re.sub(r"^[*\-] |^#\. |^\d+\. ", "", stripped))
    prose = [" ".join(s) for s in out]
    prose = [re.sub(r":[\w:+-]+:`~?([^`<]*?)(?: <[^>]*>)?`", r"\1", p) for p in prose]
    prose = [re.sub(r"`([^`<]*?)(?: <[^>]*>)?`_{0,2}", r"\1", p).replace("``", "") for p in prose]
    return [re.sub(r"\*\*?([^*]+)\*\*?", r"\1", p) for p in prose]

pyref = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/**/*.rst.txt", recursive=True))
pyref = [rst_sections(open(p, encoding="utf-8").read()) for p in pyref]
write("pyref", [s for sections in pyref for s in sections])
# a file a document, of 60 sentences or more (by their full stops)
long = lambda files: [f for f in map(" ".join, files) if len(re.findall(r"[.!?] ", f)) >= 60]
write("pyref_long", long(pyref), limit=250)
kernel = sorted(glob.glob("/usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz", recursive=True))
kernel = [rst_sections(gzip.open(p, "rt", encoding="utf-8", errors="replace").read()) for p in kernel]
write("kernel", [s for sections in kernel for s in sections], limit=20_000)
write("kernel_long", long(kernel), limit=400)

# narrative prose: a book's chapters in order, a document each time 60 sentences are reached (by their
# full stops, quotes after them allowed); a short rest joins the book's last document, and a book of fewer
# than 60 sentences is left out
docs, sword = [], "/usr/share/sword"
sentences = lambda text: len(re.findall(r"[.!?][\u201d\u2019]* ", text))
if importlib.util.find_spec("pysword") and os.path.isdir(f"{sword}/modules/texts/ztext/engWEB2015eb"):
    from pysword.modules import SwordModules
    modules = SwordModules(sword)
    modules.parse_modules()
    bible = modules.get_bible_from_module("engWEB2015eb")
    for book in [b for books in bible.get_structure().get_books().values() for b in books]:
        doc, start = "", len(docs)
        for chapter in range(1, book.num_chapters + 1):
            osis = bible.get(books=[book.name], chapters=[chapter], clean=False, join=" ")
            doc += re.sub(r"<[^>]+>", "", re.sub(r"<note.*?</note>", " ", osis, flags=re.S)) + " "
            if sentences(doc) >= 60:
                docs.append(doc)
                doc = ""
        if doc and len(docs) > start:
            docs[-1] += doc
write("web_long", docs)
