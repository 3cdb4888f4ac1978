"""Lenient parsing of the JSON analysis the default prompt asks for."""

from imgpipe_dagster.gpu_server.analysis_parse import parse_analysis


def test_plain_json_object_parses():
    analysis, ok = parse_analysis('{"caption": "a cat", "tags": ["cat"], "safety": {"nsfw": false}}')
    assert ok
    assert analysis == {"caption": "a cat", "tags": ["cat"], "safety": {"nsfw": False}}


def test_json_inside_code_fence_and_prose_parses():
    raw = 'Sure! Here is the analysis:\n```json\n{"caption": "a dog", "objects": ["dog", "ball"]}\n```\nHope it helps.'
    analysis, ok = parse_analysis(raw)
    assert ok and analysis["objects"] == ["dog", "ball"]


def test_object_embedded_in_prose_without_fence_parses():
    analysis, ok = parse_analysis('The answer is {"caption": "sky"} as requested')
    assert ok and analysis == {"caption": "sky"}


def test_trailing_commas_are_forgiven():
    analysis, ok = parse_analysis('{"tags": ["a", "b",], "caption": "x",}')
    assert ok and analysis == {"tags": ["a", "b"], "caption": "x"}


def test_output_truncated_at_the_token_limit_is_closed():
    analysis, ok = parse_analysis('{"caption": "a red car", "tags": ["car", "street"], "objects": ["car", "tr')
    assert ok
    assert analysis["caption"] == "a red car"
    assert analysis["tags"] == ["car", "street"]
    assert analysis["objects"][0] == "car"


def test_comma_separated_tag_string_becomes_a_list():
    analysis, ok = parse_analysis('{"tags": "cat, sofa , window"}')
    assert ok and analysis["tags"] == ["cat", "sofa", "window"]


def test_text_without_json_is_not_an_analysis():
    assert parse_analysis("A photo of a cat on a sofa.") == (None, False)
    assert parse_analysis("") == (None, False)
    assert parse_analysis("[1, 2, 3]") == (None, False)
    assert parse_analysis("{not json at all") == (None, False)
