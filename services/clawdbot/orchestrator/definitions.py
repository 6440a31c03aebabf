"""Workflow definitions: YAML (and BPMN 2.0, see bpmn.py) files in config/workflows/,
read and checked at start-up. A bad workflow is refused with a message naming the file, the workflow,
the step and what is wrong; the good ones load regardless."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clawdbot.orchestrator.expressions import ExpressionError, compile_expression, expressions_in, referenced_steps

StepType = Literal["model", "retrieve", "transform", "workflow"]
ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Retry(_Strict):
    max_attempts: int = Field(1, ge=1, le=10)
    backoff_s: float = Field(0.2, ge=0)


class Step(_Strict):
    id: str = Field(..., pattern=ID_PATTERN)
    type: StepType
    # What the step does: for `model`, the task and/or model and fixed request fields;
    # for `retrieve`, top_k and min_score; for `transform`, `value`; for `workflow`, its name.
    params: dict[str, Any] = Field(default_factory=dict)
    # The step's input, as a template over the run (`${input...}`, `${steps.<id>.output...}`).
    input: Any = None
    needs: tuple[str, ...] = ()
    when: str | None = Field(None, alias="if")
    retry: Retry = Field(default_factory=Retry)
    timeout_s: float | None = Field(None, gt=0)
    # `continue`: a failure is recorded and the run goes on (later steps may test
    # `steps.<id>.status`); `fail`: the run fails.
    on_error: Literal["fail", "continue"] = "fail"


InputType = Literal["object", "string", "array", "number", "integer", "boolean", "any"]


class InputField(_Strict):
    """One field of an object input."""

    type: InputType = "any"
    # `audio`: a base64-encoded audio file (a string), decoded within the body limit and
    # checked within the audio bounds before the run starts.
    format: Literal["audio"] | None = None


class InputSpec(_Strict):
    """What a run's `input` must be; a run given anything else is refused with a 400
    naming `input` (or the field) before any step starts."""

    type: InputType = "any"
    # For an object: fields that must be present, and the type of those that are.
    required: tuple[str, ...] = ()
    properties: dict[str, InputField] = Field(default_factory=dict)


# `input.<field>` in an expression: the workflow reads fields of its input, so the input
# must be an object (a number or a string has no fields: every such read would be null).
_INPUT_FIELD = re.compile(r"(?<![\w.$])input\s*\.")


class Workflow(_Strict):
    name: str = Field(..., pattern=ID_PATTERN)
    description: str = ""
    # What a run takes; not given: inferred from the expressions (see input_spec()).
    input: InputSpec | None = None
    steps: tuple[Step, ...] = Field(..., min_length=1)
    # The run's output, as a template; by default the last step's output.
    output: Any = None
    source: str = ""

    def step(self, step_id: str) -> Step:
        return next(s for s in self.steps if s.id == step_id)

    def dependencies(self, step: Step) -> set[str]:
        """The steps this one waits for: its `needs` and every step its templates name."""
        named = set(step.needs)
        for expression in [*expressions_in(step.input), *expressions_in(step.params)]:
            named |= referenced_steps(expression)
        if step.when:
            named |= referenced_steps(step.when)
        return named

    def input_spec(self) -> InputSpec:
        """The declared input, or one inferred: an object when any expression reads a
        field of `input`, anything otherwise."""
        if self.input is not None:
            return self.input
        templates: list[Any] = [self.output]
        for step in self.steps:
            templates += [step.input, step.params]
        expressions = [e for t in templates for e in expressions_in(t)]
        expressions += [s.when for s in self.steps if s.when]
        reads_fields = any(_INPUT_FIELD.search(e) for e in expressions)
        return InputSpec(type="object" if reads_fields else "any")

    def graph(self) -> dict[str, Any]:
        return {
            "nodes": [{"id": s.id, "type": s.type, "if": s.when} for s in self.steps],
            "edges": [{"from": d, "to": s.id} for s in self.steps for d in sorted(self.dependencies(s))],
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "object": "workflow",
            "description": self.description,
            "input": self.input_spec().model_dump(),
            "graph": self.graph(),
        }


class DefinitionError(ValueError):
    pass


def check_workflow(workflow: Workflow) -> None:
    spec = workflow.input
    if spec is not None and spec.type != "object" and (spec.required or spec.properties):
        raise DefinitionError(f"input: `required` and `properties` describe an object input, not {spec.type}")
    ids = [s.id for s in workflow.steps]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DefinitionError(f"step ids used twice: {duplicates}")
    known = set(ids)
    for step in workflow.steps:
        for expression in [
            *expressions_in(step.input),
            *expressions_in(step.params),
            *([step.when] if step.when else []),
        ]:
            try:
                compile_expression(expression)
            except ExpressionError as exc:
                raise DefinitionError(f"step `{step.id}`: {exc}") from None
        missing = sorted(workflow.dependencies(step) - known)
        if missing:
            raise DefinitionError(f"step `{step.id}` refers to steps that do not exist: {missing}")
        if step.type == "model" and not (step.params.get("task") or step.params.get("model")):
            raise DefinitionError(f"step `{step.id}`: a model step names a `task` or a `model` in params")
        if step.type == "workflow" and not isinstance(step.params.get("workflow"), str):
            raise DefinitionError(f"step `{step.id}`: a workflow step names the `workflow` it runs in params")
    for expression in expressions_in(workflow.output):
        compile_expression(expression)
        missing = sorted(referenced_steps(expression) - known)
        if missing:
            raise DefinitionError(f"output refers to steps that do not exist: {missing}")
    cycle = _cycle(workflow)
    if cycle:
        raise DefinitionError("steps depend on each other in a cycle: " + " -> ".join(cycle))


def _cycle(workflow: Workflow) -> list[str]:
    depends = {s.id: workflow.dependencies(s) for s in workflow.steps}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(depends[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if state.get(dep) is None and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in depends:
        if state.get(node) is None and (found := visit(node)):
            return found
    return []


@dataclass
class Catalog:
    workflows: dict[str, Workflow] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def format_validation(error: ValidationError) -> str:
    parts = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem["loc"])
        given = problem.get("input")
        message = problem["msg"] + (f" (got {given!r})" if isinstance(given, str | int | float) else "")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def load_catalog(folder: Path) -> Catalog:
    """Every workflow of every *.yaml and *.bpmn file in folder; problems listed, never raised."""
    catalog = Catalog()
    for path in sorted(folder.glob("*.y*ml")) if folder.is_dir() else ():
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            catalog.problems.append(f"{path.name}: not readable YAML: {exc}")
            continue
        entries = document.get("workflows") if isinstance(document, dict) else None
        if not isinstance(entries, dict):
            catalog.problems.append(f"{path.name}: expected a top-level `workflows:` mapping")
            continue
        for name, body in entries.items():
            where = f"{path.name}: workflow `{name}`"
            if name in catalog.workflows:
                catalog.problems.append(f"{where}: the name is already defined in {catalog.workflows[name].source}")
                continue
            try:
                if not isinstance(body, dict):
                    raise DefinitionError("expected a mapping with `steps`")
                workflow = Workflow.model_validate({**body, "name": name, "source": path.name})
                check_workflow(workflow)
            except ValidationError as exc:
                catalog.problems.append(f"{where}: {format_validation(exc)}")
                continue
            except (DefinitionError, ExpressionError) as exc:
                catalog.problems.append(f"{where}: {exc}")
                continue
            catalog.workflows[name] = workflow
    from clawdbot.orchestrator.bpmn import BpmnError, load_bpmn  # here: bpmn imports this module

    for path in sorted(folder.glob("*.bpmn")) if folder.is_dir() else ():
        try:
            loaded = load_bpmn(path)
        except BpmnError as exc:
            catalog.problems.append(str(exc))
            continue
        for workflow in loaded:
            if workflow.name in catalog.workflows:
                where = f"{path.name}: workflow `{workflow.name}`"
                catalog.problems.append(
                    f"{where}: the name is already defined in {catalog.workflows[workflow.name].source}"
                )
                continue
            catalog.workflows[workflow.name] = workflow
    for workflow in list(catalog.workflows.values()):
        for step in workflow.steps:
            target = step.params.get("workflow")
            if step.type == "workflow" and target not in catalog.workflows:
                where = f"{workflow.source}: workflow `{workflow.name}`: step `{step.id}`"
                catalog.problems.append(f"{where} runs an unknown workflow `{target}`")
                catalog.workflows.pop(workflow.name, None)
                break
    return catalog
