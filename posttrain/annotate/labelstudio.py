"""People label through Label Studio (`posttrain.annotate.labelstudio:LabelStudioAnnotator`).

posttrain talks to a running Label Studio server over its REST API (standard library only;
Label Studio itself lives in its own environment, scripts/install-labelstudio.sh):

1. the first time, it creates a project with a pairwise comparison config (which response is
   better, how much better, an optional edit of the better one) and keeps its id in the
   annotate step's folder (`labelstudio.json`);
2. it imports every request not yet imported as a task, with the request's id and pair hash;
3. on every run it reads the tasks back (`/api/projects/{id}/export`) and turns each task's
   latest annotation into a label; a task skipped in Label Studio is an abstention; tasks
   without an annotation stay unlabelled, and the round waits for them.

A task whose pair hash differs from its request's (the responses changed) is refused, never
joined. Server and credentials: `url` (else $LABEL_STUDIO_URL, else http://localhost:8080)
and an API token read from the environment variable `token_env` ($LABEL_STUDIO_API_KEY by
default: a token never sits in a recipe). Both legacy tokens (`Authorization: Token ...`)
and personal access tokens (JWT refresh tokens, exchanged at /api/token/refresh) work.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from posttrain.annotate.base import AnnotatorError, Label, Request
from posttrain.data import STRENGTHS
from posttrain.files import atomic_write_json, read_json

STATE_FILE = "labelstudio.json"

LABEL_CONFIG = """<View>
  <Header value="Conversation"/>
  <Text name="prompt" value="$prompt"/>
  <Header value="Response A"/>
  <Text name="response_a" value="$response_a"/>
  <Header value="Response B"/>
  <Text name="response_b" value="$response_b"/>
  <Header value="Which response is better? (skip the task if you cannot tell)"/>
  <Pairwise name="preference" toName="response_a,response_b"/>
  <Header value="How much better?"/>
  <Choices name="strength" toName="prompt" choice="single" required="true">
""" + "".join(f'    <Choice value="{s}"/>\n' for s in STRENGTHS) + """  </Choices>
  <Header value="Optional: an edited, better version of the better response"/>
  <TextArea name="edited" toName="prompt" maxSubmissions="1" editable="true" rows="4"/>
</View>
"""
"""The labeling interface: `preference` (pairwise: left = response a, right = response b),
`strength` (one of posttrain.data.STRENGTHS), `edited` (optional free text)."""


def render_prompt(messages: list[dict]) -> str:
    return "\n\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages)


def task_data(request: Request) -> dict:
    return {"request_id": request.id, "pair_sha256": request.pair_sha256, "prompt": render_prompt(request.prompt),
            "response_a": request.a.text, "response_b": request.b.text}


def label_from_annotation(request: Request, annotation: dict, where: str) -> Label:
    """The label a Label Studio annotation gives `request` (`where` names the task in errors)."""
    if annotation.get("was_cancelled"):
        return Label.for_request(request, None, annotator=_who(annotation), reason="skipped in Label Studio")
    by_name = {r.get("from_name"): r.get("value") or {} for r in annotation.get("result") or []}
    selected = (by_name.get("preference") or {}).get("selected")
    if selected not in ("left", "right"):
        raise AnnotatorError(f"{where}: field 'preference': no response chosen (got {selected!r})")
    choices = (by_name.get("strength") or {}).get("choices") or []
    if len(choices) != 1 or choices[0] not in STRENGTHS:
        raise AnnotatorError(f"{where}: field 'strength': expected one of {', '.join(STRENGTHS)}, got {choices!r}")
    edited = "\n".join((by_name.get("edited") or {}).get("text") or []).strip() or None
    return Label.for_request(request, "a" if selected == "left" else "b", choices[0], edited=edited,
                             annotator=_who(annotation))


def _who(annotation: dict) -> str:
    by = annotation.get("completed_by")
    return f"labelstudio:user{by}" if by is not None else "labelstudio"


class LabelStudioAnnotator:
    """Human labels from a Label Studio server (see the module docstring)."""

    name = "labelstudio"

    def __init__(self, url: str | None = None, token_env: str = "LABEL_STUDIO_API_KEY",
                 project_title: str | None = None, timeout: float = 60.0):
        self.url = (url or os.environ.get("LABEL_STUDIO_URL") or "http://localhost:8080").rstrip("/")
        self.token_env = token_env
        self.project_title = project_title
        self.timeout = timeout
        self.folder: Path | None = None
        self._auth: str | None = None

    # ------------------------------------------------------------------ HTTP

    def _authorization(self) -> str:
        if self._auth is None:
            token = os.environ.get(self.token_env)
            if not token:
                raise AnnotatorError(f"labelstudio: no API token: set ${self.token_env} (Label Studio: "
                                     "Account & Settings > Access Token)")
            if token.count(".") == 2:  # a personal access token (JWT refresh token)
                access = self._request("POST", "/api/token/refresh", {"refresh": token}, auth=False)
                self._auth = f"Bearer {access['access']}"
            else:
                self._auth = f"Token {token}"
        return self._auth

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = self._authorization()
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode("utf-8", "replace")
            raise AnnotatorError(f"labelstudio: {method} {self.url}{path} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise AnnotatorError(f"labelstudio: cannot reach {self.url} ({e}); is the server running?") from None
        return json.loads(raw) if raw else None

    # ------------------------------------------------------------------ state

    def attach(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _state_path(self) -> Path:
        if self.folder is None:
            raise AnnotatorError("labelstudio: attach(folder) was not called, so there is nowhere to keep "
                                 "the project id")
        return self.folder / STATE_FILE

    def _state(self) -> dict:
        path = self._state_path()
        return read_json(path) if path.is_file() else {}

    def project_id(self) -> int | None:
        return self._state().get("project_id")

    def where(self) -> str:
        pid = self.project_id()
        return f"{self.url}/projects/{pid}/data" if pid is not None else self.url

    def _project(self) -> int:
        state = self._state()
        if state.get("project_id") is not None and state.get("url") == self.url:
            return state["project_id"]
        title = self.project_title or f"posttrain {self.folder.parent.parent.name} {self.folder.parent.name}"
        project = self._request("POST", "/api/projects", {
            "title": title[:50], "label_config": LABEL_CONFIG,
            "description": "posttrain annotate step: which response is better, how much, and an optional edit."})
        state = {"url": self.url, "project_id": project["id"], "imported": {}}
        atomic_write_json(self._state_path(), state)
        return project["id"]

    # ------------------------------------------------------------------ the annotator

    def annotate(self, requests: list[Request]) -> list[Label | None]:
        pid = self._project()
        state = self._state()
        imported: dict[str, str] = state.get("imported", {})
        new = [r for r in requests if r.id not in imported]
        if new:
            self._request("POST", f"/api/projects/{pid}/import", [{"data": task_data(r)} for r in new])
            imported.update({r.id: r.pair_sha256 for r in new})
            atomic_write_json(self._state_path(), {**state, "imported": imported})
        tasks = self._request("GET", f"/api/projects/{pid}/export?exportType=JSON&download_all_tasks=true")
        by_id = {r.id: r for r in requests}
        found: dict[str, Label] = {}
        for task in tasks:
            data = task.get("data") or {}
            rid = data.get("request_id")
            where = f"{self.url} project {pid} task {task.get('id')}"
            if rid not in by_id:
                continue  # a task of a request labelled earlier, or added by hand
            if data.get("pair_sha256") != by_id[rid].pair_sha256:
                raise AnnotatorError(f"{where}: field 'pair_sha256': the task shows other responses than "
                                     f"request {rid!r} now has; refusing to join its labels")
            done = [a for a in task.get("annotations") or [] if a.get("result") or a.get("was_cancelled")]
            if not done:
                continue
            latest = max(done, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
            found[rid] = label_from_annotation(by_id[rid], latest, where)
        return [found.get(r.id) for r in requests]
