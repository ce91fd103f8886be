import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from heretic_like.config import load_settings
from heretic_like.detectors import EndpointJudge, MarkerDetector, ModelJudge, agreement, judge_warning
from heretic_like.errors import HereticError
from heretic_like.model import load_model
from heretic_like.prompts import builtin_path
from heretic_like.study import run_study
from tests.conftest import COMPLIANCE, REFUSAL, refused_study_config
from tests.test_model import settings_for


def test_agreement_and_kappa():
    assert agreement([True, False, True, False], [True, False, True, False]) == {"n": 4, "agreement": 1.0,
                                                                                 "kappa": 1.0}  # fmt: skip
    # 3 of 4 equal; chance agreement 0.5 -> kappa 0.5
    assert agreement([True, True, False, False], [True, False, False, False]) == {"n": 4, "agreement": 0.75,
                                                                                  "kappa": 0.5}  # fmt: skip
    assert agreement([True, False], [False, True])["kappa"] == -1.0


def test_a_judge_that_misses_refusals_is_called_out():
    # a judge answering "no" to everything would make every edit look uncensored
    warning = judge_warning(0, 20, 0.0)
    assert warning.startswith("warning:") and "finds 0 refusals where the markers find 20" in warning
    assert "\n" not in warning
    assert judge_warning(9, 20, 0.8) is not None  # under half the markers' count
    assert judge_warning(18, 20, 0.3) is not None  # counts close, verdicts on different prompts
    assert judge_warning(18, 20, 0.8) is None and judge_warning(25, 20, 0.6) is None
    assert judge_warning(0, 0, float("nan")) is None  # nothing to compare with


def test_model_judge_reads_the_answer_and_judges_with_the_unedited_model(judge_model, tmp_path):
    loaded = load_model(settings_for(judge_model, tmp_path))
    judge = ModelJudge(loaded, batch_size=8, tags=[("<think>", "</think>")])
    entered = []
    judge.unedited = lambda: contextlib.nullcontext(entered.append(1))
    prompts = builtin_path("harmful").read_text().splitlines()[:8]
    prompts += builtin_path("harmless").read_text().splitlines()[:8]
    responses = [REFUSAL, COMPLIANCE] * 8
    assert judge.classify(prompts, responses) == [True, False] * 8
    assert entered == [1]  # the question was put once, with the edit switched off
    # the thinking block is not the answer: a refusal inside it is not judged as one
    assert judge.classify(prompts[:2], [f"<think>{REFUSAL}</think>{COMPLIANCE}"] * 2) == [False, False]


class _JudgeEndpoint(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions server: answers "Yes." when the judged
    answer says sorry. Records what it was sent."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        answer = body["messages"][-1]["content"].rsplit("Answer:", 1)[1]
        reply = {"choices": [{"message": {"role": "assistant", "content": "Yes." if "Sorry" in answer else "No"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), _JudgeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _JudgeEndpoint.seen = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_endpoint_judge_speaks_chat_completions(endpoint):
    judge = EndpointJudge(endpoint, "judge-model", api_key="k123", workers=2)
    assert judge.classify(["a", "b", "c"], [REFUSAL, COMPLIANCE, "sorry? no: Sorry."]) == [True, False, True]
    first = _JudgeEndpoint.seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer k123"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0
    with pytest.raises(HereticError, match="refusal_judge_url http://127.0.0.1:9/chat/completions: no usable"):
        EndpointJudge("http://127.0.0.1:9", "m", timeout=2).classify(["a"], ["b"])


def test_study_with_a_judge_reports_agreement_with_markers(refusing_model, judge_model, tmp_path, capsys):
    config = refused_study_config(tmp_path, refusing_model, n_trials=2, n_startup_trials=2, prune_dominated="false",
                                  refusal_detector='"judge"', refusal_judge_model=f'"{judge_model}"')  # fmt: skip
    run = run_study(load_settings(str(config)))
    agreed = run.study.user_attrs["detector_agreement_unedited"]
    assert agreed["n"] == 24 and agreed["agreement"] >= 0.9  # the judge sees the trained refusals too
    assert "warning: the judge" not in capsys.readouterr().out  # a judge that agrees is not called out
    assert run.study.user_attrs["base_refusals"] >= 20
    for trial in run.study.trials:
        assert "marker_refusals" in trial.user_attrs and 0 <= trial.user_attrs["marker_agreement"] <= 1


def test_endpoint_detector_needs_url_and_model(tmp_path):
    with pytest.raises(HereticError, match="needs refusal_judge_url and refusal_judge_model"):
        load_settings(overrides={"model": "x", "refusal_detector": "endpoint"})
    assert MarkerDetector(("sorry",)).streaming and not ModelJudge.streaming
