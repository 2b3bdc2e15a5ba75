"""The annotate step against a real Label Studio server (slow: the server takes a minute to start).

Label Studio lives in its own environment (scripts/install-labelstudio.sh); the test starts
`label-studio start` on a free port with a temporary data folder and a known user token,
labels through the REST API as a person in the browser would, and stops the server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from posttrain import data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "0123456789abcdef0123456789abcdef01234567"


def _label_studio_command() -> str | None:
    cmd = os.environ.get("POSTTRAIN_LABEL_STUDIO") or str(ROOT / ".venv-labelstudio" / "bin" / "label-studio")
    return cmd if Path(cmd).is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, method: str, path: str, body=None):
    req = urllib.request.Request(url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    cmd = _label_studio_command()
    if cmd is None:
        pytest.skip("Label Studio is not installed: run scripts/install-labelstudio.sh (CI does, in .ci/run)")
    home = tmp_path_factory.mktemp("labelstudio")
    port = _free_port()
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(home), "LABEL_STUDIO_USERNAME": "annotator@example.com",
           "LABEL_STUDIO_PASSWORD": "posttrain-test", "LABEL_STUDIO_USER_TOKEN": TOKEN,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "DJANGO_DB": "sqlite", "SENTRY_DSN": "",
           "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true"}
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([cmd, "start", "--no-browser", "--port", str(port), "--host", "127.0.0.1"],
                            env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # migrations on a busy 2-core machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"label-studio exited with {proc.returncode}: "
                            f"{(home / 'server.log').read_text()[-3000:]}")
            try:
                _call(url, "GET", "/api/current-user/whoami")
                break
            except (urllib.error.URLError, OSError):
                if time.time() > deadline:
                    pytest.fail(f"label-studio did not answer within 10 minutes: "
                                f"{(home / 'server.log').read_text()[-3000:]}")
                time.sleep(2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _label(url: str, task_id: int, side: str, strength: str, edited: str | None = None):
    result = [{"from_name": "preference", "to_name": "response_a,response_b", "type": "pairwise",
               "value": {"selected": "left" if side == "a" else "right"}},
              {"from_name": "strength", "to_name": "prompt", "type": "choices", "value": {"choices": [strength]}}]
    if edited is not None:
        result.append({"from_name": "edited", "to_name": "prompt", "type": "textarea", "value": {"text": [edited]}})
    _call(url, "POST", f"/api/tasks/{task_id}/annotations", {"result": result})


def test_annotate_step_waits_for_people_in_label_studio_and_picks_up_their_labels(
        label_studio, tmp_path, tiny_model_dir, monkeypatch):
    from posttrain.annotate import AnnotatorError
    from posttrain.annotate.labelstudio import LabelStudioAnnotator
    from posttrain.stages.annotate import WaitingForLabels, load_requests, run
    from posttrain.api import status_table
    from tests.test_annotate import _ctx

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    annotator = LabelStudioAnnotator(url=label_studio)
    ctx = _ctx(tmp_path, tiny_model_dir, annotator)
    # 1. Requests go to Label Studio as tasks; nobody has labelled yet: the round waits.
    with pytest.raises(WaitingForLabels) as waiting:
        run(ctx)
    pid = annotator.project_id()
    assert f"label at {label_studio}/projects/{pid}/data" in str(waiting.value)
    requests = {r.id: r for r in load_requests(ctx.out_dir)}
    assert len(requests) >= 3
    project = _call(label_studio, "GET", f"/api/projects/{pid}")
    assert "<Pairwise" in project["label_config"] and "significantly_better" in project["label_config"]
    tasks = _call(label_studio, "GET", f"/api/tasks?project={pid}&page_size=100")["tasks"]
    by_request = {t["data"]["request_id"]: t for t in tasks}
    assert set(by_request) == set(requests)
    assert all(by_request[i]["data"]["pair_sha256"] == r.pair_sha256 for i, r in requests.items())

    # 2. A person labels all but one (one with an edit, one skipped): still waiting, counted.
    ids = sorted(requests)
    _label(label_studio, by_request[ids[0]]["id"], "b", "significantly_better", edited="1 2 3")
    _call(label_studio, "POST", f"/api/tasks/{by_request[ids[1]]['id']}/annotations",
          {"result": [], "was_cancelled": True})
    for rid in ids[2:-1]:
        _label(label_studio, by_request[rid]["id"], "a", "slightly_better")
    with pytest.raises(WaitingForLabels, match=rf"{len(ids) - 1}/{len(ids)} labelled"):
        run(ctx)
    table = status_table(ctx.run_dir)
    assert f"waiting {len(ids) - 1}/{len(ids)} labelled, label at {label_studio}/projects/{pid}/data" in table
    assert len(_call(label_studio, "GET", "/api/projects")["results"]) == 1  # not created twice

    # 3. The last label arrives: the next run picks everything up and writes the batch.
    _label(label_studio, by_request[ids[-1]]["id"], "b", "better")
    result = run(ctx)
    m = result.metrics
    assert (m["labelled"], m["abstained"], m["edited"]) == (len(ids) - 1, 1, 1)
    assert m["strengths"]["significantly_better"] == 1 and m["annotators"] == {"labelstudio:user1": len(ids)}
    batch = {p.id: p for p in data.load_preferences([ctx.run_dir / result.outputs["preferences"]])}
    first = requests[ids[0]]
    assert batch[ids[0]].chosen == first.b.text and batch[ids[0]].rejected == first.a.text
    assert batch[ids[0]].edited == "1 2 3" and ids[1] not in batch
    assert batch[ids[-1]].strength == "better"

    # 4. A task whose responses no longer match its request is refused, never joined.
    task = by_request[ids[2]]
    _call(label_studio, "PATCH", f"/api/tasks/{task['id']}",
          {"data": {**task["data"], "response_a": "changed", "pair_sha256": "0" * 64}})
    fresh = LabelStudioAnnotator(url=label_studio)
    fresh.attach(ctx.out_dir)
    with pytest.raises(AnnotatorError, match=rf"task {task['id']}: field 'pair_sha256'"):
        fresh.annotate(list(requests.values()))
