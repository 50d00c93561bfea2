"""The captioned shapes (data.py's grammar and renderer) and prompt adherence (evaluations.adherence)."""
import itertools

import numpy as np
import pytest

from data import (ATTRIBUTES, HELD_OUT_PAIRS, SHAPE_NAMES, caption, parse_caption, render_captioned,
                  render_prompts)
from evaluations import adherence
from evaluations.small import load_small_features, shipped_classifier

EVERY_PROMPT = [caption(kind, pattern, colour) for kind, pattern, colour in
                itertools.product((None, *SHAPE_NAMES), (None, *ATTRIBUTES["pattern"]), (None, *ATTRIBUTES["colour"]))]


@pytest.fixture(scope="module")
def classifier():
    return shipped_classifier("shapes-text")


@pytest.fixture(scope="module")
def features(classifier):
    return load_small_features(classifier, "shapes-text")


def test_every_prompt_of_the_grammar_parses_back_and_nothing_else_does():
    assert len(set(EVERY_PROMPT)) == 6 * 3 * 6
    for prompt in EVERY_PROMPT:
        assert caption(**parse_caption(prompt)) == prompt
    assert parse_caption("a striped red disc") == dict(kind="disc", pattern="striped", colour="red")
    assert parse_caption("a blue shape") == dict(kind=None, pattern=None, colour="blue")
    for bad in ["a red striped disc", "a red red disc", "the disc", "a cube", "a  disc", "a", "a disc now"]:
        with pytest.raises(ValueError, match="is not a shapes-text prompt"):
            parse_caption(bad)


def test_captioned_renders_keep_the_composition_split_and_name_what_they_show():
    images, prompts, values = render_captioned(500, seed=3)
    again = render_captioned(500, seed=3)
    assert np.array_equal(images, again[0]) and prompts == again[1]
    assert images.shape == (500, 16, 16, 3) and images.dtype == np.uint8
    pairs = {(SHAPE_NAMES[k], ATTRIBUTES["colour"][c]) for k, c in zip(values["kind"], values["colour"])}
    assert not pairs & HELD_OUT_PAIRS and len(pairs) == 20
    for prompt, *value in zip(prompts, *(values[a] for a in ATTRIBUTES)):
        named = parse_caption(prompt)
        assert all(named[a] in (None, ATTRIBUTES[a][v]) for a, v in zip(ATTRIBUTES, value))
    _, held_prompts, _ = render_captioned(100, seed=3, split="held_out")
    named = [parse_caption(p) for p in held_prompts]
    assert {(n["kind"], n["colour"]) for n in named} == HELD_OUT_PAIRS


def test_adherence_by_hand():
    named = np.array([[0, -1, 2], [1, 1, -1], [-1, -1, -1]])
    read = np.array([[0, 0, 3], [1, 1, 0], [4, 1, 2]])
    assert adherence.adherence(read, named) == dict(kind=1.0, pattern=1.0, colour=0.0, all=2 / 3)


def test_adherence_of_real_renders_is_their_ceiling_and_shuffled_prompts_are_at_chance(features):
    _, prompts, _ = render_captioned(2000, seed=5)
    scores = adherence.score(render_prompts(prompts, seed=11), prompts, features)  # other renders than the ceiling's
    for key, value in scores["samples"].items():  # real renders of the prompts score their ceiling, up to noise
        assert abs(value - scores["ceiling"][key]) < 0.03, (key, scores)
    assert min(scores["ceiling"][a] for a in ATTRIBUTES) > 0.8
    for a, options in ATTRIBUTES.items():
        assert abs(scores["floor"][a] - 1 / len(options)) < 0.05, (a, scores["floor"])


def test_adherence_cli_scores_samples_and_stops_on_a_prompt_outside_the_grammar(classifier, tmp_path, monkeypatch,
                                                                                capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a striped red disc\na blue square\n")
    indices = np.arange(20) % 2
    np.savez(tmp_path / "samples.npz", render_prompts([prompts.read_text().split("\n")[i] for i in indices], 9),
             indices)
    result = adherence.main([str(tmp_path / "samples.npz"), str(prompts), "--classifier", classifier])
    assert set(result["samples"]) == {"kind", "pattern", "colour", "all"} and result["fid"] >= 0
    assert "ceiling" in capsys.readouterr().out
    prompts.write_text("a striped red disc\na red striped disc\n")
    monkeypatch.setattr(adherence, "load_small_features", pytest.fail)
    with pytest.raises(ValueError, match="'a red striped disc' is not a shapes-text prompt"):
        adherence.main([str(tmp_path / "samples.npz"), str(prompts)])
