"""Every SQL statement of the package is parameterised: values travel as parameters, never in the text.

Two checks: ruff's S608 (string-built SQL) over the package, and a stricter scan of the syntax tree
that flags any SQL text built with %-formatting, str.format or + on a variable, and any f-string
SQL whose interpolated parts are not constants. Interpolation is allowed only of module constants
(ALL_CAPS names: column lists, shared fragments) and of the few local fragments listed below, each
of which is picked from literals in the code, never from input. psycopg.sql.SQL(...).format with
sql.Identifier is the way to put a name into a statement and is not flagged.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "imgpipe_dagster"
# SQL in this project is written in upper-case keywords; lower-case prose ("drop directory") is not SQL.
SQL_TEXT = re.compile(
    r"\b(SELECT|INSERT INTO|UPDATE \w+|DELETE FROM|CREATE (TEMP |UNIQUE )?(TABLE|INDEX|VIEW|DATABASE)|ALTER TABLE"
    r"|DROP (TABLE|INDEX|DATABASE|VIEW)|COPY \w+|WHERE|ON CONFLICT|LEFT JOIN)\b"
)
# (file relative to the package, local name) -> why it is a constant fragment and not a value
DOCUMENTED_FRAGMENTS = {
    ("store/verify.py", "where"): "'' or a fixed 'WHERE c.shard_id = ANY(%(shards)s)' (shards are a parameter)",
    ("store/verify.py", "orphan_where"): "'' or a fixed 'AND r.shard_id = ANY(%(shards)s)'",
    ("store/work.py", "columns"): "join of the module's constant column tuple",
    ("store/work.py", "placeholders"): "a run of '%s' placeholders, one per constant column",
    ("store/work.py", "updates"): "'c = EXCLUDED.c' for each constant column",
    ("store/requeue.py", "where"): "fixed clauses of _selection joined by AND; classes, host, shards, since are parameters",
    ("store/results.py", "where"): "the fixed shard and analysis-version clause of _where; their values are parameters",
}


def _is_constant_name(name: str) -> bool:
    return name.lstrip("_").isupper()


def _names(node: ast.AST) -> set[str]:
    """Free names an expression reads (names bound by its own comprehensions excluded)."""
    bound = {t.id for comp in ast.walk(node) if isinstance(comp, ast.comprehension)
             for t in ast.walk(comp.target) if isinstance(t, ast.Name)}  # fmt: skip
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


def _sql_text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value if SQL_TEXT.search(node.value) else None
    if isinstance(node, ast.JoinedStr):
        text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
        return text if SQL_TEXT.search(text) else None
    return None


def sql_building_problems(path: Path, source: str | None = None) -> list[str]:
    source = path.read_text() if source is None else source
    relative = path.relative_to(PACKAGE).as_posix() if path.is_relative_to(PACKAGE) else path.name
    problems = []
    for node in ast.walk(ast.parse(source)):
        where = f"{relative}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.JoinedStr) and _sql_text(node):
            for value in (v.value for v in node.values if isinstance(v, ast.FormattedValue)):
                for name in sorted(_names(value)):
                    if not _is_constant_name(name) and (relative, name) not in DOCUMENTED_FRAGMENTS:
                        problems.append(f"{where}: f-string SQL interpolates {name!r} "
                                        f"({ast.get_source_segment(source, value)})")  # fmt: skip
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and _sql_text(node.left):
            problems.append(f"{where}: SQL built with % formatting")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            sides = (node.left, node.right)
            if any(_sql_text(s) for s in sides) and not all(
                isinstance(s, ast.Constant | ast.JoinedStr | ast.BinOp) for s in sides
            ):
                problems.append(f"{where}: SQL concatenated with a variable")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
              and _sql_text(node.func.value)):  # fmt: skip
            problems.append(f"{where}: SQL built with str.format (use psycopg.sql for identifiers)")
    return problems


def test_no_sql_is_built_from_values():
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in sql_building_problems(path)]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    "code",
    [
        'conn.execute(f"SELECT * FROM corpus_urls WHERE url = \'{url}\'")',
        'conn.execute("DELETE FROM shards WHERE shard_id = \'%s\'" % shard)',
        'conn.execute("UPDATE corpus_urls SET state = \'{}\'".format(state))',
        'conn.execute("SELECT count(*) FROM corpus_urls WHERE shard_id = " + shard)',
    ],
)
def test_the_scan_catches_sql_built_from_values(tmp_path, code):
    module = tmp_path / "bad.py"
    module.write_text(code + "\n")
    assert sql_building_problems(module), f"not flagged: {code}"


@pytest.mark.parametrize(
    "code",
    [
        'conn.execute("SELECT * FROM corpus_urls WHERE url = %s", (url,))',
        'conn.execute(f"SELECT {\', \'.join(RESULT_COLUMNS)} FROM url_analysis_results WHERE url_hash = %s", (h,))',
        'conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))',
        'log.info("updated %d rows" % n)',
    ],
)
def test_the_scan_allows_parameters_and_constants(tmp_path, code):
    module = tmp_path / "good.py"
    module.write_text(code + "\n")
    assert sql_building_problems(module) == []


def test_ruff_s608_is_clean_on_the_package():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the dev extra)")
    result = subprocess.run([ruff, "check", "--select", "S608", "--no-cache", str(PACKAGE)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
