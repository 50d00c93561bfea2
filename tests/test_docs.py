"""README.md and docs/: every relative link names a file that exists, and every #anchor a heading of its file
under GitHub's anchor rule."""
import collections
import pathlib
import re
import unicodedata

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCED_BLOCK = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]*)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _blank(match):
    """Remove code but keep its line breaks, so that positions still give line numbers."""
    return "\n" * match.group().count("\n")


def prose(text):
    """The Markdown outside fenced code blocks and inline code spans, line for line."""
    return CODE_SPAN.sub(_blank, FENCED_BLOCK.sub(_blank, text))


def github_slug(heading):
    """GitHub's anchor for a heading: its rendered text in lower case, keeping letters, marks, digits,
    underscores, spaces and hyphens, and spaces turned into hyphens."""
    text = LINK.sub(r"\1", heading).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(path):
    """The anchors of a Markdown file's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen = collections.Counter()
    found = set()
    for heading in HEADING.findall(FENCED_BLOCK.sub(_blank, path.read_text())):
        slug = github_slug(heading)
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


def broken_links(paths):
    """'file:line: target: why' for each relative link or anchor in paths that does not resolve."""
    problems = []
    for path in paths:
        text = prose(path.read_text())
        for match in LINK.finditer(text):
            target = match.group(2)
            if not target or URL_SCHEME.match(target):
                continue
            line = text.count("\n", 0, match.start()) + 1
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path
            if not destination.exists():
                problems.append(f"{path.name}:{line}: {target}: no such file")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                problems.append(f"{path.name}:{line}: {target}: no such heading")
    return problems


def test_readme_and_docs_links_resolve():
    assert broken_links(DOCS) == []


def test_every_doc_is_linked_from_the_readme():
    readme = prose((ROOT / "README.md").read_text())
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in LINK.findall(readme)}
    assert [doc.name for doc in DOCS[1:] if doc.resolve() not in linked] == []


def test_github_slug_rule():
    # The first is the anchor the README linked to while GitHub rendered it.
    assert github_slug("Flow-matching teachers: SiT-XL/2 and REPA") == "flow-matching-teachers-sit-xl2-and-repa"
    assert github_slug("A captioned toy: `python demo.py --dataset shapes-text`") == \
        "a-captioned-toy-python-demopy---dataset-shapes-text"
    assert github_slug("ImageNet-256 recipe") == "imagenet-256-recipe"
    assert github_slug("Déjà vu: **K = 4**, [see](x.md) snake_case ²") == "déjà-vu-k--4-see-snake_case-²"


def test_broken_links_and_anchors_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Part two\n")
    (tmp_path / "asset.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n"
        "## Title\n"
        "[fine](#title-1) [fine](other.md#part-two) ![fine](asset.png) [web](https://example.com/#x)\n"
        "[no file](missing.md) [no heading](#title-2)\n"
        "```bash\n[in code](gone.md)\n```\n"
        "`[in a span](gone.md)` [no heading\nthere](other.md#part-three)\n")
    assert broken_links([page]) == ["page.md:4: missing.md: no such file",
                                    "page.md:4: #title-2: no such heading",
                                    "page.md:8: other.md#part-three: no such heading"]
