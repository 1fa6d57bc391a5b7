"""The manual: a short README, docs/ built by MkDocs in strict mode (a broken link or anchor fails the
build), the README's own links checked against the built pages, and the generated pages current."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 15_000  # bytes


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = build(ROOT / "mkdocs.yml", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        self.ids.update(v for k, v in attrs if k in ("id", "name") and v)


def ids_of(html: Path) -> set[str]:
    p = _Ids()
    p.feed(html.read_text())
    return p.ids


def links(markdown: str) -> list[str]:
    """Inline link targets, outside fenced code blocks."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_is_at_most_15_kb():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; keep it at most {README_LIMIT} and move detail to docs/"


def built(site: Path, page: Path) -> Path:
    """The HTML MkDocs writes for a page of docs/ (directory URLs: foo.md -> foo/index.html)."""
    rel = page.with_suffix("")
    return site / "index.html" if rel == Path("index") else site / rel / "index.html"


def test_the_docs_build_in_strict_mode(site: Path):
    """The fixture's build passed `--strict` with the config's validation, and built every page."""
    for page in DOCS.rglob("*.md"):
        assert built(site, page.relative_to(DOCS)).exists(), f"{page} was not built"


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path):
    """The config really turns broken links and anchors into errors (validation + strict)."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs" / "index.md"
    original = index.read_text()
    for broken, said in (("[x](no-such-page.md)", "no-such-page.md"),
                         ("[x](running.md#no-such-section)", "no-such-section")):
        index.write_text(original + f"\n{broken}\n")
        r = build(tmp_path / "mkdocs.yml", tmp_path / "site")
        assert r.returncode != 0 and said in r.stdout + r.stderr, (broken, r.stdout + r.stderr)


def test_the_readme_links_resolve(site: Path):
    """MkDocs does not see the README, so its links are checked here: each local file exists, and each
    anchor into docs/ is an id of the built page."""
    targets = [t for t in links(README.read_text()) if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        path, _, anchor = target.partition("#")
        assert path, f"README.md: in-page link {target!r}; link into docs/ instead"
        assert (ROOT / path).exists(), f"README.md links to {path}, which does not exist"
        if anchor:
            assert path.startswith("docs/") and path.endswith(".md"), target
            html = built(site, Path(path).relative_to("docs"))
            assert anchor in ids_of(html), f"README.md links to {target}, but that page has no anchor {anchor!r}"


def test_the_generated_pages_are_current():
    from mergeopt import docs_gen

    stale = docs_gen.stale()
    assert not stale, f"{stale} differ from the code; regenerate with: {docs_gen.REGENERATE}"


def test_the_reference_has_every_key_of_the_schema():
    """Every key of every model of the schema is a row of the reference, with a description."""
    from mergeopt.space import Space

    text = (DOCS / "reference" / "space-file.md").read_text()
    schema = Space.model_json_schema(by_alias=True)
    for model in [schema, *schema.get("$defs", {}).values()]:
        for key, field in model.get("properties", {}).items():
            assert field.get("description"), key
            assert f"| `{key}` |" in text, f"the reference has no row for {key}"


def test_the_getting_started_space_file_is_the_readmes():
    """The own-models space file appears in the README (which a test runs) and in getting started: the same."""
    def block(text: str) -> str:
        section = text[text.index("## A first study on your own models"):]
        return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)

    assert block((DOCS / "getting-started.md").read_text()) == block(README.read_text())


def test_the_benchmark_tables_are_rewritten_in_place(tmp_path: Path):
    """bench/readme_tables.py rewrites docs/benchmarks.md; without any JSON it leaves the page as it is."""
    page = tmp_path / "benchmarks.md"
    shutil.copy(DOCS / "benchmarks.md", page)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_tables.py"), "--page", str(page),
                        "--dir", str(tmp_path / "no-json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert page.read_text() == (DOCS / "benchmarks.md").read_text()
    text = page.read_text()
    for name in re.findall(r"<!-- bench:(\w+) -->", text):
        assert text.count(f"<!-- /bench:{name} -->") == 1, name
    assert "<!-- bench:" not in README.read_text(), "benchmark tables live in docs/benchmarks.md"
