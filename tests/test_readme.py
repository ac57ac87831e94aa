"""Issue 26: a short README whose tables are generated from the committed results files (regenerated here: the test
fails when README.md or docs/performance.md differ), one home for results (at most 40 files in bench/results, each
cited and named by its device), and bench/ holding no one-off scripts."""
import json
import re
from pathlib import Path

import pytest

from hashattention.benchmarks import readme_tables as rt

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
COMMANDS = ("bash scripts/setup.sh && .venv/bin/hashattention demo        # set up, then passkey retrieval on the "
            "embedded model",
            "bash scripts/setup.sh && .venv/bin/python -m pytest -q       # set up, then the test suite (what .ci/run "
            "calls)")


def test_tables_are_generated_from_the_results_files():
    stale = rt.update(check=True)
    assert stale == [], f"{stale}: run `python -m hashattention.benchmarks.readme_tables` and commit the result"
    text = README.read_text()
    for name in ("quality", "kernels", "decode", "memory"):
        assert f"<!-- table:{name} -->" in text and f"<!-- /table:{name} -->" in text
    results = text[text.index("## Results"):text.index("## Supported models")]
    heads = [ln for ln in results.splitlines() if ln.startswith("| ") and "---" not in ln
             and results.splitlines()[results.splitlines().index(ln) + 1].startswith("|---")]
    assert len(heads) == 4
    for head in heads:  # every table names the device of its numbers (a column, or in its header)
        assert "device" in head or re.search(r"\b(H100|H200|CPU)\b", head), head


def test_readme_is_short_starts_with_the_two_commands_and_carries_no_history():
    assert len(README.read_bytes()) <= 12 * 1024
    lines = README.read_text().splitlines()
    assert lines[:5] == ["# hashattention", "", "```bash", COMMANDS[0], COMMANDS[1]]
    text = README.read_text()
    labels = re.findall(r"\b(?:s\d{1,2}[a-z]?|v\d{1,2})\b|_t3\d\b|\bsession\b", text, re.I)
    assert not labels, f"development-history labels in the README: {labels}"
    assert "## Supported models" in text and "hashattention generate" in text


def _cited(name: str, text: str) -> bool:
    stem, ext = name.rsplit(".", 1)
    return name in text or re.search(re.escape(stem) + r"\.\{[a-z,]*\b" + ext + r"\b", text) is not None


def _committed_results() -> list[str]:
    """The files of bench/results in git (a run's output left there uncommitted is not judged), else all."""
    import subprocess
    try:
        out = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = []
    return sorted(Path(p).name for p in out if (ROOT / p).exists()) or sorted(p.name for p in RESULTS.iterdir())


def test_results_folder_holds_at_most_40_cited_files_named_by_device():
    files = _committed_results()
    assert len(files) <= 40, f"{len(files)} files in bench/results"
    citing = README.read_text() + (RESULTS / "README.md").read_text() + "".join(
        p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for name in files:
        if name == "README.md":
            continue
        assert _cited(name, citing), f"bench/results/{name} is cited by neither the README, a doc nor the index"
        if name.startswith("bucket_proj_"):  # the fitted projection bucket_bench loads by name (an artifact)
            continue
        stem, ext = name.rsplit(".", 1)
        assert ext in ("md", "json", "png"), name
        parts = stem.split("_")
        assert stem.startswith("quality_summary") or any(re.fullmatch(r"[hab]\d{3}|cpu|l4|t4", p) for p in parts), \
            f"{name}: no device in its name (<what>_<device>[_<variant>])"


def test_bench_holds_no_one_off_scripts():
    top = {p.name for p in (ROOT / "bench").iterdir()}
    assert "gpu_env.sh" in top and not [n for n in top if n.endswith(".py")], top
    for t in (ROOT / "tests").glob("*.py"):  # no test imports a script from bench/
        if t.name == "test_readme.py":
            continue
        assert not re.search(r"[\"']bench[\"']\)|bench/\w+\.py", t.read_text()), t.name


ROWS = [
    {"mode": "everywhere", "budget": "1/32", "policy": "quest", "score": 9.8, "dense": 37.4, "delta_vs_dense": -27.6,
     "ci95": [-33.0, -22.1], "n_items": 66, "device": "NVIDIA H100 80GB HBM3", "maps": "-"},
    {"mode": "everywhere", "budget": "1/16", "policy": "hash", "score": 33.3, "dense": 40.0, "delta_vs_dense": -6.7,
     "ci95": [-10.2, -3.1], "n_items": 66, "device": "NVIDIA H200", "maps": "shipped"},
    {"mode": "context", "budget": "1/16", "policy": "hash-sum", "score": 35.0, "dense": 36.0, "delta_vs_dense": -1.0,
     "ci95": [-2.5, 0.4], "n_items": 88, "device": "cpu (x86_64, 2 cores)", "maps": "shipped"},
    # left out of the README (docs/quality.md has them): other group selections, maps variants trained further
    {"mode": "context", "budget": "1/16", "policy": "hash-max", "score": 34.0, "dense": 36.0, "delta_vs_dense": -2.0,
     "ci95": [-2.5, 0.4], "n_items": 88, "device": "cpu (x86_64, 2 cores)", "maps": "shipped"},
    {"mode": "context", "budget": "1/16", "policy": "hash-sum", "score": 34.0, "dense": 36.0, "delta_vs_dense": -2.0,
     "ci95": [-2.5, 0.4], "n_items": 88, "device": "cpu (x86_64, 2 cores)", "maps": "long_group"},
]


@pytest.mark.parametrize("wrap", [False, True])
def test_quality_table_from_a_summary_file(tmp_path, wrap):
    (tmp_path / "bench/results").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="quality_summary.json is missing"):
        rt.quality(tmp_path)
    (tmp_path / "bench/results/quality_summary.json").write_text(json.dumps({"rows": ROWS} if wrap else ROWS))
    md = rt.quality(tmp_path)
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| mode")]
    assert rows == ["| context | **hash-sum** | shipped | 1/16 | 35.0 | 36.0 | -1.0 [-2.5, +0.4] | 88 | CPU |",
                    "| everywhere | quest | - | 1/32 | 9.8 | 37.4 | -27.6 [-33.0, -22.1] | 66 | H100 |",
                    "| everywhere | **hash** | shipped | 1/16 | 33.3 | 40.0 | -6.7 [-10.2, -3.1] | 66 | H200 |"]
    assert "quality_summary.json" in md
    readme = "# x\n\n<!-- table:quality -->\nold\n<!-- /table:quality -->\nend\n"
    out = rt.render(readme, tmp_path)
    assert out.startswith("# x\n\n<!-- table:quality -->\n| mode |") and out.endswith("<!-- /table:quality -->\nend\n")
    assert rt.render(out, tmp_path) == out  # stable
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        rt.render("<!-- table:nope -->\n<!-- /table:nope -->\n", tmp_path)
    assert rt.device_label("NVIDIA H200") == "H200" and rt.device_label("cpu (x86_64, 2 cores)") == "CPU"


def test_memory_command_writes_a_results_file(tmp_path, capsys):
    from hashattention.cli import main as cli
    out = tmp_path / "memory_h100.json"
    assert cli.main(["memory", "llama-3.1-8b,smollm2-135m", "--context", "32K,128K", "--gpu-memory", "80GiB",
                     "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    data = json.loads(out.read_text())
    assert len(data["reports"]) == 4 == len(printed) and data["command"].startswith("hashattention memory llama")
    r = data["reports"][1]
    assert (r["model"], r["context"], r["signature_to_kv_ratio"], r["max_batch_dense"]) == \
        ("llama-3.1-8b", 131072, 1 / 128, 3)
    assert cli.main(["memory", "llama-3.1-8b", "--context", "128K", "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)  # one report: an object, as before
