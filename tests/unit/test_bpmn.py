"""BPMN 2.0 workflows: read into the YAML workflow model (the twin of the smart assistant
included), refused with the file, element, id and line when unsupported, and run by the
same engine with the same results as their YAML twins (model calls answered in-process)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from clawdbot.gen.v1 import router_pb2
from clawdbot.orchestrator.bpmn import BpmnError, load_bpmn
from clawdbot.orchestrator.definitions import Catalog, Workflow, load_catalog
from clawdbot.orchestrator.engine import Engine, StepFailed

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "config" / "workflows"
HEAD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"'
    ' xmlns:clawdbot="https://clawdbot.dev/bpmn" id="defs">\n'
    '<bpmn:process id="p" isExecutable="true">\n'
)
TAIL = "</bpmn:process>\n</bpmn:definitions>\n"


def write(tmp_path: Path, body: str, name: str = "w.bpmn") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + body + TAIL)
    return path


def line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def task(ident: str, kind: str = "transform", **extensions: Any) -> str:
    """A service task; `value=` is short for a transform's `params: {value: ...}`."""
    if "value" in extensions:
        extensions["params"] = {"value": extensions.pop("value")}
    inner = "".join(
        f"<clawdbot:{k}>{yaml.safe_dump(v, default_flow_style=True).strip()}</clawdbot:{k}>"
        for k, v in extensions.items()
    )
    holder = f"<bpmn:extensionElements>{inner}</bpmn:extensionElements>" if inner else ""
    return f'<bpmn:serviceTask id="{ident}" clawdbot:type="{kind}">{holder}</bpmn:serviceTask>\n'


def flow(ident: str, source: str, target: str, condition: str | None = None) -> str:
    if condition is None:
        return f'<bpmn:sequenceFlow id="{ident}" sourceRef="{source}" targetRef="{target}"/>\n'
    return (
        f'<bpmn:sequenceFlow id="{ident}" sourceRef="{source}" targetRef="{target}">'
        f"<bpmn:conditionExpression>{condition}</bpmn:conditionExpression></bpmn:sequenceFlow>\n"
    )


def yaml_workflow(tmp_path: Path, name: str, body: dict[str, Any]) -> Workflow:
    # A folder of its own: the BPMN twin beside it has the same name.
    folder = tmp_path / "yaml-twin"
    folder.mkdir(exist_ok=True)
    (folder / "twin.yaml").write_text(yaml.safe_dump({"workflows": {name: body}}))
    catalog = load_catalog(folder)
    assert not catalog.problems, catalog.problems
    return catalog.workflows[name]


def comparable(workflow: Workflow) -> dict[str, Any]:
    """What a run depends on: everything but the name, source, description and the
    spelling of dependencies (compared as `Workflow.dependencies`)."""
    dumped = workflow.model_dump(exclude={"name", "source", "description"})
    for step in dumped["steps"]:
        step.pop("needs")
    return dumped


async def run(workflow: Workflow, run_input: Any, models: Any, retrieve: Any = None) -> dict[str, Any]:
    catalog = Catalog(workflows={workflow.name: workflow})
    return await Engine(lambda: catalog, models, retrieve).run(workflow.name, run_input, router_pb2.RequestMeta())


def outcome(result: dict[str, Any]) -> tuple[str, Any, dict[str, str]]:
    return result["status"], result["output"], {s["id"]: s["status"] for s in result["steps"]}


# --- the smart assistant twin ---------------------------------------------------------


def test_the_bpmn_smart_assistant_is_the_exact_twin_of_the_yaml_one() -> None:
    [twin] = load_bpmn(WORKFLOWS / "smart_assistant_bpmn.bpmn")
    original = load_catalog(WORKFLOWS).workflows["smart_assistant"]
    assert twin.name == "smart_assistant_bpmn" and twin.description == original.description
    assert comparable(twin) == comparable(original)
    assert [twin.dependencies(s) for s in twin.steps] == [original.dependencies(s) for s in original.steps]
    answer = {s.id: s for s in twin.steps}["answer"]
    assert answer.needs == ("intent", "knowledge") and answer.when is None
    assert {s.id: s for s in twin.steps}["knowledge"].on_error == "continue"


class Assistant:
    """The smart assistant's models, answered in-process."""

    async def __call__(
        self, meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], timeout_s: float
    ) -> tuple[Any, str, str]:
        await asyncio.sleep(0.01)
        if task == "transcription":
            return {"text": "what is clawdbot"}, "asr-1", "miss"
        if task == "intent":
            return {"data": [{"intent": "question"}]}, "intent-1", "miss"
        if task == "chat":
            notes = body["messages"][0]["content"]
            return {"choices": [{"message": {"content": f"answer ({notes})"}}]}, "chat-1", "miss"
        return {"audio": "UklGRg=="}, "speech-1", "miss"


async def knowledge(query: str, top_k: int, min_score: float | None) -> list[dict[str, Any]]:
    return [{"text": "Clawdbot is a gateway.", "source": "readme.md"}][:top_k]


async def broken_knowledge(query: str, top_k: int, min_score: float | None) -> list[dict[str, Any]]:
    raise StepFailed({"message": "index unavailable", "code": "no_index"})


@pytest.mark.asyncio
@pytest.mark.parametrize("retrieve", [knowledge, broken_knowledge])
async def test_the_twins_run_alike_with_and_without_knowledge(retrieve: Any) -> None:
    [twin] = load_bpmn(WORKFLOWS / "smart_assistant_bpmn.bpmn")
    original = load_catalog(WORKFLOWS).workflows["smart_assistant"]
    from_bpmn = outcome(await run(twin, {"audio": "UklGRg=="}, Assistant(), retrieve))
    from_yaml = outcome(await run(original, {"audio": "UklGRg=="}, Assistant(), retrieve))
    assert from_bpmn == from_yaml
    status, output, steps = from_bpmn
    assert status == "succeeded" and output["audio"] == "UklGRg=="
    if retrieve is broken_knowledge:
        assert steps["knowledge"] == "failed" and steps["answer"] == "succeeded"
        assert output["answer"] == "answer (Notes: )"
    else:
        assert output["answer"] == "answer (Notes: Clawdbot is a gateway.)" and output["sources"] == ["readme.md"]


# --- mapping --------------------------------------------------------------------------

KIND = "steps.classify.output.kind"
BRANCHES = (
    '<bpmn:startEvent id="start"/>\n'
    + task("classify", value="${input}")
    + '<bpmn:exclusiveGateway id="which" default="to_other"/>\n'
    + task("a", value="A")
    + task("a_more", value="A+")
    + task("b", value="B")
    + task("other", value="other")
    + '<bpmn:exclusiveGateway id="merge"/>\n'
    + task("final", value="${[steps.a_more.output, steps.b.output, steps.other.output][?@] | [0]}")
    + '<bpmn:endEvent id="end"/>\n'
    + flow("f1", "start", "classify")
    + flow("f2", "classify", "which")
    + flow("to_a", "which", "a", f"{KIND} == 'a'")
    + flow("to_b", "which", "b", f"{KIND} == 'b'")
    + flow("to_other", "which", "other")
    + flow("f3", "a", "a_more")
    + flow("f4", "a_more", "merge")
    + flow("f5", "b", "merge")
    + flow("f6", "other", "merge")
    + flow("f7", "merge", "final")
    + flow("f8", "final", "end")
)


def test_an_exclusive_gateway_gives_first_match_conditions_and_a_default(tmp_path: Path) -> None:
    [workflow] = load_bpmn(write(tmp_path, BRANCHES))
    steps = {s.id: s for s in workflow.steps}
    assert steps["a"].when == f"{KIND} == 'a'"
    assert steps["a_more"].when == f"{KIND} == 'a'" and steps["a_more"].needs == ("a",)  # skipped with `a`
    assert steps["b"].when == f"!({KIND} == 'a') && ({KIND} == 'b')"
    assert steps["other"].when == f"!({KIND} == 'a') && !({KIND} == 'b')"
    assert steps["final"].when is None and steps["final"].needs == ("a_more", "b", "other")
    assert [s.id for s in workflow.steps] == ["classify", "a", "a_more", "b", "other", "final"]


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["a", "b", "c"])
async def test_a_bpmn_branch_runs_like_its_yaml_twin(tmp_path: Path, kind: str) -> None:
    [workflow] = load_bpmn(write(tmp_path, BRANCHES))
    final = "${[steps.a_more.output, steps.b.output, steps.other.output][?@] | [0]}"
    twin = yaml_workflow(
        tmp_path,
        "p",
        {
            "steps": [
                {"id": "classify", "type": "transform", "params": {"value": "${input}"}},
                {"id": "a", "type": "transform", "if": f"{KIND} == 'a'", "params": {"value": "A"}},
                {
                    "id": "a_more",
                    "type": "transform",
                    "needs": ["a"],
                    "if": f"{KIND} == 'a'",
                    "params": {"value": "A+"},
                },
                {"id": "b", "type": "transform", "if": f"{KIND} == 'b'", "params": {"value": "B"}},
                {
                    "id": "other",
                    "type": "transform",
                    "if": f"!contains(['a', 'b'], {KIND})",
                    "params": {"value": "other"},
                },
                {"id": "final", "type": "transform", "needs": ["a_more", "b", "other"], "params": {"value": final}},
            ]
        },
    )
    from_bpmn = outcome(await run(workflow, {"kind": kind}, None))
    assert from_bpmn == outcome(await run(twin, {"kind": kind}, None))
    assert from_bpmn[1] == {"a": "A+", "b": "B", "c": "other"}[kind]


def test_a_timer_boundary_is_the_task_timeout(tmp_path: Path) -> None:
    body = (
        task("slow", "model", params={"task": "chat"})
        + '<bpmn:boundaryEvent id="late" attachedToRef="slow"><bpmn:timerEventDefinition>'
        "<bpmn:timeDuration>PT1M30.5S</bpmn:timeDuration></bpmn:timerEventDefinition></bpmn:boundaryEvent>\n"
        + task("quick", "model", params={"task": "chat"})
        + '<bpmn:boundaryEvent id="soon" attachedToRef="quick"><bpmn:timerEventDefinition>'
        "<bpmn:timeDuration>PT0.2S</bpmn:timeDuration></bpmn:timerEventDefinition></bpmn:boundaryEvent>\n"
    )
    [workflow] = load_bpmn(write(tmp_path, body))
    assert [s.timeout_s for s in workflow.steps] == [90.5, 0.2]


class Models:
    async def __call__(
        self, meta: router_pb2.RequestMeta, task: str, body: dict[str, Any], timeout_s: float
    ) -> tuple[Any, str, str]:
        await asyncio.sleep(body.get("delay", 0))
        if body.get("fail"):
            raise StepFailed({"message": "upstream failed", "code": "upstream_error"})
        return {"echo": body.get("input")}, "fake-1", "miss"


ERROR_PATH = (
    '<bpmn:startEvent id="start"/>\n'
    + task("risky", "model", params={"task": "chat", "fail": "${input.fail}"}, input={"input": "x"})
    + '<bpmn:boundaryEvent id="caught" attachedToRef="risky"><bpmn:errorEventDefinition/></bpmn:boundaryEvent>\n'
    + task("rescue", value="rescued")
    + task("after", value="${steps.risky.output.echo}")
    + '<bpmn:endEvent id="end"/><bpmn:endEvent id="end_rescued"/>\n'
    + flow("f1", "start", "risky")
    + flow("f2", "risky", "after")
    + flow("f3", "caught", "rescue")
    + flow("f4", "after", "end")
    + flow("f5", "rescue", "end_rescued")
)


def test_an_error_boundary_continues_and_guards_both_ways(tmp_path: Path) -> None:
    [workflow] = load_bpmn(write(tmp_path, ERROR_PATH))
    steps = {s.id: s for s in workflow.steps}
    assert steps["risky"].on_error == "continue" and steps["risky"].when is None
    assert steps["rescue"].when == "steps.risky.status == 'failed'" and steps["rescue"].needs == ("risky",)
    assert steps["after"].when == "steps.risky.status == 'succeeded'"


@pytest.mark.asyncio
@pytest.mark.parametrize("fail", [True, False])
async def test_a_bpmn_error_path_runs_like_its_yaml_twin(tmp_path: Path, fail: bool) -> None:
    [workflow] = load_bpmn(write(tmp_path, ERROR_PATH))
    twin = yaml_workflow(
        tmp_path,
        "p",
        {
            "steps": [
                {
                    "id": "risky",
                    "type": "model",
                    "params": {"task": "chat", "fail": "${input.fail}"},
                    "input": {"input": "x"},
                    "on_error": "continue",
                },
                {
                    "id": "rescue",
                    "type": "transform",
                    "if": "steps.risky.status == 'failed'",
                    "params": {"value": "rescued"},
                },
                {
                    "id": "after",
                    "type": "transform",
                    "if": "steps.risky.status == 'succeeded'",
                    "params": {"value": "${steps.risky.output.echo}"},
                },
            ],
            "output": None,
        },
    )
    from_bpmn = outcome(await run(workflow, {"fail": fail}, Models()))
    assert from_bpmn == outcome(await run(twin, {"fail": fail}, Models()))
    expected = (
        {"risky": "failed", "rescue": "succeeded", "after": "skipped"}
        if fail
        else {
            "risky": "succeeded",
            "rescue": "skipped",
            "after": "succeeded",
        }
    )
    assert from_bpmn[0] == "succeeded" and from_bpmn[2] == expected


# --- refusals -------------------------------------------------------------------------

START = '<bpmn:startEvent id="start"/>\n' + task("t") + flow("f0", "start", "t")


@pytest.mark.parametrize(
    ("body", "element", "ident", "needle"),
    [
        ('<bpmn:userTask id="review"/>\n', "userTask", "review", 'id="review"'),
        ('<bpmn:scriptTask id="script"/>\n', "scriptTask", "script", 'id="script"'),
        ('<bpmn:subProcess id="sub"></bpmn:subProcess>\n', "subProcess", "sub", 'id="sub"'),
        ('<bpmn:intermediateCatchEvent id="wait"/>\n', "intermediateCatchEvent", "wait", 'id="wait"'),
        ('<bpmn:inclusiveGateway id="or"/>\n', "inclusiveGateway", "or", 'id="or"'),
        (
            '<bpmn:startEvent id="msg">\n<bpmn:messageEventDefinition/></bpmn:startEvent>\n',
            "startEvent",
            "msg",
            'id="msg"',
        ),
        (
            '<bpmn:serviceTask id="many" clawdbot:type="transform">\n'
            "<bpmn:multiInstanceLoopCharacteristics/></bpmn:serviceTask>\n",
            "serviceTask",
            "many",
            'id="many"',
        ),
        (
            '<bpmn:boundaryEvent id="nag" attachedToRef="t" cancelActivity="false">'
            "<bpmn:timerEventDefinition><bpmn:timeDuration>PT1S</bpmn:timeDuration></bpmn:timerEventDefinition>"
            "</bpmn:boundaryEvent>\n",
            "boundaryEvent",
            "nag",
            'id="nag"',
        ),
        (
            '<bpmn:boundaryEvent id="tick" attachedToRef="t">'
            "<bpmn:timerEventDefinition><bpmn:timeCycle>R3/PT1S</bpmn:timeCycle></bpmn:timerEventDefinition>"
            "</bpmn:boundaryEvent>\n",
            "boundaryEvent",
            "tick",
            'id="tick"',
        ),
        ('<bpmn:serviceTask id="untyped"/>\n', "serviceTask", "untyped", 'id="untyped"'),
        (task("odd", on_error="maybe"), "serviceTask", "odd", 'id="odd"'),
        (
            '<bpmn:serviceTask id="camunda" clawdbot:type="transform"><bpmn:extensionElements>'
            '<x:properties xmlns:x="urn:x"/></bpmn:extensionElements></bpmn:serviceTask>\n',
            "properties",
            "",
            "urn:x",
        ),
        (flow("dangling", "t", "nowhere"), "sequenceFlow", "dangling", 'id="dangling"'),
        (
            '<bpmn:exclusiveGateway id="gw"/>\n'
            + task("x")
            + task("y")
            + flow("f1", "t", "gw")
            + flow("f2", "gw", "x", "input")
            + flow("bare", "gw", "y"),
            "sequenceFlow",
            "bare",
            'id="bare"',
        ),
        (
            flow("f1", "t", "u1") + task("u1") + task("u2") + flow("f2", "u1", "u2") + flow("back", "u2", "u1"),
            "serviceTask",
            "u1",
            'id="u1"',
        ),
        (flow("bad_if", "t", "z", "steps.t.output ==") + task("z"), "sequenceFlow", "bad_if", 'id="bad_if"'),
    ],
)
def test_unsupported_elements_are_refused_with_their_id_and_line(
    tmp_path: Path, body: str, element: str, ident: str, needle: str
) -> None:
    path = write(tmp_path, START + body)
    with pytest.raises(BpmnError) as caught:
        load_bpmn(path)
    message = str(caught.value)
    where = f"{element} `{ident}`" if ident else element
    assert message.startswith(f"w.bpmn: line {line_of(path, needle)}: {where}"), message


def test_a_cycle_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        START + flow("f1", "t", "u1") + task("u1") + task("u2") + flow("f2", "u1", "u2") + flow("b", "u2", "u1"),
    )
    with pytest.raises(BpmnError, match=r"cycle \(u1 -> u2 -> u1\)"):
        load_bpmn(path)


def test_malformed_xml_and_doctypes_are_refused_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.bpmn"
    path.write_text(HEAD + task("t") + "<bpmn:endEvent id='e'>\n" + TAIL)
    with pytest.raises(BpmnError, match=r"^broken\.bpmn: line 6: not well-formed XML"):
        load_bpmn(path)
    path.write_text('<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY a "b">]>\n<x/>')
    with pytest.raises(BpmnError, match=r"^broken\.bpmn: line 2: DOCTYPE"):
        load_bpmn(path)


def test_a_step_that_fails_the_yaml_checks_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, START + flow("f1", "t", "m") + task("m", "model", input={"x": "${steps.ghost.output}"}))
    with pytest.raises(
        BpmnError, match=r"line 3: process `p`: step `m` refers to steps that do not exist: \['ghost'\]"
    ):
        load_bpmn(path)
