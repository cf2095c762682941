"""Build fastbert's embedded data sets from the docstrings of the Python standard library.

    python tools/build_corpus.py [--out fastbert/data]

Origin: the docstrings and block comments of the .py modules of the standard library of the Python
that runs this script (CPython 3.11.7 for the shipped files), read with `ast` (nothing is imported or
executed, nothing is downloaded), and the language-reference topics that ship with it as
pydoc_data/topics.py. The Python standard library is distributed under the PSF License Agreement;
the docstrings are its authors' English prose.

Outputs (see fastbert/data/README.md):
  corpus.txt.gz   pretraining corpus, plain format: one sentence per line, a blank line between
                  documents. One document per module: its module, class and function docstrings in
                  source order, cleaned of code (doctest lines, indented examples, lines that are
                  mostly symbols).
  classify.tsv    sequence classification: `sentence \t family`, the family of the stdlib module the
                  sentence documents (text, files, net, concurrency, numbers, data), balanced, shuffled.
  tokens.txt      token classification: `word TAG` per line, a blank line between sentences, TAG is
                  NAME when the word is a name the module defines at top level (function, class,
                  constant) and O otherwise; only sentences that mention at least one such name.
Everything is deterministic (sorted file walk, seeded shuffles).
"""

import argparse
import ast
import inspect
import os
import random
import re
import sysconfig

from build_world import corpus_summary, write_corpus, write_tags, write_tsv  # the shared file formats

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data"}
SKIP_FILES = {"this.py", "antigravity.py"}

FAMILIES = {  # module (first dotted component) -> family, for the classification set
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "stringprep", "codecs", "locale",
             "gettext", "html", "shlex", "_strptime", "_pydecimal_unused"],
    "files": ["os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "fileinput",
              "zipfile", "tarfile", "gzip", "bz2", "lzma", "zipimport", "ntpath", "posixpath",
              "genericpath", "stat", "io", "_pyio", "mailbox"],
    "net": ["socket", "ssl", "http", "urllib", "email", "smtplib", "imaplib", "poplib", "ftplib",
            "nntplib", "socketserver", "xmlrpc", "ipaddress", "mimetypes", "telnetlib", "wsgiref",
            "selectors"],
    "concurrency": ["threading", "asyncio", "multiprocessing", "concurrent", "queue", "sched",
                    "subprocess", "_threading_local", "signal"],
    "numbers": ["decimal", "_pydecimal", "fractions", "statistics", "random", "numbers", "cmath",
                "colorsys", "datetime", "_pydatetime", "calendar", "heapq", "bisect"],
    "data": ["json", "csv", "pickle", "pickletools", "copyreg", "shelve", "dbm", "sqlite3", "xml",
             "plistlib", "configparser", "tomllib", "base64", "binascii", "quopri", "uu",
             "struct", "marshal", "netrc"],
}

_SENT_END = re.compile(r"(?<=[a-z0-9\)\]\"'][.!?])\s+(?=[A-Z(\"'])")
_WORD = re.compile(r"[A-Za-z]+")


def stdlib_files(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(".py") and f not in SKIP_FILES and not dirpath.startswith("config-"):
                yield os.path.join(dirpath, f)


def docstrings(tree):
    """Module, class and function docstrings in source order."""
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    for n in nodes:
        doc = ast.get_docstring(n, clean=False)
        if doc:
            yield inspect.cleandoc(doc)


def is_prose(line):
    s = line.strip()
    if not s or s.startswith((">>>", "...", "$", "#", "|", "+-", "==", "--", "..", ":param", ":return",
                              ":raises", ":type", "@")):
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters >= 0.85 * len(s)


def paragraphs(doc):
    """Prose paragraphs of a cleaned docstring: code blocks (indented, after '::') are dropped."""
    out, cur, code = [], [], False
    for line in doc.splitlines() + [""]:
        if not line.strip():
            if cur:
                out.append(" ".join(cur))
            cur = []
            continue
        indented = line[:1] in (" ", "\t")
        if indented and (code or not cur):
            continue  # an example or a definition list body
        code = False
        if not is_prose(line):
            if cur:
                out.append(" ".join(cur))
            cur = []
            continue
        cur.append(line.strip())
        if line.rstrip().endswith("::"):
            code = True
    return out


def sentences(paragraph):
    for s in _SENT_END.split(paragraph):
        s = re.sub(r"\s+", " ", s).strip().replace("``", "").replace("`", "")
        words = s.split()
        if 4 <= len(words) <= 60 and s[0].isupper() and s[-1] in ".!?:" and is_prose(s):
            yield s


def comment_paragraphs(source):
    """Block comments (runs of full-line '#' comments) joined into paragraphs."""
    out, cur = [], []
    for line in source.splitlines() + [""]:
        s = line.strip()
        if s.startswith("#") and not s.startswith(("#!", "#-", "#=", "##")):
            text = s.lstrip("#").strip()
            if text and is_prose(text):
                cur.append(text)
                continue
        if cur:
            out.append(" ".join(cur))
        cur = []
    return out


def topic_paragraphs(text):
    """Paragraphs of a pydoc_data topic (the language reference as plain text)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [x.strip() for x in para.splitlines()]
        if lines and all(is_prose(x) for x in lines):
            out.append(" ".join(lines))
    return out


def module_name(root, path):
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def top_level_names(tree):
    names = set()
    for n in tree.body:
        if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(n.name)
        elif isinstance(n, ast.Assign):
            names.update(t.id for t in n.targets if isinstance(t, ast.Name))
    return {x for x in names if len(x) > 2 and not x.startswith("_")}


def _is_name(word, defined):
    """A word that names a top-level definition and reads as code (has _ , a digit, inner capitals
    or a call's parentheses), so plain English words that happen to be names (which, open) are O."""
    w = word.strip(".,:;'\"")
    call = w.endswith("()")
    w = w.removesuffix("()")
    codeish = call or "_" in w or any(c.isdigit() for c in w) or any(c.isupper() for c in w[1:])
    return w in defined and codeish


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "fastbert", "data"))
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--per-class", type=int, default=400)
    p.add_argument("--token-sentences", type=int, default=2000)
    args = p.parse_args(argv)
    family_of = {m: f for f, ms in FAMILIES.items() for m in ms}
    docs, labelled, tagged = [], [], []
    for path in stdlib_files(args.stdlib):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        name = module_name(args.stdlib, path)
        paras = [para for d in docstrings(tree) for para in paragraphs(d)] + comment_paragraphs(source)
        sents = [s for para in paras for s in sentences(para)]
        seen, uniq = set(), []
        for s in sents:
            if s not in seen:
                seen.add(s)
                uniq.append(s)
        if len(uniq) < 2:
            continue
        docs.append(uniq)
        fam = family_of.get(name.split(".")[0])
        if fam:
            labelled.extend((s, fam) for s in uniq)
        defined = top_level_names(tree)
        for s in uniq:
            words = s.split()
            tags = ["NAME" if _is_name(w, defined) else "O" for w in words]
            if "NAME" in tags:
                tagged.append(list(zip(words, tags)))
    topics = os.path.join(args.stdlib, "pydoc_data", "topics.py")
    if os.path.exists(topics):
        with open(topics, encoding="utf-8") as f:
            table = ast.literal_eval(ast.parse(f.read()).body[-1].value)
        for key in sorted(table):
            sents = [s for para in topic_paragraphs(table[key]) for s in sentences(para)]
            if len(sents) >= 2:
                docs.append(sents)
    os.makedirs(args.out, exist_ok=True)
    write_corpus(os.path.join(args.out, "corpus.txt.gz"), docs)
    rng = random.Random(0)
    by_fam = {}
    for s, fam in labelled:
        by_fam.setdefault(fam, []).append(s)
    rows = []
    for fam in sorted(by_fam):
        ss = by_fam[fam]
        rng.shuffle(ss)
        rows += [(s, fam) for s in ss[: args.per_class]]
    rng.shuffle(rows)
    write_tsv(os.path.join(args.out, "classify.tsv"), rows)
    rng.shuffle(tagged)
    write_tags(os.path.join(args.out, "tokens.txt"), tagged[: args.token_sentences])
    print(f"{corpus_summary(docs)}; classification rows "
          f"{len(rows)} ({ {k: min(len(v), args.per_class) for k, v in sorted(by_fam.items())} }); "
          f"token sentences {min(len(tagged), args.token_sentences)}")


if __name__ == "__main__":
    main()
