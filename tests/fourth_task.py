"""A fourth task, defined in the test suite alone (no edit to the project): the tests that find it in the
facade, the CLI, MCP and both frameworks' tools share this one definition."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hd4k_tools.results import TaskResult
from hd4k_tools.tasks import TASKS, CliSpec, TaskCall, TaskSpec


class CountArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(min_length=1)
    what: str = Field(description="the kind of object to count", min_length=1)
    hd_num: int | None = None


class CountResult(TaskResult):
    what: str = ""


COUNT = TaskSpec(
    "count_objects",
    9,
    "chat",
    max_new_tokens=8,
    num_beams=1,
    description="Count objects of a kind in an image.",
    args=CountArgs,
    prepare=lambda *, what: TaskCall(f"How many {what} are there?", fields={"what": what}),
    result=CountResult,
    cli=CliSpec("count", help="count objects in an image"),
)
TASKS4 = TASKS.with_tasks(COUNT)
