import copy
import json
import pickle

import pytest

from edgeguard.errors import UsageError
from edgeguard.policy import LOOSE, STRICT, Policy, can_flag, decide, load_policy
from edgeguard.verdict import TokenVerdict, Verdict

S, U, C = "Safe", "Unsafe", "Controversial"


def test_builtin_base_decisions():
    assert decide(STRICT, U, ["Violent"]) and decide(LOOSE, U, ["Violent"])
    assert decide(STRICT, C, ["Violent"]) and not decide(LOOSE, C, ["Violent"])
    assert not decide(STRICT, S, ["Violent"]) and not decide(LOOSE, S, [])
    assert decide(STRICT, U) and decide(STRICT, U, ["None"])


def test_category_rules():
    policy = Policy("p", False, {"Violent": "flag", "Politically Sensitive Topics": "allow",
                                  "PII": 0.7})
    assert decide(policy, C, ["Violent"])  # flag overrides a lenient base
    assert not decide(policy, U, ["Politically Sensitive Topics"])  # allow overrides Unsafe
    assert decide(policy, U, ["Politically Sensitive Topics", "Unethical Acts"])  # one unruled
    assert decide(policy, C, ["Violent", "Politically Sensitive Topics"])  # flag wins
    assert not decide(policy, S, ["Violent"])  # Safe is never flagged
    # thresholds read scores; a list of names scores each named category 1.0
    assert decide(policy, C, ["PII"])
    assert decide(policy, C, {"PII": 0.7, "Violent": 0.3})
    assert not decide(policy, U, {"PII": 0.69, "Violent": 0.31})  # PII predicted, under t
    assert decide(policy, U, {"Unethical Acts": 0.6, "PII": 0.4})  # base: Unethical unruled
    assert decide(policy, C, {"Unethical Acts": 0.2, "PII": 0.75, "None": 0.05})
    assert decide(policy, U, {"None": 0.9, "PII": 0.1})  # no category predicted: base


def test_can_flag_asks_whether_any_category_flags_the_label():
    cats = ("Violent", "PII")
    assert can_flag(STRICT, "Unsafe", cats) and can_flag(STRICT, "Controversial", cats)
    assert can_flag(LOOSE, "Unsafe", cats) and not can_flag(LOOSE, "Controversial", cats)
    assert not can_flag(STRICT, "Safe", cats)
    allow_all = Policy("allow-all", True, {c: "allow" for c in cats})
    assert not can_flag(allow_all, "Unsafe", cats) and not can_flag(allow_all, "Controversial", cats)
    assert can_flag(allow_all, "Unsafe", cats + ("Sexual Content or Sexual Acts",))  # an unlisted category
    one_flagged = Policy("pii", False, {"PII": "flag"})
    assert can_flag(one_flagged, "Controversial", cats) and not can_flag(one_flagged, "Controversial", ("Violent",))
    threshold = Policy("t", False, {"Violent": 0.9, "PII": "allow"})
    assert can_flag(threshold, "Unsafe", cats)  # a category's score may reach its threshold
    assert can_flag(allow_all, "Unsafe", ()) and not can_flag(LOOSE, "Controversial", ())  # none: the base


def test_decide_rejects_bad_input():
    with pytest.raises(ValueError):
        decide(STRICT, "unsafe", [])
    with pytest.raises(TypeError):
        decide(STRICT, U, "Violent")
    with pytest.raises(ValueError):
        Policy("p", True, {"PII": 1.5})
    with pytest.raises(ValueError):
        Policy("p", True, {"PII": True})


def test_policy_is_frozen():
    with pytest.raises(Exception):
        STRICT.flag_controversial = False
    with pytest.raises(TypeError):
        STRICT.categories["Violent"] = "allow"
    policy = Policy("p", True, {"PII": 0.5})
    assert pickle.loads(pickle.dumps(policy)) == policy


def test_load_builtin():
    assert load_policy("strict") is STRICT
    assert load_policy("LOOSE") is LOOSE
    with pytest.raises(UsageError, match="unknown policy 'medium'"):
        load_policy("medium")


def write(tmp_path, text, name="mine.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_file(tmp_path):
    path = write(tmp_path, """
[policy]
base = "loose"
[categories]
"Violent" = "flag"
"Politically Sensitive Topics" = "allow"
"PII" = 0.7
"Jailbreak" = 1
""")
    policy = load_policy(path)
    assert policy == Policy("mine", False, {"Violent": "flag", "Politically Sensitive Topics":
                                            "allow", "PII": 0.7, "Jailbreak": 1.0})
    assert load_policy(str(path)) == policy
    named = load_policy(write(tmp_path, '[policy]\nname = "x"\nflag_controversial = true\n'))
    assert named == Policy("x", True)
    assert load_policy(write(tmp_path, "")) == Policy("mine", True)  # base defaults to strict


@pytest.mark.parametrize(
    "text, words",
    [
        ("[policy\n", ["malformed TOML"]),
        ('[policy]\nbase = "medium"\n', ["policy.base"]),
        ('[policy]\nbasis = "strict"\n', ["policy.basis"]),
        ('[policy]\nflag_controversial = "yes"\n', ["policy.flag_controversial"]),
        ('[rules]\n"PII" = "flag"\n', ["'rules'"]),
        ('policy = "strict"\n', ["policy must be a table"]),
        ('[categories]\n"PII" = "block"\n', ["categories.'PII'", "block"]),
        ('[categories]\n"PII" = 2.0\n', ["categories.'PII'"]),
        ('[categories]\n"PII" = true\n', ["categories.'PII'"]),
        ('[categories]\n"Violence" = "flag"\n', ["'Violence'", "not a category"]),
    ],
)
def test_load_file_errors_name_file_and_key(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_known_categories_come_from_the_model(tmp_path):
    path = write(tmp_path, '[categories]\n"Hate" = "flag"\n')
    with pytest.raises(UsageError):
        load_policy(path)
    assert load_policy(path, known_categories={"Hate"}).categories == {"Hate": "flag"}


SCORES = {"Safe": 0.1, "Unsafe": 0.7, "Controversial": 0.2}


def make_verdict(**overrides):
    args = dict(label=U, scores=SCORES, categories=["Violent"],
                category_scores={"Violent": 0.9, "None": 0.1}, refusal="No",
                flagged=decide(STRICT, U, ["Violent"]), policy="strict", engine="gen",
                model="gen-0.6b")
    args.update(overrides)
    return Verdict(**args)


def test_verdict_to_dict_is_the_json_contract():
    verdict = make_verdict(timings={"prefill": 12.5})
    out = verdict.to_dict()
    assert list(out) == ["label", "scores", "categories", "category_scores", "refusal",
                         "flagged", "policy", "engine", "model"]
    assert out["scores"] == SCORES and list(out["scores"]) == [S, U, C]
    assert out["categories"] == ["Violent"] and out["flagged"] is True
    assert json.loads(json.dumps(out)) == out
    assert verdict.to_dict(timings=True)["timings"] == {"prefill": 12.5}
    assert make_verdict(refusal=None).to_dict()["refusal"] is None


def test_verdict_is_frozen_and_validated():
    verdict = make_verdict()
    with pytest.raises(Exception):
        verdict.label = S
    with pytest.raises(TypeError):
        verdict.scores["Safe"] = 1.0
    with pytest.raises(AttributeError):
        verdict.categories.append("PII")
    source = dict(SCORES)
    held = make_verdict(scores=source)
    source["Safe"] = 0.99
    assert held.scores["Safe"] == 0.1
    assert pickle.loads(pickle.dumps(verdict)) == verdict == copy.deepcopy(verdict)
    for bad in (dict(label="unsafe"), dict(engine="llama"), dict(refusal="maybe"),
                dict(scores={"Safe": 1.0})):
        with pytest.raises(ValueError):
            make_verdict(**bad)


def test_token_verdict_to_dict():
    token = TokenVerdict(index=3, token=151645, text=" bomb", scores=SCORES, label=U,
                         category="Violent")
    assert token.to_dict() == {"index": 3, "token": 151645, "text": " bomb", "scores": SCORES,
                               "label": U, "category": "Violent"}
    assert pickle.loads(pickle.dumps(token)) == token
