"""scripts/long_prompt.py: a paragraph-aligned start of the text plus the question, within the
token budget as the tokenizer counts it, and the longest such start."""

from __future__ import annotations

from conftest import load_script


def test_excerpt_fits_and_is_the_longest_whole_paragraph_start(real_model_dir, tmp_path, capsys):
    from mlx_lm.utils import load_tokenizer

    from mlxkv.eval.corpus import bundled_corpus

    script, tokenizer, text = load_script("long_prompt"), load_tokenizer(real_model_dir), bundled_corpus().text
    prompt = script.excerpt_prompt(tokenizer, text, 600)
    head = prompt.removesuffix(script.QUESTION)
    assert head != prompt and text.startswith(head) and text[len(head)] == "\n"
    assert len(tokenizer.encode(prompt)) <= 600
    longer = text[:text.index("\n", len(head) + 1)] + script.QUESTION  # one more line
    assert len(tokenizer.encode(longer)) > 600
    out = tmp_path / "p.txt"
    assert script.main(["--model", str(real_model_dir), "--tokens", "600", "--out", str(out)]) == 0
    assert out.read_text() == prompt
    assert script.main(["--model", str(real_model_dir), "--tokens", "10"]) == 2
    assert "leaves no room" in capsys.readouterr().err
