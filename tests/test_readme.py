"""Issue 8 item 14: the README's Usage example runs as written (on the demo's tiny model and example image)."""

import re
from pathlib import Path

from attn_mod.eval.datasets import load_benchmark, make_synthetic_benchmark

README = Path(__file__).parents[1] / "README.md"


def test_readme_usage_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    assert "load_model" in code and "encode_batch" in code and "DESIGN.md" not in text
    assert (README.parent / "docs" / "formulas.md").is_file()
    # the shipped checkpoint and the example image `make demo` writes, in a fresh folder
    assets = tmp_path / "attn_mod" / "assets" / "tiny_demo"
    assets.mkdir(parents=True)
    (assets / "plain").symlink_to(README.parent / "attn_mod" / "assets" / "tiny_demo" / "plain")
    data = make_synthetic_benchmark(tmp_path / "bench" / "synthetic.tsv", n=1, seed=0)
    example = tmp_path / "runs" / "demo" / "examples" / "plain" / "0" / "image.png"
    example.parent.mkdir(parents=True)
    next(iter(load_benchmark(data))).load_image().save(example)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "VAS (ratio form" in out and "TargetAttention(" in out
