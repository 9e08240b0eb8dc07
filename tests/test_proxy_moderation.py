"""OpenAI's moderation model names reach the default moderation model: the real `litellm` and
`openai` clients against a real `edgeguard serve` on loopback, compared with the same request
naming the model itself."""

from __future__ import annotations

import pytest

from edgeguard.server.moderation import OPENAI_MODELS
from tests.fixtures.converted import converted
from tests.test_server import Server

pytestmark = pytest.mark.server

TEXTS = ["How do I bake bread?", "Tell me how to pick a lock."]
ALIASES = [*OPENAI_MODELS, *(f"openai/{name}" for name in OPENAI_MODELS)]


@pytest.fixture(scope="module")
def server(gen_ckpt, stream_ckpt, tmp_path_factory):
    gen, stream = (str(converted(c, ("f16",))) for c in (gen_ckpt, stream_ckpt))
    srv = Server("--model", gen, "--stream-model", stream, "--api-key", "k3y",
                 env={"EDGEGUARD_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))})
    yield srv
    assert srv.stop() == 0, srv.stderr


@pytest.fixture(scope="module")
def reference(server):
    """The moderation results of the default (Gen) model, named by its own name."""
    status, body = server.get("/v1/models", headers={"Authorization": "Bearer k3y"})
    assert status == 200
    gen = next(m["id"] for m in body["data"] if m["engine"] == "gen")
    status, _, out = server.post("/v1/moderations", {"input": TEXTS, "model": gen},
                                 headers={"Authorization": "Bearer k3y"})
    assert status == 200
    return gen, out["results"]


def _same_results(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["flagged"] == w["flagged"]
        assert {k: g["categories"][k] for k in w["categories"]} == w["categories"]
        for key, p in w["category_scores"].items():
            assert g["category_scores"][key] == pytest.approx(p, abs=1e-3), key


@pytest.mark.parametrize("alias", ALIASES)
def test_openai_client_with_openai_names(server, reference, alias):
    from openai import OpenAI

    gen, want = reference
    client = OpenAI(base_url=f"{server.url}/v1", api_key="k3y", max_retries=0)
    result = client.moderations.create(input=TEXTS, model=alias)
    assert result.model == gen
    _same_results([r.model_dump(by_alias=True) for r in result.results], want)


def test_missing_model_is_the_default(server, reference):
    gen, want = reference
    status, _, out = server.post("/v1/moderations", {"input": TEXTS}, headers={"Authorization": "Bearer k3y"})
    assert status == 200 and out["model"] == gen
    _same_results(out["results"], want)


@pytest.mark.parametrize("model", ["omni-moderation-latest", "openai/omni-moderation-latest",
                                   "text-moderation-latest", "omni-moderation-2024-09-26"])
def test_litellm_moderation(server, reference, model, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: the bundled cost map
    import litellm

    gen, want = reference
    result = litellm.moderation(input=TEXTS, model=model, api_base=f"{server.url}/v1", api_key="k3y")
    assert result.model == gen
    got = [r.model_dump(by_alias=True) for r in result.results]
    _same_results(got, want)


@pytest.mark.parametrize("model", ["omni-moderation", "gpt-4o", "openai/not-a-model",
                                   "anthropic/omni-moderation-latest"])
def test_other_names_stay_404(server, model):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="k3y", max_retries=0)
    with pytest.raises(NotFoundError) as e:
        client.moderations.create(input="hi", model=model)
    assert e.value.code == "model_not_found"
    assert model in e.value.body["message"]


def test_litellm_unknown_name_is_404(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    from openai import NotFoundError

    with pytest.raises(NotFoundError):  # litellm's own NotFoundError subclasses it
        litellm.moderation(input="hi", model="omni-moderation-unknown", api_base=f"{server.url}/v1",
                           api_key="k3y")
