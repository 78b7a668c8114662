"""Task prompts, defaults and result parsing (no model needed)."""

from __future__ import annotations

import pytest

from hd4k_tools.errors import InputError, TableParseError
from hd4k_tools.results import ChartTable, DocumentResult, PlanSummary, TaskResult, parse_table
from hd4k_tools.tasks import TASKS, VQA_PREFIX, chart_prompt, describe_prompt, document_prompt


def test_default_hd_num_per_task_follows_the_authors_evaluation() -> None:
    assert TASKS["read_document"].default_hd_num == 55
    assert TASKS["answer_chart_question"].default_hd_num == 25
    assert TASKS["describe_image"].default_hd_num == 16


def test_chart_prompt_is_the_vlmevalkit_vqa_prompt() -> None:
    # VLMEvalKit concatenates the prefix and the question with no separator.
    assert chart_prompt("  What is the max value? ") == VQA_PREFIX + "What is the max value?"
    assert TASKS["answer_chart_question"].num_beams == 3
    assert TASKS["answer_chart_question"].layout == "eval"


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_chart_question_is_an_input_error(bad: str) -> None:
    with pytest.raises(InputError, match="question"):
        chart_prompt(bad)


def test_prompt_options_are_validated() -> None:
    assert "Markdown" in document_prompt("markdown")
    assert "plain text" in document_prompt("text")
    assert describe_prompt("detailed") == "Illustrate the fine details present in the image"
    with pytest.raises(InputError, match="markdown"):
        document_prompt("html")
    with pytest.raises(InputError, match="brief"):
        describe_prompt("medium")


def test_parse_markdown_table() -> None:
    text = "Here is the data:\n| Year | Sales | Cost |\n|---|---:|:---:|\n| 2020 | 10 | 4 |\n| 2021 | 12 | 5 |\nDone."
    table = parse_table(text)
    assert table == ChartTable(columns=["Year", "Sales", "Cost"], rows=[["2020", "10", "4"], ["2021", "12", "5"]])
    assert table.as_dicts()[1] == {"Year": "2021", "Sales": "12", "Cost": "5"}


def test_parse_pipe_rows_without_separator() -> None:
    table = parse_table("a | b\n1 | 2\n3 | 4")
    assert table.columns == ["a", "b"]
    assert table.rows == [["1", "2"], ["3", "4"]]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("The answer is 42.", "not a table"),
        ("| a | b |\n|---|---|", "no data rows"),
        ("| a | b |\n|---|---|\n| 1 | 2 | 3 |", "different widths"),
    ],
)
def test_not_a_table_is_a_typed_error(text: str, match: str) -> None:
    with pytest.raises(TableParseError, match=match):
        parse_table(text)


def _result(**kw: object) -> TaskResult:
    plan = PlanSummary(
        hd_num=25, rows=3, cols=7, num_tiles=21, image_tokens=3217, input_size=(3840, 1600), padded_size=(2352, 1008)
    )
    return TaskResult(task="describe_image", text="a <b>cat</b>", model="m", hd_num=25, plans=[plan], **kw)


def test_result_html_escapes_and_shows_plan() -> None:
    html = _result()._repr_html_()
    assert "&lt;b&gt;cat&lt;/b&gt;" in html
    assert "HD-25: 3x7 tiles" in html
    assert "3217 image tokens" in html


def test_document_result_joins_pages() -> None:
    doc = DocumentResult(source="x.pdf", pages=[_result(page=1), _result(page=2)])
    assert doc.text == "a <b>cat</b>\n\na <b>cat</b>"
    assert "2 page(s)" in doc._repr_html_()
    assert doc.pages[0].plan is not None and doc.pages[0].plan.grid == "3x7"
    # Results serialise to JSON for the CLI and the server.
    assert doc.model_dump()["pages"][1]["page"] == 2


def test_thumbnail_is_shown_but_not_serialised() -> None:
    from PIL import Image

    from hd4k_tools.results import thumbnail_data_url

    url = thumbnail_data_url(Image.new("RGB", (1000, 500), "red"))
    assert url.startswith("data:image/jpeg;base64,")
    result = _result(thumbnail=url)
    assert url in result._repr_html_()
    assert "thumbnail" not in result.model_dump()


def test_chart_result_html_shows_question_and_table() -> None:
    from hd4k_tools.results import ChartResult

    table = parse_table("| x | y |\n|---|---|\n| <1> | 2 |")
    result = ChartResult(task="answer_chart_question", text="t", model="m", question="How <many>?", table=table)
    html = result._repr_html_()
    assert "How &lt;many&gt;?" in html
    assert "<th>x</th>" in html and "<td>&lt;1&gt;</td>" in html
