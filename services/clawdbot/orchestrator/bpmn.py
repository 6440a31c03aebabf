"""BPMN 2.0 workflows: a `.bpmn` file's processes, read into the same `Workflow` model as
the YAML definitions, so the same engine runs them (one Workflow per `bpmn:process`, named
by the process id).

Approach: map to the YAML engine's DAG, not run SpiffWorkflow's engine. SpiffWorkflow is
a well-kept BPMN engine, but it cannot meet this issue: it completes ready tasks one after
another in the caller's thread (its task callbacks are synchronous), while our steps are
async gRPC calls that must run in parallel on one event loop; and a BPMN workflow and its
YAML twin must behave the same (retries, timeouts, `on_error`, skipping, the run report),
which is only certain if one engine runs both. Only the subset of BPMN that maps exactly
onto that engine is accepted; everything else is refused, never approximated. The XML is
read with the standard library (expat, for line numbers; DOCTYPEs and entities refused),
so nothing is added to the dependencies.

Supported, inside `bpmn:process`:

- `startEvent`, `endEvent` (plain: no event definitions).
- `serviceTask`: one step, its id the step id. The step type is the attribute
  `clawdbot:type="model|retrieve|transform|workflow"` (namespace
  `xmlns:clawdbot="https://clawdbot.dev/bpmn"`); the rest is given in
  `bpmn:extensionElements` as `clawdbot:params`, `clawdbot:input`, `clawdbot:retry`,
  `clawdbot:timeout_s` and `clawdbot:on_error`, each holding JSON or YAML text (use CDATA
  or XML escapes for `<` and `&`), meaning exactly what the YAML keys of that name mean::

      <bpmn:serviceTask id="intent" clawdbot:type="model">
        <bpmn:extensionElements>
          <clawdbot:params>{task: intent, model: intent-classifier, top_n: 1}</clawdbot:params>
          <clawdbot:input>{input: "${steps.asr.output.text}"}</clawdbot:input>
          <clawdbot:retry>{max_attempts: 2}</clawdbot:retry>
        </bpmn:extensionElements>
      </bpmn:serviceTask>

- `sequenceFlow`, with an optional `conditionExpression` holding a JMESPath condition
  (as in a YAML `if`, without `${}`), on flows leaving an exclusive gateway or a task.
- `exclusiveGateway`: its outgoing conditions are tried in document order and the first
  true one is taken (BPMN's rule), so a branch's condition is its own and the negation of
  those before it; the `default` flow's is the negation of all the others. Joining, it
  lets through whichever branch arrived.
- `parallelGateway`, forking and joining: both just become dependencies.
- `boundaryEvent` (interrupting) on a service task, with `timerEventDefinition` /
  `timeDuration` (an ISO-8601 duration such as PT30S: the task's `timeout_s`; no
  outgoing flow, a timeout fails the task like any failure) or `errorEventDefinition`
  (any failure: the task gets `on_error: continue`, and the steps on the error flow an
  `if` of `steps.<task>.status == 'failed'`).
- `documentation` (the process's is the workflow description), `laneSet` (ignored), and
  on the process `extensionElements/clawdbot:output`: the run's output template, and
  `clawdbot:input`: what a run's input must be (the YAML workflow's `input`).

Mapping: a step's `needs` are the tasks reached by walking its incoming flows backwards
through gateways and events. Its `if` is when BPMN would reach it: the conditions on the
paths from those tasks, joined with `&&` along a path and through parallel joins, with
`||` across the branches of an exclusive join, and simplified (a default branch merged
back with its siblings needs no condition). Leaving a task that may itself be skipped,
its own condition is carried on (a skipped step's successors are skipped too, as in
BPMN); leaving a task with an error boundary, its normal flow also requires
`steps.<task>.status == 'succeeded'`.

Refused with the file, line, element and id: any other element (userTask, scriptTask,
subProcess, call activities, intermediate events, inclusive / event-based gateways, data
objects, loop characteristics, message flows, collaborations...), event definitions on
start and end events, non-interrupting boundary events, cycles, dangling flow references,
unknown extension elements, and steps that fail the YAML checks.
"""

from __future__ import annotations

import itertools
import re
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from xml.parsers import expat

import yaml
from pydantic import ValidationError

from clawdbot.orchestrator.definitions import (
    ID_PATTERN,
    DefinitionError,
    Step,
    Workflow,
    check_workflow,
    format_validation,
)
from clawdbot.orchestrator.expressions import ExpressionError, compile_expression

BPMN_NS = "http://www.omg.org/spec/BPMN/20100524/MODEL"
CLAWDBOT_NS = "https://clawdbot.dev/bpmn"
_B = "{" + BPMN_NS + "}"
_C = "{" + CLAWDBOT_NS + "}"

STEP_EXTENSIONS = ("params", "input", "retry", "timeout_s", "on_error")
_NODES = ("startEvent", "endEvent", "serviceTask", "exclusiveGateway", "parallelGateway", "boundaryEvent")
_PLAIN_CHILDREN = {"incoming", "outgoing", "documentation", "extensionElements"}
_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


class BpmnError(ValueError):
    """A BPMN file that cannot be used; the message names the file, line, element and id."""


# ---------------------------------------------------------------------------------------
# Reading the XML, keeping each element's line


class _Document:
    def __init__(self, path: Path) -> None:
        self.name = path.name
        self.lines: dict[ET.Element, int] = {}
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BpmnError(f"{self.name}: not readable: {exc}") from None
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.buffer_text = True
        stack: list[ET.Element] = []
        texts: dict[ET.Element, list[str]] = {}
        roots: list[ET.Element] = []

        def qualified(name: str) -> str:
            uri, _, local = name.rpartition(" ")
            return "{" + uri + "}" + local if uri else local

        def start(tag: str, attributes: dict[str, str]) -> None:
            element = ET.Element(qualified(tag), {qualified(k): v for k, v in attributes.items()})
            self.lines[element] = parser.CurrentLineNumber
            texts[element] = []
            if stack:
                stack[-1].append(element)
            else:
                roots.append(element)
            stack.append(element)

        def end(tag: str) -> None:
            element = stack.pop()
            element.text = "".join(texts.pop(element))

        def text(data: str) -> None:
            if stack:
                texts[stack[-1]].append(data)

        def refuse_doctype(*_: Any) -> None:
            raise BpmnError(
                f"{self.name}: line {parser.CurrentLineNumber}: DOCTYPE and entity declarations are refused"
            )

        parser.StartElementHandler = start
        parser.EndElementHandler = end
        parser.CharacterDataHandler = text
        parser.StartDoctypeDeclHandler = refuse_doctype
        parser.EntityDeclHandler = refuse_doctype
        try:
            parser.Parse(data, True)
        except expat.ExpatError as exc:
            raise BpmnError(
                f"{self.name}: line {exc.lineno}: not well-formed XML: {expat.ErrorString(exc.code)}"
            ) from None
        self.root = roots[0]

    def error(self, element: ET.Element, message: str) -> BpmnError:
        return BpmnError(f"{self.name}: line {self.lines.get(element, 0)}: {_describe(element)}: {message}")


def _local(element: ET.Element) -> str:
    return element.tag.rpartition("}")[2]


def _describe(element: ET.Element) -> str:
    ident = element.get("id")
    return f"{_local(element)} `{ident}`" if ident else _local(element)


def _is_bpmn(element: ET.Element, *names: str) -> bool:
    return element.tag.startswith(_B) and (not names or _local(element) in names)


def _value(doc: _Document, element: ET.Element, owner: ET.Element) -> Any:
    text = textwrap.dedent((element.text or "").strip("\n"))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise doc.error(owner, f"{_local(element)} (line {doc.lines[element]}) is not JSON or YAML: {exc}") from None


def _extensions(doc: _Document, owner: ET.Element, allowed: Iterable[str]) -> dict[str, tuple[Any, ET.Element]]:
    """The clawdbot extension elements of `owner` (refusing any others)."""
    found: dict[str, tuple[Any, ET.Element]] = {}
    for holder in owner.findall(_B + "extensionElements"):
        for child in holder:
            name = _local(child)
            if not child.tag.startswith(_C) or name not in allowed:
                raise doc.error(
                    child, f"unsupported extension element in {_describe(owner)} (allowed: clawdbot:{sorted(allowed)})"
                )
            if name in found:
                raise doc.error(child, f"given twice in {_describe(owner)}")
            found[name] = (_value(doc, child, owner), child)
    return found


def _duration(text: str) -> float | None:
    match = _DURATION.match(text.strip())
    if not match or text.strip() in ("P", "PT") or text.strip().endswith("T"):
        return None
    d, h, m, s = (float(match.group(k) or 0) for k in "dhms")
    seconds = ((d * 24 + h) * 60 + m) * 60 + s
    return seconds or None


# ---------------------------------------------------------------------------------------
# Conditions, kept in disjunctive normal form so branches merged back simplify away.
# An atom is ("expr", <JMESPath>, <positive>) or ("status", <step>, <allowed statuses>).

Atom = tuple[str, str, Any]
Conj = frozenset[Atom]
Dnf = frozenset[Conj]
TRUE: Dnf = frozenset({frozenset()})
FALSE: Dnf = frozenset()
REACHED = frozenset({"succeeded", "failed"})  # the statuses of a step that ran (and the run went on)


class _Logic:
    def __init__(self) -> None:
        self.guards: dict[str, Dnf] = {}  # each task's condition to run, as it is computed

    def conj(self, atoms: Iterable[Atom]) -> Conj | None:
        exprs: dict[str, bool] = {}
        statuses: dict[str, frozenset[str]] = {}
        for kind, key, value in atoms:
            if kind == "expr":
                if exprs.setdefault(key, value) != value:
                    return None
            else:
                allowed = statuses.get(key, value) & value
                if not allowed:
                    return None
                statuses[key] = allowed
        result: set[Atom] = {("expr", k, v) for k, v in exprs.items()}
        result |= {("status", k, v) for k, v in statuses.items() if v != REACHED}
        for step, allowed in statuses.items():
            # "ran" is implied if the step always runs, or if the rest implies its condition.
            if allowed == REACHED and not any(g <= result for g in self.guards.get(step, TRUE)):
                result.add(("status", step, allowed))
        return frozenset(result)

    def simplify(self, dnf: Iterable[Conj]) -> Dnf:
        items = set(dnf)
        changed = True
        while changed:
            kept = {x for x in items if not any(y < x for y in items)}
            changed = kept != items
            items = kept
            for x, y in itertools.combinations(sorted(items, key=sorted), 2):
                dx, dy = x - y, y - x
                if len(dx) != 1 or len(dy) != 1:
                    continue
                (a,), (b,) = dx, dy
                if a[0] != b[0] or a[1] != b[1]:
                    continue
                rest = set(x & y)
                if a[0] == "status":
                    rest.add(("status", a[1], a[2] | b[2]))
                merged = self.conj(rest)
                if merged is not None:
                    items -= {x, y}
                    items.add(merged)
                    changed = True
                    break
        return frozenset(items)

    def all_of(self, *parts: Dnf) -> Dnf:
        result = TRUE
        for part in parts:
            combined = (self.conj(x | y) for x in result for y in part)
            result = self.simplify(c for c in combined if c is not None)
        return result

    def any_of(self, *parts: Dnf) -> Dnf:
        return self.simplify(itertools.chain.from_iterable(parts))

    @staticmethod
    def atom(kind: str, key: str, value: Any) -> Dnf:
        return frozenset({frozenset({(kind, key, value)})})

    @staticmethod
    def render(dnf: Dnf) -> str | None:
        if dnf == TRUE:
            return None
        several = len(dnf) > 1 or any(len(c) > 1 for c in dnf)

        def text(atom: Atom) -> str:
            kind, key, value = atom
            if kind == "expr":
                return (f"({key})" if several else key) if value else f"!({key})"
            if value == REACHED:
                return f"steps.{key}.status != 'skipped'"
            (status,) = value
            return f"steps.{key}.status == '{status}'"

        conjunctions = sorted(" && ".join(text(a) for a in sorted(c, key=lambda a: (a[1], a[0]))) for c in dnf)
        if len(conjunctions) == 1:
            return conjunctions[0]
        return " || ".join(f"({c})" if " && " in c else c for c in conjunctions)


# ---------------------------------------------------------------------------------------
# Processes


def load_bpmn(path: Path) -> list[Workflow]:
    """One checked Workflow per `bpmn:process` of the file; BpmnError for anything unsupported."""
    doc = _Document(path)
    if doc.root.tag != _B + "definitions":
        raise doc.error(doc.root, f"expected a BPMN 2.0 `definitions` root in namespace {BPMN_NS}")
    workflows = []
    for child in doc.root:
        if not _is_bpmn(child):
            continue  # diagram interchange (bpmndi) and other tools' data: layout only
        if _local(child) == "process":
            workflows.append(_process(doc, child))
        elif _local(child) not in ("error", "documentation", "extensionElements"):
            raise doc.error(child, "not supported (a file holds `process` elements)")
    if not workflows:
        raise doc.error(doc.root, "no `process` element")
    return workflows


def _process(doc: _Document, process: ET.Element) -> Workflow:
    name = process.get("id") or ""
    if not re.match(ID_PATTERN, name):
        raise doc.error(process, f"a process id must match {ID_PATTERN}")
    nodes: dict[str, ET.Element] = {}
    flows: list[ET.Element] = []
    for element in process:
        local = _local(element)
        if not _is_bpmn(element) or local not in (
            *_NODES,
            "sequenceFlow",
            "documentation",
            "extensionElements",
            "laneSet",
        ):
            raise doc.error(element, "not supported in a clawdbot workflow")
        if local in ("documentation", "extensionElements", "laneSet"):
            continue
        ident = element.get("id")
        if not ident:
            raise doc.error(element, "has no id")
        if ident in nodes or any(f.get("id") == ident for f in flows):
            raise doc.error(element, "the id is used twice")
        if local == "sequenceFlow":
            flows.append(element)
        else:
            nodes[ident] = element

    outgoing: dict[str, list[ET.Element]] = {n: [] for n in nodes}
    incoming: dict[str, list[ET.Element]] = {n: [] for n in nodes}
    for flow in flows:
        for end in ("sourceRef", "targetRef"):
            if flow.get(end) not in nodes:
                raise doc.error(flow, f"{end} `{flow.get(end)}` is not an element of process `{name}`")
        for child in flow:
            if not _is_bpmn(child, "conditionExpression", "documentation", "extensionElements") or (
                _local(child) == "extensionElements" and len(child)
            ):
                raise doc.error(child, f"not supported in sequenceFlow `{flow.get('id')}`")
        outgoing[flow.get("sourceRef", "")].append(flow)
        incoming[flow.get("targetRef", "")].append(flow)

    tasks = [n for n, e in nodes.items() if _local(e) == "serviceTask"]
    if not tasks:
        raise doc.error(process, "has no serviceTask: nothing to run")
    timeouts: dict[str, float] = {}
    caught: set[str] = set()
    attached: dict[str, str] = {}
    for ident, element in nodes.items():
        check_workflow_node(doc, element, incoming[ident], outgoing[ident])
        if _local(element) == "boundaryEvent":
            task = element.get("attachedToRef", "")
            attached[ident] = task
            if task not in tasks:
                raise doc.error(element, f"attachedToRef `{task}` is not a serviceTask of process `{name}`")
            definition = _event_definition(doc, element)
            if _local(definition) == "timerEventDefinition":
                if task in timeouts:
                    raise doc.error(element, f"a second timer on `{task}`")
                timeouts[task] = _timer(doc, element, definition)
                if outgoing[ident]:
                    raise doc.error(
                        element,
                        "a timer boundary only sets the task's timeout: it takes no outgoing flow "
                        "(a timeout is a failure: add an error boundary event to go on after it)",
                    )
            else:
                if task in caught:
                    raise doc.error(element, f"a second error boundary event on `{task}`")
                caught.add(task)

    order = _topological(doc, nodes, outgoing, attached)
    logic = _Logic()
    token: dict[str, Dnf] = {}  # per sequence flow: when BPMN would send a token along it
    upstream: dict[str, list[str]] = {}  # per node: the nearest tasks before it
    emits: dict[str, list[str]] = {}
    steps: list[Step] = []
    for ident in order:
        element = nodes[ident]
        local = _local(element)
        arriving = [token[f.get("id", "")] for f in incoming[ident]]
        if local == "boundaryEvent":
            task = attached[ident]
            upstream[ident] = emits[ident] = [task]
            reached = logic.all_of(logic.guards[task], logic.atom("status", task, frozenset({"failed"})))
        else:
            before = [t for f in incoming[ident] for t in emits[f.get("sourceRef", "")]]
            upstream[ident] = sorted(set(before), key=tasks.index)
            emits[ident] = [ident] if local == "serviceTask" else upstream[ident]
            if not arriving:
                reached = TRUE
            elif local == "parallelGateway":
                reached = logic.all_of(*arriving)
            else:
                reached = logic.any_of(*arriving)
        if local == "serviceTask":
            if reached == FALSE:
                raise doc.error(element, "can never run: the conditions on the way to it contradict each other")
            logic.guards[ident] = reached
            steps.append(
                _step(doc, element, upstream[ident], logic.render(reached), timeouts.get(ident), ident in caught)
            )
            if ident in caught:
                reached = logic.all_of(reached, logic.atom("status", ident, frozenset({"succeeded"})))
        token.update(_leaving(doc, logic, element, outgoing[ident], reached))

    extensions = _extensions(doc, process, ("output", "input"))
    description = " ".join(" ".join((d.text or "").split()) for d in process.findall(_B + "documentation"))
    try:
        workflow = Workflow(
            name=name,
            description=description,
            steps=tuple(steps),
            input=extensions["input"][0] if "input" in extensions else None,
            output=extensions["output"][0] if "output" in extensions else None,
            source=doc.name,
        )
        check_workflow(workflow)
    except ValidationError as exc:
        raise doc.error(process, format_validation(exc)) from None
    except (DefinitionError, ExpressionError) as exc:
        raise doc.error(process, str(exc)) from None
    return workflow


def check_workflow_node(
    doc: _Document, element: ET.Element, incoming: list[ET.Element], outgoing: list[ET.Element]
) -> None:
    local = _local(element)
    for child in element:
        if local == "boundaryEvent" and _local(child).endswith("EventDefinition"):
            continue
        if not _is_bpmn(child) or _local(child) not in _PLAIN_CHILDREN:
            what = f"{_local(child)} (line {doc.lines[child]})"
            raise doc.error(element, f"{what} is not supported on a {local}")
        if _local(child) == "extensionElements" and local != "serviceTask" and len(child):
            raise doc.error(
                child[0], f"extension elements are read only on service tasks and the process, not on {local}"
            )
    if local == "startEvent" and incoming:
        raise doc.error(element, "a start event takes no incoming flow")
    if local == "endEvent" and outgoing:
        raise doc.error(element, "an end event takes no outgoing flow")
    if local == "boundaryEvent" and incoming:
        raise doc.error(element, "a boundary event takes no incoming flow")
    if local != "exclusiveGateway" and element.get("default"):
        raise doc.error(element, "a default flow is only read on an exclusive gateway")
    if local == "exclusiveGateway" and element.get("default") not in (None, *(f.get("id") for f in outgoing)):
        raise doc.error(element, f"the default flow `{element.get('default')}` does not leave this gateway")
    for flow in outgoing:
        conditional = flow.find(_B + "conditionExpression") is not None
        if conditional and local not in ("exclusiveGateway", "serviceTask"):
            raise doc.error(
                flow, f"a condition is only read on flows leaving an exclusive gateway or a task, not a {local}"
            )
        if conditional and flow.get("id") == element.get("default"):
            raise doc.error(flow, "the default flow takes no condition")
        if (
            local == "exclusiveGateway"
            and len(outgoing) > 1
            and not conditional
            and flow.get("id") != element.get("default")
        ):
            raise doc.error(
                flow, f"leaves exclusive gateway `{element.get('id')}` with neither a condition nor being its default"
            )


def _event_definition(doc: _Document, event: ET.Element) -> ET.Element:
    definitions = [c for c in event if _local(c).endswith("EventDefinition")]
    if len(definitions) != 1 or not _is_bpmn(definitions[0], "timerEventDefinition", "errorEventDefinition"):
        raise doc.error(event, "a boundary event takes exactly one timerEventDefinition or errorEventDefinition")
    if event.get("cancelActivity", "true") != "true":
        raise doc.error(event, "non-interrupting boundary events are not supported")
    return definitions[0]


def _timer(doc: _Document, event: ET.Element, definition: ET.Element) -> float:
    children = list(definition)
    if len(children) != 1 or not _is_bpmn(children[0], "timeDuration"):
        raise doc.error(event, "a timer boundary takes a timeDuration (timeDate and timeCycle are not supported)")
    seconds = _duration(children[0].text or "")
    if seconds is None:
        raise doc.error(
            event,
            f"timeDuration `{(children[0].text or '').strip()}` is not a positive ISO-8601 "
            "duration in days, hours, minutes and seconds (like PT30S)",
        )
    return seconds


def _condition(doc: _Document, flow: ET.Element) -> str | None:
    expression = flow.find(_B + "conditionExpression")
    if expression is None:
        return None
    if (expression.get("language") or "jmespath").lower() != "jmespath":
        raise doc.error(flow, f"condition language `{expression.get('language')}`: conditions are JMESPath")
    text = " ".join((expression.text or "").split())
    if not text:
        raise doc.error(flow, "an empty conditionExpression")
    try:
        compile_expression(text)
    except ExpressionError as exc:
        raise doc.error(flow, str(exc)) from None
    return text


def _leaving(
    doc: _Document, logic: _Logic, element: ET.Element, outgoing: list[ET.Element], reached: Dnf
) -> dict[str, Dnf]:
    result: dict[str, Dnf] = {}
    earlier: list[Dnf] = []  # an exclusive gateway takes the first true condition, in document order
    for flow in sorted(outgoing, key=lambda f: f.get("id") == element.get("default")):
        condition = _condition(doc, flow)
        if flow.get("id") == element.get("default") and element.get("default"):
            result[flow.get("id", "")] = logic.all_of(reached, *earlier)
            continue
        own = logic.atom("expr", condition, True) if condition else TRUE
        result[flow.get("id", "")] = logic.all_of(reached, own, *earlier)
        if condition and _local(element) == "exclusiveGateway":
            earlier.append(logic.atom("expr", condition, False))
    return result


def _step(
    doc: _Document, task: ET.Element, needs: list[str], condition: str | None, timeout: float | None, caught: bool
) -> Step:
    kind = task.get(_C + "type")
    if kind is None:
        raise doc.error(task, f'names no step type: add clawdbot:type (xmlns:clawdbot="{CLAWDBOT_NS}")')
    unknown = [k for k in task.attrib if k.startswith(_C) and k != _C + "type"]
    if unknown:
        raise doc.error(task, f"unknown attribute {unknown[0].replace(_C, 'clawdbot:')}")
    given = {k: v for k, (v, _) in _extensions(doc, task, STEP_EXTENSIONS).items()}
    if timeout is not None:
        if "timeout_s" in given:
            raise doc.error(task, "has both a timer boundary event and clawdbot:timeout_s")
        given["timeout_s"] = timeout
    if caught:
        if given.get("on_error", "continue") != "continue":
            raise doc.error(task, "has an error boundary event but clawdbot:on_error is not `continue`")
        given["on_error"] = "continue"
    body = {"id": task.get("id"), "type": kind, **given, "needs": needs}
    if condition:
        body["if"] = condition
    try:
        return Step.model_validate(body)
    except ValidationError as exc:
        raise doc.error(task, format_validation(exc)) from None


def _topological(
    doc: _Document, nodes: dict[str, ET.Element], outgoing: dict[str, list[ET.Element]], attached: dict[str, str]
) -> list[str]:
    successors = {n: [f.get("targetRef", "") for f in outgoing[n]] for n in nodes}
    for event, task in attached.items():
        successors[task].append(event)
    waiting = {n: 0 for n in nodes}
    for targets in successors.values():
        for target in targets:
            waiting[target] += 1
    position = {n: i for i, n in enumerate(nodes)}
    ready = sorted((n for n, w in waiting.items() if w == 0), key=position.__getitem__)
    order: list[str] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for target in successors[node]:
            waiting[target] -= 1
            if waiting[target] == 0:
                ready.append(target)
                ready.sort(key=position.__getitem__)
    if len(order) < len(nodes):
        # Every node left waits for another left: walking back through those ends on a cycle.
        left = [n for n in nodes if n not in order]
        before = {n: [p for p in left if n in successors[p]] for n in left}
        walk = [left[0]]
        while walk[-1] not in walk[:-1]:
            walk.append(before[walk[-1]][0])
        cycle = walk[walk.index(walk[-1]) :][::-1]
        raise doc.error(
            nodes[cycle[0]], "is on a cycle (" + " -> ".join(cycle) + "): loops are not supported, a workflow is a DAG"
        )
    return order
