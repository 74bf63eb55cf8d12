"""Issue 8 item 14: the README's Usage example runs as written (on the demo's tiny model and example image)."""

import re
from pathlib import Path

from attn_mod.eval.datasets import load_benchmark, make_synthetic_benchmark
from attn_mod.tiny import save_tiny

README = Path(__file__).parents[1] / "README.md"


def test_readme_usage_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    assert "load_model" in code and "encode_batch" in code and "DESIGN.md" not in text
    assert (README.parent / "docs" / "formulas.md").is_file()
    # the files `make demo` writes, in a fresh folder
    save_tiny("qwen2_5_vl", tmp_path / "runs" / "demo" / "model")
    data = make_synthetic_benchmark(tmp_path / "runs" / "demo" / "data" / "synthetic.tsv", n=1, seed=0)
    next(iter(load_benchmark(data))).load_image().save(tmp_path / "runs" / "demo" / "data" / "example.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "VAS (ratio form" in out and "TargetAttention(" in out
