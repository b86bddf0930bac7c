"""
Writes the two corpora beside Lee on which the defaults were checked (docs/results.md), from text
on this machine:
- corpora/pydocs.jsonl: the docstrings of Python's standard library of 300+ characters, one document
  each (read with ast: nothing is imported; docstrings with doctests are left out);
- corpora/nodedocs.jsonl: the sections of Node.js's API reference (Debian's nodejs package puts its
  markdown in /usr/share/doc/nodejs/api), one document per section of 300+ characters, code blocks
  and tables left out.
$ python scripts/corpora.py
$ python embed.py --dataset=corpora/pydocs.jsonl && python embed.py --dataset=corpora/nodedocs.jsonl
"""
import ast, glob, json, os, re, sysconfig

def write(name, docs):
    docs = list(dict.fromkeys(" ".join(d.split()) for d in docs if len(d) >= 300))
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
